"""Where the registry keeps the desired set of models, so nothing registered is lost, and so that one bad
write or hand edit of that file cannot stop the application.

The file is KServe's ``models.json`` shape (``[{"modelName": ..., "modelSpec": {...}}]``) plus ``source`` and
``version`` fields, so a person can read and edit it and a KServe user recognises it.

Reading never fails because of what the file says. A file that is not UTF-8 JSON, is cut short, is not a
list, or holds entries that would not be accepted as registrations (a bad ``modelName``, a ``modelSpec``
that :meth:`~rayms.config.ModelSpec.parse` refuses, a repeated name) is *set aside*: its bytes are kept
next to it as ``<name>.corrupt-<UTC time>``, the sound entries are written back in its place (from a
truncated list, every entry before the cut), and the application starts with those. Each problem is logged
at ERROR, naming the file and the kept copy, and stays in :attr:`StateStore.problems` for the registry to
show. Only a store that cannot be read at all (permissions, network) raises :class:`StorageError`: the file
may then be sound, so it is left alone.

Writing is all or nothing. A local file is written to a temporary file in the same folder, flushed to disk,
renamed into place, and the folder is flushed too, so the rename itself survives a power cut. A remote file
(any fsspec URI) is written whole in one call, which object stores make atomic per object, with the
credentials of ``Settings.storage_env`` (see :func:`rayms.storage.remote_filesystem`). Any failure raises
:class:`StorageError` (``transient`` when a retry may help) and leaves the previous file as it was.
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
import tempfile
from collections.abc import Mapping
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from rayms.config import ModelSpec, validate_model_name
from rayms.status import Source
from rayms.errors import InvalidSpec, StorageError
from rayms.storage import classify, remote_filesystem

logger = logging.getLogger("rayms.statestore")

# Errors that a retry cannot cure; anything else on a local disk (full, I/O error, busy) may pass.
_PERMANENT_ERRNOS = {errno.EACCES, errno.EPERM, errno.EROFS, errno.EISDIR, errno.ENOTDIR, errno.ENAMETOOLONG}


def _is_local(uri: str) -> bool:
    return "://" not in uri or uri.startswith("file://")


class StateStore:
    """Read and write the desired set at ``uri`` (a local path or any fsspec URI).

    ``env`` supplies a remote store's endpoint and credentials (``Settings.storage_env``); ``timeout_s``
    bounds each remote call.
    """

    def __init__(self, uri: str, *, env: Mapping[str, str] | None = None, timeout_s: float = 30.0) -> None:
        self.uri = uri
        self._env = dict(env or {})
        self._timeout_s = timeout_s
        self.problems: list[str] = []
        """Everything found wrong with the file by this store, one sentence each, oldest first."""

    # ---------------------------------------------------------------- reading
    def read(self) -> list[dict[str, Any]]:
        """The sound entries of the persisted set, in file order (``[]`` when there is no file yet).

        A damaged file is set aside and replaced by its sound entries before this returns (see the module
        docstring); raises :class:`StorageError` only when the store cannot be read or written.
        """
        raw = self._load()
        if raw is None:
            return []
        entries, problems = parse_entries(raw)
        if not problems:
            return entries
        kept = self._set_aside(raw)
        self.write(entries)
        summary = (f"model state {self.uri} is damaged; the original is kept as {kept}; starting with "
                   f"{len(entries)} model{'s' if len(entries) != 1 else ''} from it")
        logger.error("%s: %s", summary, "; ".join(problems))
        self.problems += [summary] + [f"{self.uri}: {problem}" for problem in problems]
        return entries

    def _load(self) -> bytes | None:
        try:
            if _is_local(self.uri):
                path = self._local_path()
                return path.read_bytes() if path.exists() else None
            fs, path = remote_filesystem(self.uri, env=self._env, timeout_s=self._timeout_s)
            try:
                return fs.cat_file(path)
            except FileNotFoundError:
                return None
        except StorageError:
            raise
        except Exception as exc:
            raise _failure(exc, uri=self.uri, doing="read") from exc

    def _set_aside(self, raw: bytes) -> str:
        """Keep the damaged bytes next to the file; return where. The original is replaced only after this."""
        stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%SZ")
        try:
            if _is_local(self.uri):
                path = self._local_path()
                kept = path.with_name(f"{path.name}.corrupt-{stamp}")
                for n in range(1, 1000):
                    if not kept.exists():
                        break
                    kept = path.with_name(f"{path.name}.corrupt-{stamp}-{n}")
                _replace_atomically(kept, raw)
                return str(kept)
            fs, path = remote_filesystem(self.uri, env=self._env, timeout_s=self._timeout_s)
            kept_path = f"{path}.corrupt-{stamp}"
            fs.pipe_file(kept_path, raw)
            return f"{self.uri}.corrupt-{stamp}"
        except StorageError:
            raise
        except Exception as exc:
            raise _failure(exc, uri=self.uri, doing="keep a copy of the damaged") from exc

    # ---------------------------------------------------------------- writing
    def write(self, entries: list[dict[str, Any]]) -> None:
        """Replace the persisted set with ``entries``, atomically; raise :class:`StorageError` on any failure."""
        try:
            data = (json.dumps(entries, indent=2, sort_keys=True) + "\n").encode()
        except (TypeError, ValueError) as exc:
            raise StorageError(f"cannot write model state {self.uri}: entries are not JSON: {exc}") from exc
        try:
            if _is_local(self.uri):
                _replace_atomically(self._local_path(), data)
            else:
                fs, path = remote_filesystem(self.uri, env=self._env, timeout_s=self._timeout_s)
                fs.pipe_file(path, data)
        except StorageError:
            raise
        except Exception as exc:
            raise _failure(exc, uri=self.uri, doing="write") from exc

    def _local_path(self) -> Path:
        return Path(self.uri.removeprefix("file://")).expanduser()


def parse_entries(raw: bytes) -> tuple[list[dict[str, Any]], list[str]]:
    """The sound entries of a state file's bytes and, one sentence each, what is wrong with the rest."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        return [], [f"not UTF-8 text ({exc.reason} at byte {exc.start})"]
    if not text.strip():
        return [], []
    try:
        document = json.loads(text)
        problems: list[str] = []
    except json.JSONDecodeError as exc:
        document = _complete_items(text)
        problems = [f"not valid JSON ({exc}); "
                    f"{len(document)} complete entr{'y' if len(document) == 1 else 'ies'} before that point"]
    if not isinstance(document, list):
        return [], [f"not a JSON list of models (a JSON {type(document).__name__})"]
    entries: list[dict[str, Any]] = []
    seen: set[str] = set()
    for position, item in enumerate(document, 1):
        problem = _entry_problem(item, seen)
        if problem:
            problems.append(f"entry {position} skipped: {problem}")
        else:
            entries.append(item)
            seen.add(item["modelName"])
    return entries, problems


