"""The TrainedModel bridge cannot hang: a dead network path, a throttling or refusing API server and a failing
registry, each against the in-repo fake API server through the real ``kubernetes`` client.

The dead path is a TCP proxy of the test's own between the bridge and the fake API server: it can go
silent on the connections it holds (no byte passes, nothing is closed or reset), which is what a
black-holed connection looks like to a client, and can refuse to pass anything on new connections too.
"""

from __future__ import annotations

import asyncio
import socket
import threading
import time
from datetime import datetime, timedelta, timezone
from email.utils import format_datetime

import pytest
import yaml
from kubernetes import client
from kubernetes.client.exceptions import ApiException

from rayms.config import Settings
from rayms.errors import MemoryUnavailable
from rayms.k8s import TrainedModelBridge, connect
from rayms.k8s.client import KEEPALIVE_IDLE_S
from rayms.k8s.retry import Backoff, retry_after_s, retryable
from rayms.ports import free_port
from tests.fake_apiserver import FakeApiServer
from tests.support import DirectRegistry
from tests.test_k8s_bridge import CRD, NS, PLURAL, Harness, kserve_crd, tm

pytestmark = pytest.mark.timeout(90)


@pytest.fixture
def apiserver():
    server = FakeApiServer([CRD], crds=[kserve_crd()], bookmark_interval=0.2)
    server.start()
    yield server
    server.stop()


class SilentPath:
    """A TCP proxy to ``port`` that can stop passing bytes, as a black-holed network path does."""

    def __init__(self, port: int) -> None:
        self._upstream = port
        self.port = free_port()
        self._listener = socket.create_server(("127.0.0.1", self.port))
        self._lock = threading.Lock()
        self._links: list[dict] = []  # {"sockets": (client, upstream), "silent": bool}
        self._silent_from_now = False
        self._threads: list[threading.Thread] = []

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> "SilentPath":
        self._spawn(self._accept)
        return self

    def silence_open_connections(self) -> int:
        """Every connection open now passes nothing more (new ones still work); returns how many."""
        with self._lock:
            for link in self._links:
                link["silent"] = True
            return len(self._links)

    def silence_everything(self, silent: bool = True) -> None:
        """Also new connections are accepted and then pass nothing (``silent=False``: new ones work again)."""
        with self._lock:
            self._silent_from_now = silent
        if silent:
            self.silence_open_connections()

    def stop(self) -> None:
        try:
            self._listener.shutdown(socket.SHUT_RDWR)  # wakes the accepting thread
        except OSError:
            pass
        self._listener.close()
        with self._lock:
            links = list(self._links)
        for link in links:
            for sock in link["sockets"]:
                try:
                    sock.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
                sock.close()
        for thread in self._threads:
            thread.join(5)

    def _spawn(self, target, *args) -> None:
        thread = threading.Thread(target=target, args=args, daemon=True)
        self._threads.append(thread)
        thread.start()

    def _accept(self) -> None:
        while True:
            try:
                downstream, _ = self._listener.accept()
            except OSError:
                return  # stopped
            upstream = socket.create_connection(("127.0.0.1", self._upstream))
            with self._lock:
                link = {"sockets": (downstream, upstream), "silent": self._silent_from_now}
                self._links.append(link)
            self._spawn(self._pump, downstream, upstream, link)
            self._spawn(self._pump, upstream, downstream, link)

    @staticmethod
    def _pump(source: socket.socket, target: socket.socket, link: dict) -> None:
        while True:
            try:
                data = source.recv(65536)
            except OSError:
                return
            if not data:
                return
            if link["silent"]:
                continue  # swallowed: the sender sees nothing wrong, the receiver hears nothing
            try:
                target.sendall(data)
            except OSError:
                return


@pytest.fixture
def path(apiserver):
    proxy = SilentPath(apiserver.port).start()
    yield proxy
    proxy.stop()


class FlakyRegistry(DirectRegistry):
    """The real registry behind a client whose first ``failures`` register calls fail like an unreachable
    registry (the connection drops); counts every call per model."""

    def __init__(self, registry, failures: int = 0) -> None:
        super().__init__(registry)
        self.failures = failures
        self.calls: list[str] = []

    async def register(self, name, spec, source):
        self.calls.append(name)
        if self.failures:
            self.failures -= 1
            raise ConnectionError("registry replica restarting")
        return await super().register(name, spec, source)


class Bridge(Harness):
    """The bridge over ``api`` (default: straight to the fake) with bridge settings of the test's choosing;
    the test's own calls always go straight to the fake."""

    def __init__(self, apiserver, tmp_path, *, api=None, failures: int = 0, **settings) -> None:
        super().__init__(apiserver, tmp_path)
        self.settings = Settings(**{**self.settings.model_dump(), **settings})
        self.bridge_api = api or self.api
        self.client = FlakyRegistry(self.registry, failures)

    async def start_bridge(self) -> TrainedModelBridge:
        self.bridge = TrainedModelBridge(self.settings, registry=self.client, api=self.bridge_api, namespace=NS)
        await self.bridge.start()
        await asyncio.wait_for(self.bridge.synced.wait(), timeout=10)
        return self.bridge

    def status_patches(self, name: str) -> list:
        return [r for r in self.apiserver.requests
                if r.method == "PATCH" and r.path.endswith(f"/{PLURAL}/{name}/status")]

    def ready(self, name: str) -> bool:
        return self.condition(name, "Ready").get("status") == "True"


