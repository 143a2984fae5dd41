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

GCS: google-auth's usual credentials (``GOOGLE_APPLICATION_CREDENTIALS``, the metadata server). With
``STORAGE_EMULATOR_HOST`` set, requests go to that emulator without credentials, as Google's own client does,
and through gcsfs's JSON-API filesystem: its default one first asks a gRPC service for the bucket's layout,
which emulators do not offer, and waits a minute for it on every call.

Azure Blob: adlfs's ``AZURE_STORAGE_*`` variables (``AZURE_STORAGE_CONNECTION_STRING``, or
``AZURE_STORAGE_ACCOUNT_NAME`` with a key, SAS token or service principal); a connection string also
names the endpoint, e.g. an Azurite emulator's.

Limits: a download may bring at most ``max_download_bytes`` (checked against the sizes the server or the
listing announces before any byte is read, and against the bytes received while reading); archives unpack
within the limits of :mod:`rayms.archives`; an ``http(s)`` download connects only to public addresses unless
``allow_private_http`` is set (loopback too when the server binds loopback and trusts it), checked on
every connection, redirects included. A spec's ``sha256`` is checked against the file the URI names (an
archive before it is unpacked) before anything becomes visible.
"""

from __future__ import annotations

import errno
import hashlib
import importlib
import ipaddress
import os
import shutil
import socket
import threading
import uuid
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from urllib.parse import unquote, urlsplit

import fsspec
from fsspec.callbacks import Callback

from rayms import archives
from rayms.errors import StorageError
from rayms.ports import is_loopback_address

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


def fetch(uri: str, dest: Path, *, settings, cancel: threading.Event | None = None,
          sha256: str | None = None) -> Path:
    """Make the artifact at ``uri`` available locally and return its path (blocking; run it in a thread).

    Local URIs come back in place. Anything copied or unpacked lands in ``dest``, which appears atomically
    (a previous ``dest`` is replaced). ``cancel`` aborts between chunks, so an abandoned attempt (timed
    out by the caller) never replaces a newer one's result. ``sha256`` (hex) must match the file the URI
    names; it is not checked for local files used in place, which are not copied.
    """
    dest = Path(dest)
    try:
        local = in_place(uri, settings=settings)
        if local is not None:
            return local
        source = local_source(uri, settings=settings)
        if source is not None and not source.is_file():
            raise StorageError(f"{uri}: not found (404): {source} is not a file")
        job = _Job(uri=uri, settings=settings, cancel=cancel or threading.Event(), sha256=sha256)
        return _download(job, dest=dest, source=source)
    except StorageError:
        raise
    except Exception as exc:  # every backend error leaves through the one classifier
        raise classify(exc, uri=uri) from exc


@dataclass
class _Job:
    """One download: what it fetches, the settings bounding it, and the bytes it has brought so far."""

    uri: str
    settings: object
    cancel: threading.Event
    sha256: str | None = None
    received: int = field(default=0)  # bytes of the files finished so far

    def announce(self, size: int | None) -> None:
        """Refuse a download before its bytes are read when its announced size is over the limit."""
        if size is not None and self.received + size > self.settings.max_download_bytes:
            raise StorageError(f"{self.uri}: the artifact is {self.received + size} bytes, more than the "
                               f"{self.settings.max_download_bytes} allowed (max_download_bytes)")

    def callback(self) -> Callback:
        return _Transfer(self)


def _download(job: _Job, *, dest: Path, source: Path | None) -> Path:
    uri = job.uri
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.parent / f".{dest.name}.part-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        if source is not None:  # a local archive: check and unpack only
            _verify(source, job=job)
            _unpack(source, into=tmp, job=job)
            inner = ""
        elif scheme_of(uri) in ("http", "https"):
            inner = _copy_http(job, into=tmp)
        else:
            inner = _copy_fs(job, into=tmp)
        if job.cancel.is_set():
            raise StorageError(f"{uri}: download abandoned", transient=True)
        if dest.exists():  # an older copy: move it aside first, a directory cannot be replaced when full
            old = dest.parent / f".{dest.name}.old-{uuid.uuid4().hex[:8]}"
            os.replace(dest, old)
            shutil.rmtree(old, ignore_errors=True)
        os.replace(tmp, dest)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return dest / inner if inner else dest


class _Transfer(Callback):
    """fsspec progress callback of one file: aborts the transfer once the job is cancelled, or once the
    announced or received bytes would take the download past ``max_download_bytes``."""

    def __init__(self, job: _Job) -> None:
        super().__init__()
        self._job = job

    def call(self, *args, **kwargs):
        job = self._job
        if job.cancel.is_set():
            raise TimeoutError("download abandoned after its attempt timed out")
        job.announce(self.size)
        if job.received + self.value > job.settings.max_download_bytes:
            raise StorageError(f"{job.uri}: received more than the {job.settings.max_download_bytes} bytes "
                               "allowed (max_download_bytes)")


def _copy_http(job: _Job, *, into: Path) -> str:
    """One GET. Returns the relative name of the result inside ``into`` (``""``: ``into`` itself)."""
    uri = job.uri
    path = urlsplit(uri).path
    name = PurePosixPath(path).name
    if not name or path.endswith("/"):
        raise StorageError(f"{uri}: http URIs must name a file or an archive (HTTP has no folder listing)")
    import aiohttp  # present whenever the http backend is; for the per-read timeout

    timeout = job.settings.download_timeout_s
    fs = _filesystem(uri, timeout_s=timeout, client_timeout=aiohttp.ClientTimeout(
        total=None, sock_connect=timeout, sock_read=timeout), get_client=_guarded_client(job))
    return _store_file(fs, rpath=uri, name=name, into=into, job=job)


def _copy_fs(job: _Job, *, into: Path) -> str:
    """One object or a whole prefix of an object store."""
    uri = job.uri
    fs = _filesystem(uri, timeout_s=job.settings.download_timeout_s)
    root = fs._strip_protocol(uri).rstrip("/")
    if not root:
        raise StorageError(f"{uri}: bad URI: no bucket or container")
    info = fs.info(root)
    if info["type"] != "directory":
        job.announce(info.get("size"))
        return _store_file(fs, rpath=root, name=PurePosixPath(root).name, into=into, job=job)
    if job.sha256:
        raise StorageError(f"{uri}: sha256 is given but the URI names a folder; a digest can only be checked "
                           "for a URI naming one file or archive")
    found = {p: d for p, d in fs.find(root, detail=True).items() if d["type"] == "file" and not p.endswith("/")}
    if not found:
        raise StorageError(f"{uri}: not found (404): no objects under this prefix")
    job.announce(sum(d.get("size") or 0 for d in found.values()))
    for path in found:
        target = archives.inside(into, path[len(root):].lstrip("/"), uri=uri)
        target.parent.mkdir(parents=True, exist_ok=True)
        fs.get_file(path, str(target), callback=job.callback())
        job.received += target.stat().st_size
    return ""


def _store_file(fs, *, rpath: str, name: str, into: Path, job: _Job) -> str:
    if not is_archive(name):
        fs.get_file(rpath, str(into / name), callback=job.callback())
        _verify(into / name, job=job)
        return name
    archive = into.with_name(into.name + "-" + name)
    try:
        fs.get_file(rpath, str(archive), callback=job.callback())
        _verify(archive, job=job)  # before unpacking: unverified bytes are never unpacked
        _unpack(archive, into=into, job=job)
    finally:
        archive.unlink(missing_ok=True)
    return ""


def _verify(path: Path, *, job: _Job) -> None:
    """Check the spec's ``sha256`` against the file (a permanent error: the same bytes come back next time)."""
    if not job.sha256:
        return
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(2**20):
            if job.cancel.is_set():
                raise TimeoutError("download abandoned after its attempt timed out")
            digest.update(chunk)
    actual, expected = digest.hexdigest(), job.sha256.lower()
    if actual != expected:
        raise StorageError(f"{job.uri}: sha256 mismatch: expected {expected}, got {actual}")


