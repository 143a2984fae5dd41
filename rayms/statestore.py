"""Where the registry keeps the desired set of models, so nothing registered is lost.

The file is KServe's ``models.json`` shape (``[{"modelName": ..., "modelSpec": {...}}]``) plus a
``source`` field, so a person can read and edit it and a KServe user recognises it. Local paths are
written to a temporary file and renamed into place (atomic on POSIX); other fsspec URIs are written
whole in one call, which object stores make atomic per object.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any

from rayms.errors import StorageError


def _is_local(uri: str) -> bool:
    return "://" not in uri or uri.startswith("file://")


class StateStore:
    """Read and write the desired set at ``uri`` (a local path or any fsspec URI)."""

    def __init__(self, uri: str) -> None:
        self.uri = uri

    def _local_path(self) -> Path:
        return Path(self.uri.removeprefix("file://")).expanduser()

    def read(self) -> list[dict[str, Any]]:
        try:
            if _is_local(self.uri):
                path = self._local_path()
                if not path.exists():
                    return []
                text = path.read_text()
            else:
                import fsspec

                fs, path = fsspec.core.url_to_fs(self.uri)
                if not fs.exists(path):
                    return []
                text = fs.cat_file(path).decode()
        except OSError as exc:
            raise StorageError(f"cannot read model state {self.uri}: {exc}") from exc
        entries = json.loads(text) if text.strip() else []
        if not isinstance(entries, list):
            raise StorageError(f"model state {self.uri} is not a JSON list of models")
        return entries

    def write(self, entries: list[dict[str, Any]]) -> None:
        text = json.dumps(entries, indent=2, sort_keys=True) + "\n"
        try:
            if _is_local(self.uri):
                path = self._local_path()
                path.parent.mkdir(parents=True, exist_ok=True)
                fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
                with os.fdopen(fd, "w") as handle:
                    handle.write(text)
                    handle.flush()
                    os.fsync(handle.fileno())
                os.replace(tmp, path)
            else:
                import fsspec

                fs, path = fsspec.core.url_to_fs(self.uri)
                fs.pipe_file(path, text.encode())
        except OSError as exc:
            raise StorageError(f"cannot write model state {self.uri}: {exc}") from exc
