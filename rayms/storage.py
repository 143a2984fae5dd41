"""The downloader: turn a ``storageUri`` into a path on this node, and nothing else.

KServe's agent picks a hand-written provider per URI prefix, never retries, unpacks archives only for HTTP
(and only by Content-Type) and writes straight into the model folder, so a crash leaves a half-written model
that looks complete. Here fsspec is the provider for every remote scheme (this is the only module that
imports it), every scheme gets the same archive handling, and a download becomes visible only through one
``os.replace`` of a finished temporary folder. Errors come out as :class:`StorageError` whose ``transient``
flag tells the puller (``rayms.agent``) whether a retry can help.

URI shapes:

* a local path, ``file:///abs/path`` and ``pvc://<claim>/<path>`` (``<pvc_root>/<claim>/<path>``) are used in
  place: nothing is copied, a replica loads straight from them. Archives are still unpacked into ``dest``.
* ``s3://``, ``gs://``/``gcs://``, ``az://``/``abfs://``/``abfss://`` may name one object or a folder
  (prefix), copied recursively.
* ``http(s)://`` has no listing, so it must name a single file or an archive.

Result shape mirrors the URI: a file URI gives a file path, a folder or an archive gives a directory.
S3 endpoint: ``AWS_ENDPOINT_URL_S3``, then ``AWS_ENDPOINT_URL``, then KServe's ``S3_ENDPOINT`` (host[:port]
with ``S3_USE_HTTPS=0`` for plain http). Credentials are botocore's usual ``AWS_*`` variables.
"""

from __future__ import annotations

import errno
import importlib
import os
import shutil
import stat
import tarfile
import threading
import uuid
import zipfile
from pathlib import Path, PurePosixPath
from urllib.parse import unquote, urlsplit

import fsspec
from fsspec.callbacks import Callback

from rayms.errors import StorageError

# scheme -> (fsspec protocol, package that implements it, rayms extra that installs it)
BACKENDS: dict[str, tuple[str, str, str]] = {
    "s3": ("s3", "s3fs", "s3"),
    "gs": ("gcs", "gcsfs", "gcs"),
    "gcs": ("gcs", "gcsfs", "gcs"),
    "az": ("abfs", "adlfs", "azure"),
    "abfs": ("abfs", "adlfs", "azure"),
    "abfss": ("abfs", "adlfs", "azure"),
    "http": ("http", "aiohttp", "http"),
    "https": ("https", "aiohttp", "http"),
}
ARCHIVE_SUFFIXES = (".tar.gz", ".tgz", ".tar", ".zip")


def scheme_of(uri: str) -> str:
    """``""`` for a plain local path, else the lower-case URI scheme."""
    head, sep, _ = uri.partition("://")
    return head.lower() if sep else ""


def is_archive(name: str) -> bool:
    """Archives are recognised by name (KServe's agent went by HTTP Content-Type, which S3 and GCS lack)."""
    return name.lower().endswith(ARCHIVE_SUFFIXES)


def local_source(uri: str, *, settings) -> Path | None:
    """The local path a ``file://``, ``pvc://`` or plain-path URI names; ``None`` for remote URIs."""
    scheme = scheme_of(uri)
    if scheme == "":
        return Path(uri).expanduser().absolute()
    if scheme == "file":
        parts = urlsplit(uri)
        if parts.netloc not in ("", "localhost"):
            raise StorageError(f"{uri}: file:// URIs name this node only (file:///abs/path)")
        return Path(unquote(parts.path) or "/")
    if scheme == "pvc":
        claim, _, sub = uri[len("pvc://"):].partition("/")
        if not claim or claim in (".", ".."):
            raise StorageError(f"{uri}: pvc URIs look like pvc://<claim>/<path>")
        mount = Path(settings.pvc_root) / claim
        path = (mount / sub).resolve() if sub else mount.resolve()
        if not path.is_relative_to(mount.resolve()):
            raise StorageError(f"{uri}: path escapes the claim's mount {mount}")
        return path
    return None


