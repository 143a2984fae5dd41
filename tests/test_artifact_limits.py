"""Artifacts with limits: download size, archive bombs, integrity, private addresses and the node cache's quota.

Every refusal here is what a user meets when a load fails: a permanent :class:`StorageError` (no retry) whose
message names the URI and the limit with its setting. Downloads go to real local servers (HTTP and moto S3 on
127.0.0.1); no test sends a byte off the machine: the private-address tests point at addresses that are
refused before a socket connects, and would reach only this machine if they were not.
"""

from __future__ import annotations

import asyncio
import gzip
import hashlib
import io
import socket
import tarfile
import zipfile
from pathlib import Path

import pytest

from rayms import storage
from rayms.agent import ArtifactAgent
from rayms.config import ModelSpec, Settings
from rayms.errors import StorageError
from tests.servers import FileServer, MotoS3, credentials

pytestmark = pytest.mark.timeout(60)


@pytest.fixture
def settings(tmp_path: Path) -> Settings:
    return Settings(cache_dir=str(tmp_path / "cache"), download_attempts=3, download_backoff_s=0.01,
                    download_timeout_s=10)


@pytest.fixture
def http():
    with FileServer() as server:
        yield server


def spec(uri: str, **extra) -> ModelSpec:
    return ModelSpec(storage_uri=uri, framework="sklearn", **extra)


def tgz(files: dict[str, bytes], **pax) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz", format=tarfile.PAX_FORMAT) as tf:
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size, info.pax_headers = len(data), dict(pax)
            tf.addfile(info, io.BytesIO(data))
    return buffer.getvalue()


def tar_header_only(name: str, size: int) -> bytes:
    """A gzipped tar whose one member declares ``size`` bytes and carries none: a bomb's first block."""
    info = tarfile.TarInfo(name)
    info.size = size
    return gzip.compress(info.tobuf(format=tarfile.GNU_FORMAT))


def zip_of(files: dict[str, bytes]) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as zf:
        for name, data in files.items():
            zf.writestr(name, data)
    return buffer.getvalue()


def refused(uri: str, settings: Settings, tmp_path: Path, **kwargs) -> StorageError:
    with pytest.raises(StorageError) as caught:
        storage.fetch(uri, tmp_path / "out", settings=settings, **kwargs)
    assert uri in str(caught.value) and not caught.value.transient
    assert not (tmp_path / "out").exists()
    assert not [p for p in tmp_path.iterdir() if ".part-" in p.name]  # no partial folder left behind
    return caught.value


# -- download size ---------------------------------------------------------------------------------------------

def test_a_download_announced_over_the_limit_is_refused_before_reading(http: FileServer, settings: Settings,
                                                                       tmp_path: Path) -> None:
    uri = http.add("m/model.joblib", b"w" * 5000)
    error = refused(uri, settings.model_copy(update={"max_download_bytes": 4096}), tmp_path)
    assert "the artifact is 5000 bytes, more than the 4096 allowed (max_download_bytes)" in str(error)
    assert storage.fetch(uri, tmp_path / "ok", settings=settings).read_bytes() == b"w" * 5000


def test_a_download_with_no_length_is_stopped_while_reading(http: FileServer, settings: Settings,
                                                            tmp_path: Path) -> None:
    uri = http.add("m/model.joblib", b"w" * 2**20)
    http.chunked("m/model.joblib")
    error = refused(uri, settings.model_copy(update={"max_download_bytes": 100_000}), tmp_path)
    assert "received more than the 100000 bytes allowed (max_download_bytes)" in str(error)


def test_the_agent_does_not_retry_a_download_over_the_limit(http: FileServer, settings: Settings) -> None:
    uri = http.add("m/model.joblib", b"w" * 5000)
    agent = ArtifactAgent(settings.model_copy(update={"max_download_bytes": 4096}))
    with pytest.raises(StorageError, match="max_download_bytes") as caught:
        asyncio.run(agent.fetch("big", spec(uri)))
    assert not caught.value.transient and http.requests["/m/model.joblib"] == 1


def test_an_s3_folder_over_the_limit_is_refused_before_any_object_is_copied(
        tmp_path: Path, settings: Settings, monkeypatch: pytest.MonkeyPatch) -> None:
    moto = MotoS3().start()
    try:
        for key, value in credentials().items():
            monkeypatch.setenv(key, value)
        monkeypatch.setenv("AWS_ENDPOINT_URL_S3", moto.endpoint)
        bucket = moto.bucket("limits", {"big/a.bin": b"a" * 3000, "big/b.bin": b"b" * 3000})
        limited = settings.model_copy(update={"max_download_bytes": 5000})
        error = refused(f"{bucket}/big/", limited, tmp_path)
        assert "the artifact is 6000 bytes, more than the 5000 allowed" in str(error)
        assert sorted(p.name for p in storage.fetch(f"{bucket}/big/", tmp_path / "ok", settings=settings).iterdir()) \
            == ["a.bin", "b.bin"]
    finally:
        moto.stop()


