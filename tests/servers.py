"""Real local servers for storage tests: an HTTP file server with failure knobs, moto's S3 server, and the
GCS and Azure Blob emulators (gcp-storage-emulator from PyPI, Azurite from npm; ``.ci/setup`` installs both).

Mocks of fsspec would test our assumptions about fsspec; these test fsspec, aiohttp, botocore, gcsfs and
adlfs as they behave on the wire. Everything binds 127.0.0.1 on a free port outside the ephemeral range, and
every process started here is stopped by its pid. No ``time.sleep`` anywhere: waits poll a condition against
a deadline.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from collections.abc import Iterator
from typing import Callable

from rayms.ports import free_port

REPO = Path(__file__).resolve().parents[1]


def wait_until(condition: Callable[[], bool], *, timeout_s: float = 10.0, what: str = "condition") -> None:
    """Poll ``condition`` (blocking) until it holds; fail after ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    ready = threading.Event()
    while not condition():
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out waiting for {what}")
        ready.wait(0.01)


class _QuietServer(ThreadingHTTPServer):
    daemon_threads = True

    def handle_error(self, request, client_address) -> None:
        if not isinstance(sys.exc_info()[1], (ConnectionError, TimeoutError)):  # clients hanging up is normal
            super().handle_error(request, client_address)