def in_place(uri: str, *, settings) -> Path | None:
    """The path to load from without any copy (local, non-archive URIs), else ``None``."""
    path = local_source(uri, settings=settings)
    if path is None or is_archive(path.name):
        return None
    if not path.exists():
        raise StorageError(f"{uri}: not found (404): {path} does not exist")
    return path


def fetch(uri: str, dest: Path, *, settings, cancel: threading.Event | None = None) -> Path:
    """Make the artifact at ``uri`` available locally and return its path (blocking; run it in a thread).

    Local URIs come back in place. Anything copied or unpacked lands in ``dest``, which appears atomically
    (a previous ``dest`` is replaced). ``cancel`` aborts between chunks, so an abandoned attempt (timed
    out by the caller) never replaces a newer one's result.
    """
    dest = Path(dest)
    try:
        local = in_place(uri, settings=settings)
        if local is not None:
            return local
        source = local_source(uri, settings=settings)
        if source is not None and not source.is_file():
            raise StorageError(f"{uri}: not found (404): {source} is not a file")
        return _download(uri, dest=dest, source=source, settings=settings, cancel=cancel or threading.Event())
    except StorageError:
        raise
    except Exception as exc:  # every backend error leaves through the one classifier
        raise classify(exc, uri=uri) from exc


def _download(uri: str, *, dest: Path, source: Path | None, settings, cancel: threading.Event) -> Path:
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.parent / f".{dest.name}.part-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        if source is not None:  # a local archive: unpack only
            _unpack(source, into=tmp, uri=uri)
            inner = ""
        elif scheme_of(uri) in ("http", "https"):
            inner = _copy_http(uri, into=tmp, settings=settings, cancel=cancel)
        else:
            inner = _copy_fs(uri, into=tmp, settings=settings, cancel=cancel)
        if cancel.is_set():
            raise StorageError(f"{uri}: download abandoned", transient=True)
        if dest.exists():  # an older copy: move it aside first, a directory cannot be replaced when full
            old = dest.parent / f".{dest.name}.old-{uuid.uuid4().hex[:8]}"
            os.replace(dest, old)
            shutil.rmtree(old, ignore_errors=True)
        os.replace(tmp, dest)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return dest / inner if inner else dest


class _Cancellable(Callback):
    """fsspec progress callback that aborts a transfer once ``cancel`` is set."""

    def __init__(self, cancel: threading.Event) -> None:
        super().__init__()
        self._cancel = cancel

    def call(self, *args, **kwargs):
        if self._cancel.is_set():
            raise TimeoutError("download abandoned after its attempt timed out")


def _copy_http(uri: str, *, into: Path, settings, cancel: threading.Event) -> str:
    """One GET. Returns the relative name of the result inside ``into`` (``""``: ``into`` itself)."""
    path = urlsplit(uri).path
    name = PurePosixPath(path).name
    if not name or path.endswith("/"):
        raise StorageError(f"{uri}: http URIs must name a file or an archive (HTTP has no folder listing)")
    import aiohttp  # present whenever the http backend is; for the per-read timeout only

    fs = _filesystem(uri, settings=settings, timeout=aiohttp.ClientTimeout(
        total=None, sock_connect=settings.download_timeout_s, sock_read=settings.download_timeout_s))
    return _store_file(fs, rpath=uri, name=name, into=into, uri=uri, cancel=cancel)