# -- archives --------------------------------------------------------------------------------------------------

def test_a_tar_member_declaring_20_gib_is_refused_before_its_data_is_read(tmp_path: Path,
                                                                          settings: Settings) -> None:
    bomb = tmp_path / "bomb.tar.gz"
    bomb.write_bytes(tar_header_only("model.joblib", 20 * 2**30))  # a few hundred bytes on disk
    error = refused(str(bomb), settings, tmp_path)
    assert f"refusing member 'model.joblib': the archive unpacks to more than {8 * 2**30} bytes " \
           "(max_unpacked_bytes)" in str(error)


def test_an_archive_that_inflates_past_the_limit_is_stopped_while_unpacking(tmp_path: Path,
                                                                            settings: Settings) -> None:
    # The member's header is small and honest; what inflates is a 40 MiB pax record read before it.
    bomb = tmp_path / "pax.tgz"
    bomb.write_bytes(tgz({"model.joblib": b"w"}, comment="x" * (40 * 2**20)))
    assert bomb.stat().st_size < 100_000
    error = refused(str(bomb), settings.model_copy(update={"max_unpacked_bytes": 2**20}), tmp_path)
    assert "refusing the archive: the archive unpacked more than 1048576 bytes (max_unpacked_bytes)" in str(error)
    error = refused(str(bomb), settings, tmp_path)  # within the size limits: the header cap stops it
    assert "refusing the archive: its headers take more than 33554432 bytes" in str(error)


@pytest.mark.parametrize("kind", ["tgz", "zip"])
def test_compression_ratio_and_member_count_are_limited(tmp_path: Path, settings: Settings, kind: str) -> None:
    pack = tgz if kind == "tgz" else zip_of
    zeros = tmp_path / f"zeros.{kind}"
    zeros.write_bytes(pack({"model.joblib": bytes(10 * 2**20)}))  # 10 MiB of zeros in about 10 KiB
    error = refused(str(zeros), settings.model_copy(update={"max_archive_ratio": 5}), tmp_path)
    assert "refusing member 'model.joblib': the archive unpacks to more than 5 times its own size " \
           "(max_archive_ratio)" in str(error)
    assert (storage.fetch(str(zeros), tmp_path / "fine", settings=settings) / "model.joblib").stat().st_size \
        == 10 * 2**20

    many = tmp_path / f"many.{kind}"
    many.write_bytes(pack({f"f{i}.txt": b"x" for i in range(11)}))
    error = refused(str(many), settings.model_copy(update={"max_archive_members": 10}), tmp_path)
    assert "refusing member 'f10.txt': the archive has more than 10 members (max_archive_members)" in str(error)


def test_a_remote_archive_is_limited_too(http: FileServer, settings: Settings, tmp_path: Path) -> None:
    uri = http.add("m.tar.gz", tar_header_only("model.joblib", 20 * 2**30))
    error = refused(uri, settings, tmp_path)
    assert "(max_unpacked_bytes)" in str(error)


# -- sha256 ----------------------------------------------------------------------------------------------------

def test_sha256_is_checked_before_anything_is_used(http: FileServer, settings: Settings, tmp_path: Path) -> None:
    data = b"weights"
    good, wrong = hashlib.sha256(data).hexdigest(), hashlib.sha256(b"other").hexdigest()
    uri = http.add("m/model.joblib", data)
    assert storage.fetch(uri, tmp_path / "a", settings=settings, sha256=good.upper()).read_bytes() == data
    error = refused(uri, settings, tmp_path, sha256=wrong)
    assert f"sha256 mismatch: expected {wrong}, got {good}" in str(error)

    archive = tgz({"model.joblib": data})
    packed = http.add("m.tgz", archive)  # an archive's digest is the packed file's, checked before unpacking
    assert (storage.fetch(packed, tmp_path / "b", settings=settings,
                          sha256=hashlib.sha256(archive).hexdigest()) / "model.joblib").read_bytes() == data
    error = refused(packed, settings, tmp_path, sha256=good)
    assert f"expected {good}, got {hashlib.sha256(archive).hexdigest()}" in str(error)


def test_the_agent_fails_a_mismatching_sha256_once_and_caches_nothing(http: FileServer, settings: Settings) -> None:
    uri = http.add("m/model.joblib", b"weights")
    wrong = spec(uri, sha256="0" * 64)
    agent = ArtifactAgent(settings)
    with pytest.raises(StorageError, match="sha256 mismatch: expected 0{64}, got ") as caught:
        asyncio.run(agent.fetch("m", wrong))
    assert not caught.value.transient and http.requests["/m/model.joblib"] == 1
    assert not (agent.entry(wrong) / ".complete").exists()
    right = spec(uri, sha256=hashlib.sha256(b"weights").hexdigest())
    assert right.digest() != spec(uri).digest()  # a digest is part of the cache key
    assert Path(asyncio.run(agent.fetch("m", right))).read_bytes() == b"weights"