def _complete_items(text: str) -> list[Any]:
    """The items of a JSON list that parse completely before the point where ``text`` stops being JSON."""
    decoder = json.JSONDecoder()
    position = len(text) - len(text.lstrip())
    if not text.startswith("[", position):
        return []
    items: list[Any] = []
    position += 1
    while True:
        position += len(text[position:]) - len(text[position:].lstrip())
        try:
            item, position = decoder.raw_decode(text, position)
        except json.JSONDecodeError:
            return items
        items.append(item)
        position += len(text[position:]) - len(text[position:].lstrip())
        if not text.startswith(",", position):
            return items
        position += 1


def _entry_problem(item: Any, seen: set[str]) -> str:
    """Why ``item`` would not be accepted as a registration ("" when it would)."""
    if not isinstance(item, dict):
        return f"not an object (a JSON {type(item).__name__})"
    name = item.get("modelName")
    try:
        validate_model_name(name)
        if not item.get("unloaded"):  # a declared model the user unloaded is remembered by name only
            ModelSpec.parse(item.get("modelSpec"), name=name)
    except InvalidSpec as exc:
        return str(exc)
    if name in seen:
        return f"model {name} is listed twice; the first entry is kept"
    source = item.get("source", "repository")
    try:
        Source.parse(source)
    except ValueError:
        return f"model {name}: source {source!r} is not one of {', '.join(s.value for s in Source)}"
    version = item.get("version", 1)
    if isinstance(version, bool) or not isinstance(version, int) or version < 1:
        return f"model {name}: version {version!r} is not a positive whole number"
    return ""


def _replace_atomically(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)  # mkstemp made it 0600: the file keeps full URIs, credentials included
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    # The rename is durable only once the folder's entry is on disk too.
    folder = os.open(path.parent, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    try:
        os.fsync(folder)
    finally:
        os.close(folder)


def _failure(exc: BaseException, *, uri: str, doing: str) -> StorageError:
    """One message shape for every failure; local disk errors are transient unless no retry can help."""
    if _is_local(uri) and isinstance(exc, OSError):
        transient = exc.errno not in _PERMANENT_ERRNOS
        return StorageError(f"cannot {doing} model state {uri}: {exc}", transient=transient)
    error = classify(exc, uri=uri)
    return StorageError(f"cannot {doing} model state {error}", transient=error.transient)