def _copy_fs(uri: str, *, into: Path, settings, cancel: threading.Event) -> str:
    """One object or a whole prefix of an object store."""
    fs = _filesystem(uri, settings=settings)
    root = fs._strip_protocol(uri).rstrip("/")
    if not root:
        raise StorageError(f"{uri}: bad URI: no bucket or container")
    info = fs.info(root)
    if info["type"] != "directory":
        return _store_file(fs, rpath=root, name=PurePosixPath(root).name, into=into, uri=uri, cancel=cancel)
    files = [p for p, d in fs.find(root, detail=True).items() if d["type"] == "file" and not p.endswith("/")]
    if not files:
        raise StorageError(f"{uri}: not found (404): no objects under this prefix")
    for path in files:
        target = _inside(into, path[len(root):].lstrip("/"), uri=uri)
        target.parent.mkdir(parents=True, exist_ok=True)
        fs.get_file(path, str(target), callback=_Cancellable(cancel))
    return ""


def _store_file(fs, *, rpath: str, name: str, into: Path, uri: str, cancel: threading.Event) -> str:
    if not is_archive(name):
        fs.get_file(rpath, str(into / name), callback=_Cancellable(cancel))
        return name
    archive = into.with_name(into.name + "-" + name)
    try:
        fs.get_file(rpath, str(archive), callback=_Cancellable(cancel))
        _unpack(archive, into=into, uri=uri)
    finally:
        archive.unlink(missing_ok=True)
    return ""


def _filesystem(uri: str, *, settings, timeout=None):
    """A fresh filesystem per download: no instance shared between threads, no stale endpoint."""
    scheme = scheme_of(uri)
    if scheme not in BACKENDS:
        raise StorageError(
            f"{uri}: unsupported scheme {scheme!r}; use a local path, file://, pvc://, "
            + ", ".join(f"{s}://" for s in BACKENDS))
    protocol, package, extra = BACKENDS[scheme]
    try:
        importlib.import_module(package)
    except ImportError as exc:
        raise StorageError(f"{scheme}:// needs {package}: pip install 'rayms[{extra}]'") from exc
    options: dict = {"skip_instance_cache": True}
    if protocol == "s3":
        options.update(_s3_options(settings))
    if timeout is not None:
        options["client_kwargs"] = {"timeout": timeout}
    return fsspec.filesystem(protocol, **options)


def dataset_location(uri: str, *, settings):
    """``(path, filesystem)`` of a Parquet dataset (file or folder) that batch scoring reads or writes.

    The filesystem is a :mod:`pyarrow.fs` one, which Ray Data and pyarrow take as is: local paths,
    ``file://`` and ``pvc://`` give the local filesystem; every remote scheme is the same fsspec backend as a
    model download, with the same endpoint and credential variables, wrapped for pyarrow. The path is the
    URI without its scheme, as the filesystem names it."""
    from pyarrow import fs as pafs

    local = local_source(uri, settings=settings)
    if local is not None:
        return str(local), pafs.LocalFileSystem()
    filesystem = _filesystem(uri, settings=settings)
    path = uri if scheme_of(uri) in ("http", "https") else filesystem._strip_protocol(uri).rstrip("/")
    return path, pafs.PyFileSystem(pafs.FSSpecHandler(filesystem))


def _s3_options(settings) -> dict:
    """Endpoint from the environment (botocore only knows the AWS_* names, KServe used S3_ENDPOINT)."""
    endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
    if not endpoint and os.environ.get("S3_ENDPOINT"):
        endpoint = os.environ["S3_ENDPOINT"]
        if "://" not in endpoint:
            secure = os.environ.get("S3_USE_HTTPS", "1").lower() not in ("0", "false", "no")
            endpoint = ("https://" if secure else "http://") + endpoint
    options: dict = {"config_kwargs": {"connect_timeout": settings.download_timeout_s,
                                       "read_timeout": settings.download_timeout_s}}
    if endpoint:
        options["endpoint_url"] = endpoint
    if os.environ.get("AWS_ANONYMOUS_CREDENTIAL", "").lower() in ("1", "true", "yes"):
        options["anon"] = True
    return options