# -- private addresses ---------------------------------------------------------------------------------------

@pytest.mark.parametrize(("address", "bind", "allowed"), [
    ("93.184.215.14", "0.0.0.0", True), ("2606:4700::1", "0.0.0.0", True),
    ("169.254.169.254", "0.0.0.0", False), ("169.254.169.254", "127.0.0.1", False),
    ("10.0.0.7", "0.0.0.0", False), ("192.168.1.2", "127.0.0.1", False), ("172.16.0.1", "0.0.0.0", False),
    ("100.64.0.1", "0.0.0.0", False), ("0.0.0.0", "127.0.0.1", False), ("224.0.0.1", "0.0.0.0", False),
    ("fd00::1", "0.0.0.0", False), ("fe80::1%eth0", "0.0.0.0", False), ("::", "0.0.0.0", False),
    ("::ffff:10.0.0.7", "0.0.0.0", False), ("64:ff9b::a00:7", "0.0.0.0", False),
    ("127.0.0.1", "0.0.0.0", False), ("::1", "0.0.0.0", False), ("::ffff:127.0.0.1", "0.0.0.0", False),
    ("127.0.0.1", "127.0.0.1", True), ("::1", "localhost", True), ("127.0.0.2", "::1", True),
])
def test_which_addresses_a_download_may_connect_to(address: str, bind: str, allowed: bool) -> None:
    refusal = storage.address_refusal(address, settings=Settings(host=bind))
    assert (refusal is None) == allowed, refusal
    if not allowed:
        assert address in refusal and "allow_private_http" in refusal
        assert storage.address_refusal(address, settings=Settings(host=bind, allow_private_http=True)) is None
    elif address not in ("93.184.215.14", "2606:4700::1"):  # loopback on a loopback bind: trusted by rule only
        assert storage.address_refusal(address, settings=Settings(host=bind, trust_loopback=False))


@pytest.mark.parametrize("host", ["127.0.0.1", "localhost"])
def test_a_server_bound_to_all_interfaces_refuses_loopback_downloads_at_connect_time(
        http: FileServer, settings: Settings, tmp_path: Path, host: str) -> None:
    uri = http.add("m/model.joblib", b"w").replace("127.0.0.1", host)
    exposed = settings.model_copy(update={"host": "0.0.0.0"})
    error = refused(uri, exposed, tmp_path)
    assert "refusing to connect: " in str(error) and "is a loopback address; set allow_private_http" in str(error)
    assert sum(http.requests.values()) == 0  # no request reached the server
    agent = ArtifactAgent(exposed)
    with pytest.raises(StorageError, match="refusing to connect"):
        asyncio.run(agent.fetch("m", spec(uri)))
    assert sum(http.requests.values()) == 0  # and the agent did not retry it
    allowed = exposed.model_copy(update={"allow_private_http": True})
    assert storage.fetch(uri, tmp_path / "ok", settings=allowed).read_bytes() == b"w"


def test_a_redirect_to_a_refused_address_is_refused(http: FileServer, settings: Settings, tmp_path: Path) -> None:
    # Loopback is allowed (the server binds loopback); the redirect leads to 0.0.0.0, which is not. Were the
    # check missing, the connection would reach this machine's own port, nothing else.
    with FileServer() as target:
        target.add("model.joblib", b"w")
        uri = http.redirect("m/model.joblib", f"http://0.0.0.0:{target.port}/model.joblib")
        error = refused(uri, settings, tmp_path)
        assert "refusing to connect: 0.0.0.0 is a private or reserved address" in str(error)
        assert http.requests["/m/model.joblib"] == 1 and sum(target.requests.values()) == 0
        allowed = settings.model_copy(update={"allow_private_http": True})
        assert storage.fetch(uri, tmp_path / "ok", settings=allowed).read_bytes() == b"w"


def test_refusal_happens_before_any_socket_connects(monkeypatch: pytest.MonkeyPatch, settings: Settings,
                                                    tmp_path: Path) -> None:
    connects: list[object] = []
    real_connect = asyncio.selector_events.BaseSelectorEventLoop.sock_connect

    async def counting_connect(loop, sock: socket.socket, address):
        connects.append(address)
        return await real_connect(loop, sock, address)

    monkeypatch.setattr(asyncio.selector_events.BaseSelectorEventLoop, "sock_connect", counting_connect)
    error = refused("http://0.0.0.0:1/model.joblib", settings, tmp_path)  # nothing listens on port 1
    assert "refusing to connect: 0.0.0.0 is a private or reserved address" in str(error)
    assert connects == []
    with pytest.raises(StorageError, match="network error"):  # the counter sees a connect that is allowed
        storage.fetch("http://127.0.0.1:1/model.joblib", tmp_path / "out", settings=settings)
    assert [address[:2] for address in connects] == [("127.0.0.1", 1)]