class FileServer:
    """Threaded HTTP server of in-memory files, with per-path failure modes.

    * ``fail(path, status, times=n)``: the first ``n`` GETs answer ``status`` (``times=None``: always).
    * ``truncate(path)``: announce the full length, send half, close: a broken transfer.
    * ``chunked(path)``: send the file with chunked transfer encoding, no length announced.
    * ``redirect(path, location)``: answer 302 to ``location``.
    * ``hold()`` / ``release(n)``: responses wait for a permit (``release()`` with no count opens the gate);
      ``delay_s`` holds each response for a fixed time instead. ``in_flight`` and ``peak`` count requests
      being answered at once.
    """

    def __init__(self) -> None:
        self.files: dict[str, bytes] = {}
        self.requests: Counter[str] = Counter()
        self.delay_s = 0.0
        self.in_flight = 0
        self.peak = 0
        self._failures: dict[str, list] = {}
        self._truncated: set[str] = set()
        self._chunked: set[str] = set()
        self._redirects: dict[str, str] = {}
        self._permits: int | None = None  # None: no hold
        self._cond = threading.Condition()
        self._httpd = _QuietServer(("127.0.0.1", 0), self._handler())
        self._thread = threading.Thread(target=self._httpd.serve_forever, kwargs={"poll_interval": 0.02},
                                        name="file-server", daemon=True)

    @property
    def port(self) -> int:
        return self._httpd.server_address[1]

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.port}/{path.lstrip('/')}"

    def add(self, path: str, data: bytes) -> str:
        self.files["/" + path.lstrip("/")] = data
        return self.url(path)

    def fail(self, path: str, status: int, *, times: int | None = None) -> None:
        self._failures["/" + path.lstrip("/")] = [status, times]

    def truncate(self, path: str) -> None:
        self._truncated.add("/" + path.lstrip("/"))

    def chunked(self, path: str) -> None:
        self._chunked.add("/" + path.lstrip("/"))

    def redirect(self, path: str, location: str) -> str:
        self._redirects["/" + path.lstrip("/")] = location
        return self.url(path)

    def hold(self) -> None:
        with self._cond:
            self._permits = 0

    def release(self, count: int | None = None) -> None:
        with self._cond:
            self._permits = None if count is None else (self._permits or 0) + count
            self._cond.notify_all()

    def start(self) -> "FileServer":
        self._thread.start()
        return self

    def stop(self) -> None:
        self.release()
        self._httpd.shutdown()
        self._httpd.server_close()
        self._thread.join(timeout=10)

    def __enter__(self) -> "FileServer":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    def _answer(self, handler: BaseHTTPRequestHandler, *, body: bool) -> None:
        path = handler.path.split("?", 1)[0]
        with self._cond:
            self.requests[path] += 1
            self.in_flight += 1
            self.peak = max(self.peak, self.in_flight)
        try:
            self._wait_turn()
            failure = self._failures.get(path)
            if failure and (failure[1] is None or failure[1] > 0):
                if failure[1] is not None:
                    failure[1] -= 1
                self._send(handler, status=failure[0], data=b"failure on purpose\n", body=body)
            elif path in self._redirects:
                handler.send_response(302)
                handler.send_header("Location", self._redirects[path])
                handler.send_header("Content-Length", "0")
                handler.end_headers()
            elif path not in self.files:
                self._send(handler, status=404, data=b"no such file\n", body=body)
            elif path in self._chunked:
                data = self.files[path]
                handler.send_response(200)
                handler.send_header("Transfer-Encoding", "chunked")
                handler.end_headers()
                for start in range(0, len(data), 2**16):
                    piece = data[start:start + 2**16]
                    handler.wfile.write(b"%x\r\n%s\r\n" % (len(piece), piece))
                handler.wfile.write(b"0\r\n\r\n")
            elif path in self._truncated:
                data = self.files[path]
                handler.send_response(200)
                handler.send_header("Content-Length", str(len(data)))
                handler.end_headers()
                handler.wfile.write(data[: len(data) // 2])
                handler.wfile.flush()
                handler.close_connection = True
            else:
                self._send(handler, status=200, data=self.files[path], body=body)
        finally:
            with self._cond:
                self.in_flight -= 1

    def _wait_turn(self) -> None:
        with self._cond:
            if self.delay_s:
                self._cond.wait_for(lambda: False, timeout=self.delay_s)
            self._cond.wait_for(lambda: self._permits is None or self._permits > 0, timeout=60)
            if self._permits:
                self._permits -= 1

    @staticmethod
    def _send(handler: BaseHTTPRequestHandler, *, status: int, data: bytes, body: bool) -> None:
        handler.send_response(status)
        handler.send_header("Content-Type", "application/octet-stream")
        handler.send_header("Content-Length", str(len(data)))
        handler.end_headers()
        if body:
            handler.wfile.write(data)

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        server = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_GET(self) -> None:  # noqa: N802 (http.server's naming)
                server._answer(self, body=True)

            def do_HEAD(self) -> None:  # noqa: N802
                server._answer(self, body=False)

            def log_message(self, *args) -> None:
                pass

        return Handler


class ServerProcess:
    """A storage server run as a subprocess on 127.0.0.1:``port``; subclasses give its command line."""

    name = "server"

    def __init__(self) -> None:
        self.port = free_port()
        self.endpoint = f"http://127.0.0.1:{self.port}"
        self._proc: subprocess.Popen | None = None
        self._workdir: tempfile.TemporaryDirectory | None = None

    def command(self) -> list[str]:
        raise NotImplementedError

    def environment(self) -> dict[str, str]:
        return dict(os.environ)

    def start(self, *, timeout_s: float = 60) -> "ServerProcess":
        self._workdir = tempfile.TemporaryDirectory(prefix=f"rayms-{self.name}-")  # whatever it writes goes here
        self._proc = subprocess.Popen(self.command(), cwd=self._workdir.name, stdout=subprocess.DEVNULL,
                                      stderr=subprocess.DEVNULL, env=self.environment())
        try:
            wait_until(self._accepting, timeout_s=timeout_s, what=f"{self.name} on port {self.port}")
        except BaseException:
            self.stop()
            raise
        return self

    def stop(self) -> None:
        if self._proc is not None:
            self._proc.terminate()
            try:
                self._proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait(timeout=10)
            self._proc = None
        if self._workdir is not None:
            self._workdir.cleanup()
            self._workdir = None

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc else None

    def _accepting(self) -> bool:
        if self._proc is not None and self._proc.poll() is not None:
            raise RuntimeError(f"{self.name} exited with {self._proc.returncode}")
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", self.port), timeout=0.5):
            return True
        return False


class MotoS3(ServerProcess):
    """moto's standalone S3 server, with helpers to fill buckets."""

    name = "moto"

    def command(self) -> list[str]:
        return [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(self.port)]

    def environment(self) -> dict[str, str]:
        return {**os.environ, **credentials()}

    def client(self):
        import boto3  # comes with moto

        return boto3.client("s3", endpoint_url=self.endpoint, region_name="us-east-1",
                            aws_access_key_id="testing", aws_secret_access_key="testing")

    def bucket(self, name: str, files: dict[str, bytes] | None = None) -> str:
        """Create bucket ``name`` holding ``files`` (key -> bytes); return ``s3://name``."""
        client = self.client()
        with contextlib.suppress(client.exceptions.BucketAlreadyOwnedByYou):
            client.create_bucket(Bucket=name)
        for key, data in (files or {}).items():
            client.put_object(Bucket=name, Key=key, Body=data)
        return f"s3://{name}"


class GcsEmulator(ServerProcess):
    """gcp-storage-emulator (Google Cloud Storage's JSON API, in memory)."""

    name = "gcp-storage-emulator"
    scheme = "gs"

    @staticmethod
    def missing() -> str | None:
        """Why the emulator cannot run here, or ``None``."""
        import importlib.util

        if importlib.util.find_spec("gcp_storage_emulator") is None:
            return "gcp-storage-emulator is not installed (bash .ci/setup installs it)"
        return None

    def command(self) -> list[str]:
        return [sys.executable, "-m", "gcp_storage_emulator", "start", "--host", "127.0.0.1",
                "--port", str(self.port), "--in-memory", "--quiet"]

    def env(self) -> dict[str, str]:
        """What a client needs to reach the emulator. google-auth would probe the metadata server for
        credentials when it looks for them; pointing that at a closed loopback port keeps it on this machine."""
        return {"STORAGE_EMULATOR_HOST": self.endpoint, "NO_GCE_CHECK": "true",
                "GCE_METADATA_HOST": "127.0.0.1:9", "GCE_METADATA_IP": "127.0.0.1:9"}

    def filesystem(self):
        from gcsfs.core import GCSFileSystem  # the JSON-API filesystem, as rayms.storage uses for emulators

        return GCSFileSystem(endpoint_url=self.endpoint, token="anon", skip_instance_cache=True)

    def bucket(self, name: str, files: dict[str, bytes] | None = None) -> str:
        """Create bucket ``name`` holding ``files`` (key -> bytes); return ``gs://name``."""
        return _fill(self.filesystem(), name, files or {}, scheme=self.scheme)


AZURITE_ACCOUNT = "devstoreaccount1"
# Azurite's fixed development account key, published in its documentation (not a secret).
AZURITE_KEY = "Eby8vdM02xNOcqFlqUwJPLlmEtlCDXJ1OUzFT50uSRZ6IFsuFq2UVErCz4I6tq/K1SZFPTOtr/KBHBeksoGMGw=="


class Azurite(ServerProcess):
    """Azurite's Blob service (in memory; telemetry, which Azurite sends off the machine by default, off).
    ``.ci/setup`` installs the version it names with npm."""

    name = "azurite"
    scheme = "az"

    @staticmethod
    def binary() -> str | None:
        local = REPO / ".venv" / "node" / "node_modules" / ".bin" / "azurite-blob"
        return str(local) if local.is_file() else shutil.which("azurite-blob")

    @classmethod
    def missing(cls) -> str | None:
        if cls.binary() is None:
            return ("Azurite is not installed: bash .ci/setup installs it with npm into .venv/node "
                    "(or put azurite-blob on PATH)")
        return None

    def command(self) -> list[str]:
        return [self.binary(), "--blobHost", "127.0.0.1", "--blobPort", str(self.port), "--inMemoryPersistence",
                "--disableTelemetry", "--silent", "--skipApiVersionCheck"]

    def env(self) -> dict[str, str]:
        return {"AZURE_STORAGE_CONNECTION_STRING": (
            f"DefaultEndpointsProtocol=http;AccountName={AZURITE_ACCOUNT};AccountKey={AZURITE_KEY};"
            f"BlobEndpoint={self.endpoint}/{AZURITE_ACCOUNT};")}

    def filesystem(self):
        from adlfs import AzureBlobFileSystem

        return AzureBlobFileSystem(connection_string=self.env()["AZURE_STORAGE_CONNECTION_STRING"],
                                   skip_instance_cache=True)

    def bucket(self, name: str, files: dict[str, bytes] | None = None) -> str:
        """Create container ``name`` holding ``files`` (blob name -> bytes); return ``az://name``."""
        return _fill(self.filesystem(), name, files or {}, scheme=self.scheme)


def _fill(fs, bucket: str, files: dict[str, bytes], *, scheme: str) -> str:
    if not fs.exists(bucket):
        fs.mkdir(bucket)
    if files:
        fs.pipe({f"{bucket}/{key}": data for key, data in files.items()})
    return f"{scheme}://{bucket}"


class Emulators:
    """The GCS and Azure emulators, each started on first use and kept for the test session.

    ``get(kind)`` gives the running emulator, or ``None`` when it is not installed here (``missing[kind]`` then
    says why); ``env()`` is what rayms's storage needs to reach every emulator that runs."""

    KINDS: dict[str, type[ServerProcess]] = {"gcs": GcsEmulator, "azure": Azurite}

    def __init__(self) -> None:
        self._running: dict[str, ServerProcess] = {}
        self.missing: dict[str, str] = {}

    def get(self, kind: str):
        if kind not in self._running and kind not in self.missing:
            cls = self.KINDS[kind]
            reason = cls.missing()
            if reason:
                self.missing[kind] = reason
            else:
                self._running[kind] = cls().start()
        return self._running.get(kind)

    def env(self) -> dict[str, str]:
        env: dict[str, str] = {}
        for kind in self.KINDS:
            server = self.get(kind)
            if server is not None:
                env |= server.env()
        return env

    def stop(self) -> None:
        for server in self._running.values():
            server.stop()
        self._running.clear()


def credentials() -> dict[str, str]:
    """Fake AWS settings that keep botocore off real credentials and off the metadata service."""
    return {
        "AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_SESSION_TOKEN": "testing",
        "AWS_DEFAULT_REGION": "us-east-1", "AWS_REGION": "us-east-1", "AWS_EC2_METADATA_DISABLED": "true",
        "AWS_CONFIG_FILE": os.devnull, "AWS_SHARED_CREDENTIALS_FILE": os.devnull,
    }


def write_tree(root: Path, files: dict[str, bytes]) -> Path:
    for name, data in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_bytes(data)
    return root


@contextlib.contextmanager
def rayms_serve(args: list[str], *, log: Path, env: dict[str, str] | None = None,
                timeout_s: float = 240.0) -> Iterator[subprocess.Popen]:
    """``rayms serve ARGS`` as a user starts it (its own Ray, HAProxy in front), until it says it is serving;
    stopped with Ctrl-C (SIGINT) afterwards, and killed with its process group if that does not end it."""
    env = {**os.environ, **(env or {})}
    env.pop("RAY_ADDRESS", None)
    with log.open("w") as out:
        process = subprocess.Popen([sys.executable, "-m", "rayms.cli", "serve", *args], stdout=out,
                                   stderr=subprocess.STDOUT, env=env, start_new_session=True)
    try:
        wait_until(lambda: "is serving" in log.read_text() or process.poll() is not None, timeout_s=timeout_s,
                   what="rayms serve to start")
        assert process.poll() is None, log.read_text()[-3000:]
        yield process
    finally:
        if process.poll() is None:
            process.send_signal(signal.SIGINT)
            try:
                process.wait(timeout=90)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait()