QUICK = {"bridge_request_timeout_s": 1.0, "bridge_watch_timeout_s": 2, "bridge_stale_after_s": 4.0}


def through(path: SilentPath, tmp_path, **settings) -> tuple[client.ApiClient, Settings]:
    """An API client made by the bridge's own ``connect`` from a kubeconfig that points at ``path``."""
    kubeconfig = tmp_path / "kubeconfig"
    kubeconfig.write_text(yaml.safe_dump({
        "apiVersion": "v1", "kind": "Config", "current-context": "via",
        "clusters": [{"name": "via", "cluster": {"server": path.url}}], "users": [{"name": "via", "user": {}}],
        "contexts": [{"name": "via", "context": {"cluster": "via", "user": "via", "namespace": NS}}]}))
    settings = Settings(kubeconfig=str(kubeconfig), **settings)
    return connect(settings)[0], settings


# -- the watch -------------------------------------------------------------------------------------------------

async def test_a_black_holed_watch_connection_is_replaced_within_its_read_limit(apiserver, path, tmp_path):
    api, _ = through(path, tmp_path, **QUICK)
    h = Bridge(apiserver, tmp_path, api=api, **QUICK)
    await h.start_bridge()
    await h.create(tm("before"))
    await h.until(lambda: h.ready("before"), what="before Ready")
    reconnects = h.bridge.stats()["reconnects"]

    assert path.silence_open_connections() >= 1  # the watch's connection among them: it hears nothing more
    await h.create(tm("after"))
    # Found dead after the watch's read limit (watch timeout 2 s + request timeout 1 s), replaced by a new
    # watch from the last resourceVersion, which brings the missed object; the status write on a silenced
    # pooled connection times out too and is retried on a fresh one.
    await h.until(lambda: "after" in h.registered(), timeout_s=15, what="the missed TrainedModel registered")
    await h.until(lambda: h.ready("after"), timeout_s=15, what="after Ready")
    assert h.bridge.stats()["reconnects"] > reconnects
    await h.bridge.stop()


async def test_a_watch_that_hears_nothing_fails_the_health_check_until_it_recovers(apiserver, path, tmp_path):
    api, _ = through(path, tmp_path, **QUICK)
    h = Bridge(apiserver, tmp_path, api=api, **QUICK)
    await h.start_bridge()
    h.bridge.check_health()  # healthy: bookmarks arrive every 0.2 s
    assert h.bridge.stats()["watch_age_s"] < QUICK["bridge_stale_after_s"]

    path.silence_everything()  # the network path is dead: nothing passes on old or new connections

    def unhealthy() -> str:
        try:
            h.bridge.check_health()
        except RuntimeError as exc:
            return str(exc)
        return ""

    await h.until(unhealthy, timeout_s=20, what="the health check to fail")
    assert "no list, event or bookmark" in unhealthy()

    path.silence_everything(False)  # the path heals; the watcher's next connection gets through
    await h.until(lambda: not unhealthy(), timeout_s=20, what="the health check to pass again")
    await h.create(tm("later"))
    await h.until(lambda: h.ready("later"), timeout_s=15, what="later Ready")
    await h.bridge.stop()


async def test_bookmarks_on_a_quiet_watch_count_as_signs_of_life(apiserver, tmp_path):
    h = Bridge(apiserver, tmp_path, bridge_watch_timeout_s=30)  # one long watch: no relist, no stream end
    await h.start_bridge()
    started = time.monotonic()
    while time.monotonic() - started < 1.5:  # the fake sends a bookmark every 0.2 s on an idle stream
        assert h.bridge.stats()["watch_age_s"] < 1.0
        await asyncio.sleep(0.05)
    assert h.bridge.stats()["relists"] == 1
    await h.bridge.stop()


def test_every_connection_has_tcp_keepalive(apiserver, tmp_path):
    kubeconfig = apiserver.write_kubeconfig(tmp_path / "kubeconfig")
    api, namespace = connect(Settings(kubeconfig=str(kubeconfig)))
    assert namespace == NS
    client.CustomObjectsApi(api).list_namespaced_custom_object("serving.rayms.io", "v1alpha1", NS, PLURAL,
                                                               _request_timeout=(5, 5))
    pool = api.rest_client.pool_manager.connection_from_url(apiserver.url)
    connection = pool.pool.queue[-1]  # the connection that just answered, back in the pool
    sock = connection.sock
    assert sock.getsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE) == 1
    if hasattr(socket, "TCP_KEEPIDLE"):
        assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE) == KEEPALIVE_IDLE_S
    assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) == 1, "urllib3's own option is kept"
    api.close()


def test_the_liveness_bound_must_exceed_a_quiet_watch():
    with pytest.raises(ValueError, match="bridge_stale_after_s"):
        Settings(bridge_watch_timeout_s=60, bridge_request_timeout_s=10, bridge_stale_after_s=70)