def _unpack(archive: Path, *, into: Path, job: _Job) -> None:
    archives.unpack(archive, into=into, uri=job.uri, limits=archives.limits_of(job.settings))


# -- which addresses an http(s) download may connect to ---------------------------------------------------

def address_refusal(address: str, *, settings) -> str | None:
    """Why an http(s) download may not connect to the IP ``address``, or ``None`` when it may.

    Public (globally routable unicast) addresses are always allowed. Every other address (private,
    link-local such as the cloud metadata service at 169.254.169.254, loopback, shared, reserved, multicast)
    needs ``allow_private_http``; loopback is allowed as well when the server binds loopback and
    ``trust_loopback`` holds, since it then trusts the machine's users already. IPv4 addresses inside IPv6 (``::ffff:a.b.c.d``, NAT64) are judged
    as the IPv4 address they carry.
    """
    ip = ipaddress.ip_address(address.split("%", 1)[0])  # drop an IPv6 zone ("fe80::1%eth0")
    if ip.version == 6:
        if ip.ipv4_mapped is not None:
            ip = ip.ipv4_mapped
        elif ip in _NAT64:
            ip = ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF)
    if (ip.is_global and not ip.is_multicast) or settings.allow_private_http:
        return None
    if ip.is_loopback and settings.trust_loopback and is_loopback_address(settings.host):
        return None
    kind = ("a loopback" if ip.is_loopback else "a link-local" if ip.is_link_local else
            "a multicast" if ip.is_multicast else "a private or reserved")
    return f"{address} is {kind} address; set allow_private_http to download from it"


_NAT64 = ipaddress.ip_network("64:ff9b::/96")