def _inside(root: Path, name: str, *, uri: str) -> Path:
    """``root/name`` if ``name`` is a plain relative path that stays inside ``root``; else refuse it."""
    parts = PurePosixPath(name.replace("\\", "/")).parts
    if not name or name.startswith(("/", "\\")) or ".." in parts or (parts and ":" in parts[0]):
        raise StorageError(f"{uri}: refusing member {name!r}: it escapes the target folder")
    return root.joinpath(*parts)


def _unpack(archive: Path, *, into: Path, uri: str) -> None:
    """Unpack a .tar(.gz)/.tgz/.zip, refusing escaping names, links and devices before writing anything."""
    try:
        if archive.name.lower().endswith(".zip"):
            with zipfile.ZipFile(archive) as zf:
                for info in zf.infolist():
                    _inside(into, info.filename, uri=uri)
                    if stat.S_ISLNK(info.external_attr >> 16):
                        raise StorageError(f"{uri}: refusing member {info.filename!r}: symlinks are not allowed")
                zf.extractall(into)
            return
        with tarfile.open(archive) as tf:
            members = tf.getmembers()
            for member in members:
                _inside(into, member.name, uri=uri)
                if not (member.isfile() or member.isdir()):
                    kind = "links" if member.issym() or member.islnk() else "devices and special files"
                    raise StorageError(f"{uri}: refusing member {member.name!r}: {kind} are not allowed")
            tf.extractall(into, members=members, filter="data")
    except (tarfile.TarError, zipfile.BadZipFile, EOFError) as exc:
        raise StorageError(f"{uri}: {archive.name} is not a valid archive: {exc}") from exc


def classify(exc: BaseException, *, uri: str) -> StorageError:
    """Map a backend exception to a :class:`StorageError`: 5xx, 429, timeouts, broken connections are
    transient; 4xx, missing objects, denied access and bad URIs are not. Wrapped causes are looked at last
    (s3fs re-raises botocore's errors as plain ``OSError``)."""
    if isinstance(exc, StorageError):
        return exc
    status = _status_of(exc)
    if isinstance(exc, FileNotFoundError) or status == 404:
        return StorageError(f"{uri}: not found (404){_why(exc, uri)}")
    if isinstance(exc, PermissionError) or status in (401, 403):
        return StorageError(f"{uri}: access denied ({status or 403}){_why(exc, uri)}")
    if status is not None:
        transient = status >= 500 or status in (408, 429)
        return StorageError(f"{uri}: HTTP {status}{_why(exc, uri)}", transient=transient)
    names = " ".join(cls.__name__ for cls in type(exc).__mro__)
    if isinstance(exc, (TimeoutError, ConnectionError)) or any(
            word in names for word in ("Timeout", "Connection", "Connector", "Payload", "Disconnected")):
        return StorageError(f"{uri}: network error ({type(exc).__name__}){_why(exc, uri)}", transient=True)
    if isinstance(exc, OSError) and exc.errno == errno.ENOSPC:
        return StorageError(f"{uri}: no space left on the cache disk: {exc}")
    cause = exc.__cause__ or exc.__context__
    if cause is not None and _status_of(cause) is not None:
        return classify(cause, uri=uri)
    return StorageError(f"{uri}: {type(exc).__name__}: {exc}")


def _status_of(exc: BaseException) -> int | None:
    """The HTTP status an aiohttp (``status``) or botocore (``response``) error carries, if any."""
    status = getattr(exc, "status", None)
    if isinstance(status, int):
        return status
    response = getattr(exc, "response", None)
    code = response.get("ResponseMetadata", {}).get("HTTPStatusCode") if isinstance(response, dict) else None
    return code if isinstance(code, int) else None


def _why(exc: BaseException, uri: str) -> str:
    """``": <reason>"`` for a message, without repeating the URI (aiohttp's ``message`` is the reason phrase)."""
    text = getattr(exc, "message", None)
    text = text if isinstance(text, str) and text else str(exc)
    return "" if not text or text in uri else f": {text}"