# -- registering -----------------------------------------------------------------------------------------------

async def test_a_failed_register_is_retried_and_only_then_counts_as_applied(apiserver, tmp_path):
    h = Bridge(apiserver, tmp_path, failures=2)
    await h.start_bridge()
    await h.create(tm("flaky"))
    await h.until(lambda: h.ready("flaky"), what="flaky Ready after two failed register calls")
    assert h.client.calls.count("flaky") == 3
    assert h.bridge.stats()["apply_retries"] == 2
    assert h.registry.get("flaky").state == "READY"

    # A refusal is final: shown in the status, never retried (the registry client delivers rayms errors as
    # they are: rayms.cluster.remote unwraps Ray's wrappers).
    await h.create(tm("toobig", memory="64Gi"))
    await h.until(lambda: h.condition("toobig", "MemoryResourceAvailable").get("status") == "False",
                  what="toobig refused")
    assert h.client.calls.count("toobig") == 1
    assert h.bridge.stats()["apply_retries"] == 2
    await h.bridge.stop()



# -- status writes ---------------------------------------------------------------------------------------------

async def test_a_throttled_status_write_waits_for_retry_after_without_holding_up_others(apiserver, tmp_path):
    h = Bridge(apiserver, tmp_path)
    await h.start_bridge()
    throttle = apiserver.inject_failure("patch", PLURAL, status=429, times=1, name="slow", subresource="status",
                                        retry_after=2)
    await h.create(tm("slow"))
    await h.until(lambda: throttle.hits == 1, what="the throttled write")
    await h.create(tm("other"))
    await h.until(lambda: h.ready("other"), what="other Ready")
    assert not h.ready("slow"), "the other object was written while this one waited"
    await h.until(lambda: h.ready("slow"), what="slow Ready after Retry-After")
    throttled, retried = h.status_patches("slow")[:2]
    assert throttled.status == 429 and retried.status == 200
    assert retried.at - throttled.at >= 2.0, "Retry-After: 2 is honoured"
    assert h.bridge.stats()["status_retries"] == 1
    await h.bridge.stop()


async def test_a_refused_status_write_is_not_repeated(apiserver, tmp_path):
    h = Bridge(apiserver, tmp_path)
    await h.start_bridge()
    await h.create(tm("denied"))
    await h.until(lambda: h.ready("denied"), what="denied Ready")
    apiserver.inject_failure("patch", PLURAL, status=403, times=None, name="denied", subresource="status")
    before = len(h.status_patches("denied"))
    await h.registry.unregister("denied", "kubernetes")  # one change of the status to write, refused
    await h.until(lambda: len(h.status_patches("denied")) > before, what="the refused write")
    # Nothing to poll for: a retry would come within 0.5 s (the old fixed pause) or 0.2 s (the first
    # backoff step), so a quiet 1.5 s shows there is none.
    await asyncio.sleep(1.5)
    refused = h.status_patches("denied")[before:]
    assert [r.status for r in refused] == [403]
    assert h.bridge.stats()["status_refused"] == 1 and h.bridge.stats()["status_retries"] == 0
    await h.bridge.stop()


async def test_server_errors_on_status_writes_back_off_and_then_succeed(apiserver, tmp_path):
    h = Bridge(apiserver, tmp_path)
    await h.start_bridge()
    failing = apiserver.inject_failure("patch", PLURAL, status=503, times=3, name="bumpy", subresource="status")
    await h.create(tm("bumpy"))
    await h.until(lambda: h.ready("bumpy"), what="bumpy Ready after three 503s")
    assert failing.hits == 3
    times = [r.at for r in h.status_patches("bumpy")[:4]]
    gaps = [b - a for a, b in zip(times, times[1:])]
    assert gaps[2] > 1.5 * gaps[0], f"the waits grow: {gaps}"
    await h.bridge.stop()


# -- the retry policy ------------------------------------------------------------------------------------------

def test_retry_policy():
    assert [retryable(ApiException(status=s)) for s in (400, 401, 403, 404, 409, 422, 429, 500, 503)] == [
        False, True, False, False, True, False, True, True, True]
    assert retryable(TimeoutError()) and retryable(ConnectionResetError())

    throttled = ApiException(status=429)
    throttled.headers = {"Retry-After": "7"}
    assert retry_after_s(throttled) == 7.0
    now = datetime(2030, 1, 1, tzinfo=timezone.utc)
    throttled.headers = {"Retry-After": format_datetime(now + timedelta(seconds=30), usegmt=True)}
    assert retry_after_s(throttled, now=now) == 30.0
    throttled.headers = {"Retry-After": "soon"}
    assert retry_after_s(throttled) is None
    assert retry_after_s(ApiException(status=500)) is None

    backoff = Backoff(first_s=0.2, cap_s=5.0)
    assert all(0.1 <= backoff.delay_s(1) <= 0.2 for _ in range(50))
    assert all(2.5 <= backoff.delay_s(20) <= 5.0 for _ in range(50))