# -- the node cache's quota ----------------------------------------------------------------------------------

def cache_of(agent: ArtifactAgent) -> list[str]:
    """The digests of the complete entries in the agent's cache."""
    root = agent.entry(spec("/any")).parent
    return sorted(p.name for p in root.iterdir() if (p / ".complete").exists())


def test_over_the_quota_the_least_recently_fetched_entry_goes_first(http: FileServer, settings: Settings) -> None:
    uris = {name: http.add(f"{name}/model.joblib", b"w" * 100) for name in "abcd"}
    agent = ArtifactAgent(settings.model_copy(update={"artifact_cache_bytes": 350}))
    key = {name: spec(uri).digest() for name, uri in uris.items()}

    async def load(name: str) -> None:  # what a replica does: fetch, read, release
        await agent.fetch(name, spec(uris[name]))
        await agent.release(name, spec(uris[name]))

    async def main() -> None:
        for name in "abc":
            await load(name)
        assert cache_of(agent) == sorted(key[n] for n in "abc")
        await load("a")  # a cache hit: "a" is now the most recently used
        await load("d")  # 400 bytes > 350: the least recently fetched ("b") goes
        assert cache_of(agent) == sorted(key[n] for n in "acd")

    asyncio.run(main())
    assert http.requests["/a/model.joblib"] == 1 and agent.stats()["entries_removed"] == 1


def test_an_entry_a_load_is_reading_is_never_removed(http: FileServer, settings: Settings) -> None:
    uris = {name: http.add(f"{name}/model.joblib", b"w" * 100) for name in "abc"}
    agent = ArtifactAgent(settings.model_copy(update={"artifact_cache_bytes": 150}))

    async def main() -> None:
        await agent.fetch("a", spec(uris["a"]))  # "a" is being loaded: no release yet
        await agent.fetch("b", spec(uris["b"]))
        assert len(cache_of(agent)) == 2  # over the quota, but both are in use
        await agent.release("a", spec(uris["a"]))  # the load of "a" ends: now it can go
        assert cache_of(agent) == [spec(uris["b"]).digest()]
        await agent.release("b", spec(uris["b"]))
        await agent.fetch("c", spec(uris["c"]))
        assert cache_of(agent) == [spec(uris["c"]).digest()]

    asyncio.run(main())


def test_a_load_that_never_releases_protects_its_entry_for_load_timeout_s(http: FileServer,
                                                                         settings: Settings) -> None:
    uris = {name: http.add(f"{name}/model.joblib", b"w" * 100) for name in "ab"}
    agent = ArtifactAgent(settings.model_copy(update={"artifact_cache_bytes": 150, "load_timeout_s": 0.05}))

    async def main() -> None:
        await agent.fetch("a", spec(uris["a"]))  # never released, e.g. its replica died mid-load
        await asyncio.sleep(0.1)  # past load_timeout_s: the pin has expired
        await agent.fetch("b", spec(uris["b"]))
        assert cache_of(agent) == [spec(uris["b"]).digest()]

    asyncio.run(main())


def test_a_replaced_version_is_removed_once_no_load_needs_it(http: FileServer, settings: Settings) -> None:
    old, new = http.add("v1/model.joblib", b"old"), http.add("v2/model.joblib", b"new")
    shared = http.add("shared/model.joblib", b"s")
    agent = ArtifactAgent(settings)  # far under the quota: only replacement removes anything

    async def main() -> None:
        await agent.fetch("m", spec(old))
        await agent.release("m", spec(old))
        await agent.fetch("m", spec(old))  # another replica starts loading the old version...
        await agent.fetch("m", spec(new))  # ...while the new one arrives
        await agent.release("m", spec(new))
        assert agent.entry(spec(old)).exists()  # still read by that load
        await agent.release("m", spec(old))
        assert not agent.entry(spec(old)).exists() and agent.entry(spec(new)).exists()
        # two models sharing one artifact: it stays while either still uses it
        for name in ("x", "y"):
            await agent.fetch(name, spec(shared))
            await agent.release(name, spec(shared))
        await agent.fetch("x", spec(new))
        await agent.release("x", spec(new))
        assert agent.entry(spec(shared)).exists()
        await agent.evict("y", spec(shared))  # "y" unloaded: nobody uses it now
        assert not agent.entry(spec(shared)).exists() and agent.entry(spec(new)).exists()

    asyncio.run(main())