def _guarded_client(job: _Job):
    """fsspec's ``get_client`` hook: an aiohttp session whose every socket is checked before it connects.

    The check sits in the connector's socket factory, so it sees the address actually dialled: after DNS,
    for IP literals too, and for each host a redirect leads to. Addresses are tried one after another (no
    happy-eyeballs race), so the first refusal ends the download with that reason."""

    def open_socket(addr_info) -> socket.socket:
        family, type_, proto, _, sockaddr = addr_info
        refusal = address_refusal(sockaddr[0], settings=job.settings)
        if refusal is not None:
            raise StorageError(f"{job.uri}: refusing to connect: {refusal}")
        return socket.socket(family=family, type=type_, proto=proto)

    async def get_client(**kwargs):
        import aiohttp

        connector = aiohttp.TCPConnector(socket_factory=open_socket, happy_eyeballs_delay=None)
        return aiohttp.ClientSession(connector=connector, **kwargs)

    return get_client


def remote_filesystem(uri: str, *, env: Mapping[str, str], timeout_s: float):
    """The fsspec filesystem and path of a remote ``uri``, for callers outside the node agents.

    ``env`` is laid over this process's environment, the way an agent's ``storage_env`` is: for S3 it
    supplies the endpoint and static credentials (``AWS_ACCESS_KEY_ID``, ``AWS_SECRET_ACCESS_KEY``,
    ``AWS_SESSION_TOKEN``, ``AWS_PROFILE``, ``AWS_REGION``). Other backends read their credentials from
    the process environment themselves.
    """
    try:
        fs = _filesystem(uri, timeout_s=timeout_s, env={**os.environ, **env}, explicit=env)
    except StorageError:
        raise
    except Exception as exc:  # a backend refusing its options: same classifier as a download
        raise classify(exc, uri=uri) from exc
    return fs, fs._strip_protocol(uri)


def _filesystem(uri: str, *, timeout_s: float, env: Mapping[str, str] | None = None,
                explicit: Mapping[str, str] | None = None, client_timeout=None, get_client=None):
    """A fresh filesystem per call: no instance shared between threads, no stale endpoint. ``env``: where the
    endpoint comes from (default: this process's environment); ``explicit``: credentials to pass as options;
    ``get_client``: fsspec's http session factory (:func:`_guarded_client`)."""
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
        options.update(_s3_options(os.environ if env is None else env, timeout_s=timeout_s, explicit=explicit or {}))
    if client_timeout is not None:
        options.setdefault("client_kwargs", {})["timeout"] = client_timeout
    if get_client is not None:
        options["get_client"] = get_client
    if protocol == "gcs" and os.environ.get("STORAGE_EMULATOR_HOST", "") not in ("", "default"):
        from gcsfs.core import GCSFileSystem  # the JSON API only (see the module docstring)

        return GCSFileSystem(token="anon", **options)
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
    filesystem = _filesystem(uri, timeout_s=settings.download_timeout_s)
    path = uri if scheme_of(uri) in ("http", "https") else filesystem._strip_protocol(uri).rstrip("/")
    return path, pafs.PyFileSystem(pafs.FSSpecHandler(filesystem))


# s3fs keyword for each credential variable, taken from an explicit mapping only: without one, botocore
# reads the same variables (and its other sources: profiles, web identity, instance metadata) itself.
_S3_CREDENTIALS = {"AWS_ACCESS_KEY_ID": "key", "AWS_SECRET_ACCESS_KEY": "secret", "AWS_SESSION_TOKEN": "token",
                   "AWS_PROFILE": "profile"}


def _s3_options(env: Mapping[str, str], *, timeout_s: float, explicit: Mapping[str, str]) -> dict:
    """Endpoint from the environment (botocore only knows the AWS_* names, KServe used S3_ENDPOINT)."""
    endpoint = env.get("AWS_ENDPOINT_URL_S3") or env.get("AWS_ENDPOINT_URL")
    if not endpoint and env.get("S3_ENDPOINT"):
        endpoint = env["S3_ENDPOINT"]
        if "://" not in endpoint:
            secure = env.get("S3_USE_HTTPS", "1").lower() not in ("0", "false", "no")
            endpoint = ("https://" if secure else "http://") + endpoint
    options: dict = {"config_kwargs": {"connect_timeout": timeout_s, "read_timeout": timeout_s}}
    if endpoint:
        options["endpoint_url"] = endpoint
    if env.get("AWS_ANONYMOUS_CREDENTIAL", "").lower() in ("1", "true", "yes"):
        options["anon"] = True
    options.update({keyword: explicit[name] for name, keyword in _S3_CREDENTIALS.items() if explicit.get(name)})
    region = explicit.get("AWS_REGION") or explicit.get("AWS_DEFAULT_REGION")
    if region:
        options["client_kwargs"] = {"region_name": region}
    return options


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
    """The HTTP status an aiohttp (``status``), Azure SDK (``status_code``) or botocore (``response``) error
    carries, if any."""
    for attribute in ("status", "status_code"):
        status = getattr(exc, attribute, None)
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
