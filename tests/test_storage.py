"""Storage and the artifact agent against real local servers on 127.0.0.1: HTTP, moto's S3, and the GCS and
Azure Blob emulators (gcp-storage-emulator, Azurite), which ``.ci/setup`` installs.

What these pin down is what hurt KServe's agent: no retries, no concurrency cap, no dedup, half-written
models that look complete, archives only for some schemes. Nothing here waits with ``time.sleep``: tests poll
a condition or hold the server until they release it.
"""

from __future__ import annotations

import asyncio
import io
import logging
import pickle
import sys
import tarfile
import time
import zipfile
from pathlib import Path
from urllib.parse import quote

import pytest

from rayms import storage
from rayms.agent import ArtifactAgent
from rayms.config import ModelSpec, Settings
from rayms.errors import StorageError
from tests.servers import AZURITE_KEY, FileServer, MotoS3, credentials, write_tree

pytestmark = pytest.mark.timeout(60)


# -- fixtures and helpers ------------------------------------------------------------------------------------

@pytest.fixture
def settings(tmp_path: Path) -> Settings:
    return Settings(cache_dir=str(tmp_path / "cache"), pvc_root=str(tmp_path / "pvc"), download_attempts=4,
                    download_backoff_s=0.01, download_timeout_s=10, max_concurrent_downloads=8)


@pytest.fixture
def http():
    with FileServer() as server:
        yield server


@pytest.fixture(scope="module")
def moto():
    server = MotoS3().start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def s3(moto: MotoS3, monkeypatch: pytest.MonkeyPatch) -> MotoS3:
    for key, value in credentials().items():
        monkeypatch.setenv(key, value)
    for key in ("AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_PROFILE"):
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setenv("S3_ENDPOINT", f"127.0.0.1:{moto.port}")  # KServe's variable; botocore ignores it
    monkeypatch.setenv("S3_USE_HTTPS", "0")
    return moto


def spec(uri: str) -> ModelSpec:
    return ModelSpec(storage_uri=uri, framework="sklearn")


def tar_bytes(members: list[tuple[tarfile.TarInfo, bytes | None]]) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as tf:
        for info, data in members:
            if data is not None:
                info.size = len(data)
            tf.addfile(info, io.BytesIO(data) if data is not None else None)
    return buffer.getvalue()


def member(name: str, *, kind: bytes = tarfile.REGTYPE, link: str = "") -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type, info.linkname = kind, link
    return info


def zip_bytes(files: dict[str, bytes]) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as zf:
        for name, data in files.items():
            zf.writestr(name, data)
    return buffer.getvalue()


def listing(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


class Events:
    def __init__(self) -> None:
        self.seen: list[tuple[str, str, dict]] = []

    def __call__(self, name: str, event: str, detail: dict) -> None:
        self.seen.append((name, event, detail))

    def names(self, event: str) -> list[str]:
        return sorted(name for name, kind, _ in self.seen if kind == event)


async def until(condition, *, timeout_s: float = 10.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, "condition not reached in time"
        await asyncio.sleep(0.005)


# -- local paths, file://, pvc:// ----------------------------------------------------------------------------

def test_local_file_and_folder_are_used_in_place(tmp_path: Path, settings: Settings) -> None:
    folder = write_tree(tmp_path / "m", {"model.joblib": b"x", "sub/extra.txt": b"y"})
    dest = tmp_path / "dest"
    assert storage.fetch(str(folder / "model.joblib"), dest, settings=settings) == folder / "model.joblib"
    assert storage.fetch(str(folder), dest, settings=settings) == folder
    assert storage.fetch(f"file://{folder}", dest, settings=settings) == folder
    spaced = write_tree(tmp_path / "my model", {"model.joblib": b"x"})
    assert storage.fetch(f"file://{quote(str(spaced))}", dest, settings=settings) == spaced
    assert not dest.exists()


def test_pvc_maps_to_pvc_root_and_stays_inside_the_claim(settings: Settings) -> None:
    root = Path(settings.pvc_root)
    write_tree(root / "claim", {"models/iris/model.joblib": b"x"})
    got = storage.fetch("pvc://claim/models/iris", Path(settings.cache_dir) / "d", settings=settings)
    assert got == (root / "claim" / "models" / "iris").resolve()
    with pytest.raises(StorageError, match="escapes") as escape:
        storage.fetch("pvc://claim/../other", Path(settings.cache_dir) / "d", settings=settings)
    with pytest.raises(StorageError, match="404") as missing:
        storage.fetch("pvc://claim/models/absent", Path(settings.cache_dir) / "d", settings=settings)
    assert not escape.value.transient and not missing.value.transient
    assert "pvc://claim/models/absent" in str(missing.value)


def test_local_archives_are_unpacked_into_the_destination(tmp_path: Path, settings: Settings) -> None:
    files = {"model.joblib": b"weights", "conf/a.json": b"{}"}
    (tmp_path / "m.tar.gz").write_bytes(tar_bytes([(member(n), d) for n, d in files.items()]))
    (tmp_path / "m.zip").write_bytes(zip_bytes(files))
    for name in ("m.tar.gz", "m.zip"):
        got = storage.fetch(str(tmp_path / name), tmp_path / f"out-{name}", settings=settings)
        assert got == tmp_path / f"out-{name}" and listing(got) == files
    assert (tmp_path / "m.zip").exists()  # the source is read, never moved


# -- archive safety ----------------------------------------------------------------------------------------

@pytest.mark.parametrize(("bad", "data"), [
    (member("../evil.txt"), b"x"),
    (member("/etc/evil.txt"), b"x"),
    (member("ok/../../evil.txt"), b"x"),
    (member("link", kind=tarfile.SYMTYPE, link="/etc/passwd"), None),
    (member("hard", kind=tarfile.LNKTYPE, link="model.joblib"), None),
    (member("dev", kind=tarfile.CHRTYPE), None),
])
def test_tar_members_that_escape_are_refused(tmp_path: Path, settings: Settings, bad, data) -> None:
    archive = tmp_path / "m.tgz"
    archive.write_bytes(tar_bytes([(member("model.joblib"), b"w"), (bad, data)]))
    with pytest.raises(StorageError, match="refusing member") as caught:
        storage.fetch(str(archive), tmp_path / "out", settings=settings)
    assert repr(bad.name) in str(caught.value) and not caught.value.transient
    assert not (tmp_path / "out").exists() and not (tmp_path / "evil.txt").exists()
    assert [p.name for p in tmp_path.iterdir()] == ["m.tgz"]  # no temporary folder left behind


def test_zip_slip_is_refused(tmp_path: Path, settings: Settings) -> None:
    archive = tmp_path / "m.zip"
    archive.write_bytes(zip_bytes({"model.joblib": b"w", "../../evil.txt": b"x"}))
    with pytest.raises(StorageError, match=r"refusing member '\.\./\.\./evil\.txt'") as caught:
        storage.fetch(str(archive), tmp_path / "out", settings=settings)
    assert not caught.value.transient and not (tmp_path / "out").exists()


# -- schemes and backends ------------------------------------------------------------------------------------

def test_http_file_archive_and_folder(http: FileServer, tmp_path: Path, settings: Settings) -> None:
    assert storage.fetch(http.add("m/model.joblib", b"w"), tmp_path / "a", settings=settings).read_bytes() == b"w"
    got = storage.fetch(http.add("m.zip", zip_bytes({"x/model.onnx": b"o"})), tmp_path / "b", settings=settings)
    assert got == tmp_path / "b" and listing(got) == {"x/model.onnx": b"o"}
    with pytest.raises(StorageError, match="HTTP has no folder listing"):
        storage.fetch(http.url("m/"), tmp_path / "c", settings=settings)


@pytest.mark.parametrize("endpoint_var", ["S3_ENDPOINT", "AWS_ENDPOINT_URL_S3", "AWS_ENDPOINT_URL"])
def test_s3_object_prefix_and_archive(s3: MotoS3, tmp_path: Path, settings: Settings,
                                      monkeypatch: pytest.MonkeyPatch, endpoint_var: str) -> None:
    if endpoint_var != "S3_ENDPOINT":
        monkeypatch.delenv("S3_ENDPOINT")
        monkeypatch.setenv(endpoint_var, s3.endpoint)
    bucket = s3.bucket(f"models-{endpoint_var.lower().replace('_', '-')}", {
        "iris/model.joblib": b"w", "iris/meta/info.json": b"{}", "iris/meta/": b"",
        "one/model.bst": b"b", "packed/m.tar.gz": tar_bytes([(member("model.onnx"), b"o")]),
    })
    folder = storage.fetch(f"{bucket}/iris/", tmp_path / "f", settings=settings)
    assert listing(folder) == {"model.joblib": b"w", "meta/info.json": b"{}"}
    single = storage.fetch(f"{bucket}/one/model.bst", tmp_path / "s", settings=settings)
    assert single == tmp_path / "s" / "model.bst" and single.read_bytes() == b"b"
    unpacked = storage.fetch(f"{bucket}/packed/m.tar.gz", tmp_path / "t", settings=settings)
    assert listing(unpacked) == {"model.onnx": b"o"}
    with pytest.raises(StorageError, match="404") as missing:
        storage.fetch(f"{bucket}/absent", tmp_path / "x", settings=settings)
    assert f"{bucket}/absent" in str(missing.value) and not missing.value.transient


# -- gs:// and az:// against their emulators -------------------------------------------------------------------

ALIASES = {"gs": "gcs", "az": "abfs"}  # the second scheme of each backend


@pytest.fixture(params=["gcs", "azure"])
def cloud(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch):
    """One emulator (started once per session); this process's storage environment points at it alone."""
    for key in ("STORAGE_EMULATOR_HOST", "GOOGLE_APPLICATION_CREDENTIALS", "AZURE_STORAGE_CONNECTION_STRING",
                "AZURE_STORAGE_ACCOUNT_NAME", "AZURE_STORAGE_ACCOUNT_KEY", "AZURE_STORAGE_SAS_TOKEN"):
        monkeypatch.delenv(key, raising=False)
    server = request.getfixturevalue(request.param)  # skips, saying why, when the emulator is not installed
    for key, value in server.env().items():
        monkeypatch.setenv(key, value)
    return server


def test_cloud_object_prefix_and_archives(cloud, tmp_path: Path, settings: Settings) -> None:
    model = {"model.joblib": b"w", "meta/info.json": b"{}"}
    bucket = cloud.bucket("fetch-models", {
        **{f"iris/{name}": data for name, data in model.items()}, "one/model.bst": b"b",
        "packed/m.tar.gz": tar_bytes([(member("model.onnx"), b"o")]), "packed/m.zip": zip_bytes(model),
    })
    assert listing(storage.fetch(f"{bucket}/iris", tmp_path / "f", settings=settings)) == model
    assert listing(storage.fetch(f"{bucket}/iris/", tmp_path / "f2", settings=settings)) == model
    single = storage.fetch(f"{bucket}/one/model.bst", tmp_path / "s", settings=settings)
    assert single == tmp_path / "s" / "model.bst" and single.read_bytes() == b"b"
    assert listing(storage.fetch(f"{bucket}/packed/m.tar.gz", tmp_path / "t", settings=settings)) == {
        "model.onnx": b"o"}
    assert listing(storage.fetch(f"{bucket}/packed/m.zip", tmp_path / "z", settings=settings)) == model
    alias = bucket.replace(f"{cloud.scheme}://", f"{ALIASES[cloud.scheme]}://")
    assert storage.fetch(f"{alias}/one/model.bst", tmp_path / "a", settings=settings).read_bytes() == b"b"
    for absent in (f"{bucket}/absent", f"{cloud.scheme}://no-such-bucket/iris"):
        with pytest.raises(StorageError, match="404") as missing:
            storage.fetch(absent, tmp_path / "x", settings=settings)
        assert absent in str(missing.value) and not missing.value.transient
    assert not (tmp_path / "x").exists()


def test_the_agent_downloads_a_cloud_model_once_and_serves_it_from_its_cache(cloud, settings: Settings) -> None:
    bucket = cloud.bucket("agent-models", {"iris/model.joblib": b"w", "iris/conf/a.json": b"{}",
                                           "packed.tgz": tar_bytes([(member("model.txt"), b"t")])})
    folder, archive = spec(f"{bucket}/iris"), spec(f"{bucket}/packed.tgz")
    events = Events()

    async def main() -> list[str]:
        agent = ArtifactAgent(settings, on_event=events)
        paths = await asyncio.gather(*(agent.fetch(f"m{i}", s) for i in range(3) for s in (folder, archive)))
        assert agent.stats()["downloads_completed"] == 2 and agent.stats()["deduplicated"] == 4
        return paths

    paths = asyncio.run(main())
    assert len(set(paths)) == 2
    assert listing(Path(paths[0])) == {"model.joblib": b"w", "conf/a.json": b"{}"}
    assert listing(Path(paths[1])) == {"model.txt": b"t"}
    assert events.names("downloaded") == ["m0", "m0", "m1", "m1", "m2", "m2"]
    restarted = ArtifactAgent(settings)  # a new process on the same node: the cache is what it finds
    assert asyncio.run(restarted.fetch("again", folder)) == paths[0]
    assert restarted.stats()["downloads_started"] == 0 and restarted.stats()["cache_hits"] == 1


def test_a_gcs_emulator_is_read_over_its_json_api_alone(gcs, monkeypatch: pytest.MonkeyPatch, tmp_path: Path,
                                                        settings: Settings, caplog: pytest.LogCaptureFixture) -> None:
    """gcsfs's default filesystem asks a gRPC service for each bucket's layout first; against an emulator that
    call fails (after a minute, with credentials) on every download, and gcsfs logs a warning each time."""
    for key, value in gcs.env().items():
        monkeypatch.setenv(key, value)
    bucket = gcs.bucket("json-api-models", {"iris/model.joblib": b"w"})
    with caplog.at_level(logging.DEBUG, logger="gcsfs"):
        got = storage.fetch(f"{bucket}/iris/model.joblib", tmp_path / "d", settings=settings)
    assert got.read_bytes() == b"w"
    assert [r.getMessage() for r in caplog.records if r.name.startswith("gcsfs") and r.levelno >= logging.WARNING] == []


def test_azure_wrong_key_is_access_denied_at_once_and_the_key_stays_out_of_the_error(
        azure, monkeypatch: pytest.MonkeyPatch, settings: Settings) -> None:
    bucket = azure.bucket("locked-models", {"iris/model.joblib": b"w"})
    good = azure.env()["AZURE_STORAGE_CONNECTION_STRING"]
    wrong_key = "A" * 86 + "=="
    monkeypatch.setenv("AZURE_STORAGE_CONNECTION_STRING", good.replace(AZURITE_KEY, wrong_key))
    agent = ArtifactAgent(settings)
    with pytest.raises(StorageError, match=r"access denied \(403\)") as caught:
        asyncio.run(agent.fetch("iris", spec(f"{bucket}/iris")))
    assert not caught.value.transient and agent.stats()["retries"] == 0
    assert wrong_key not in str(caught.value) and "AccountKey" not in str(caught.value)


@pytest.mark.parametrize(("uri", "package", "extra"), [
    ("s3://b/m", "s3fs", "s3"), ("gs://b/m", "gcsfs", "gcs"), ("az://c/m", "adlfs", "azure")])
def test_missing_backend_names_the_extra(monkeypatch: pytest.MonkeyPatch, tmp_path: Path, settings: Settings,
                                         uri: str, package: str, extra: str) -> None:
    monkeypatch.setitem(sys.modules, package, None)  # makes `import <package>` fail as if absent
    with pytest.raises(StorageError) as caught:
        storage.fetch(uri, tmp_path / "d", settings=settings)
    scheme = uri.split("://")[0]
    assert str(caught.value) == f"{scheme}:// needs {package}: pip install 'rayms[{extra}]'"
    assert not caught.value.transient


def test_unknown_scheme_is_permanent(tmp_path: Path, settings: Settings) -> None:
    with pytest.raises(StorageError, match="unsupported scheme 'ftp'") as caught:
        storage.fetch("ftp://host/m.joblib", tmp_path / "d", settings=settings)
    assert "ftp://host/m.joblib" in str(caught.value) and not caught.value.transient


# -- the agent: retries, classification, caps, dedup, cache ----------------------------------------------------

@pytest.mark.parametrize("status", [503, 429])
def test_transient_errors_are_retried(http: FileServer, settings: Settings, status: int) -> None:
    uri = http.add("m/model.joblib", b"w")
    http.fail("m/model.joblib", status, times=2)
    events = Events()

    async def main() -> str:
        agent = ArtifactAgent(settings, on_event=events)
        path = await agent.fetch("iris", spec(uri))
        assert agent.stats()["retries"] == 2 and agent.stats()["downloads_completed"] == 1
        return path

    assert Path(asyncio.run(main())).read_bytes() == b"w"
    assert http.requests["/m/model.joblib"] == 3
    assert [kind for _, kind, _ in events.seen] == ["downloading", "downloaded"]
    assert events.seen[-1][2]["cached"] is False and events.seen[-1][2]["bytes"] == 1


@pytest.mark.parametrize(("status", "words"), [(404, "not found (404)"), (403, "access denied (403)")])
def test_permanent_errors_fail_after_one_attempt(http: FileServer, settings: Settings, status: int,
                                                 words: str) -> None:
    uri = http.url("m/model.joblib")
    http.fail("m/model.joblib", status)
    events = Events()
    agent = ArtifactAgent(settings, on_event=events)
    with pytest.raises(StorageError) as caught:
        asyncio.run(agent.fetch("iris", spec(uri)))
    assert http.requests["/m/model.joblib"] == 1
    assert uri in str(caught.value) and words in str(caught.value) and not caught.value.transient
    again = pickle.loads(pickle.dumps(caught.value))  # it crosses the agent actor's process boundary
    assert str(again) == str(caught.value) and again.transient is False
    assert events.seen[-1][:2] == ("iris", "failed") and uri in events.seen[-1][2]["reason"]
    assert agent.stats()["failures"] == 1 and not (agent.entry(spec(uri)) / ".complete").exists()


def test_concurrent_downloads_are_capped(http: FileServer, settings: Settings) -> None:
    capped = settings.model_copy(update={"max_concurrent_downloads": 2})
    uris = [http.add(f"m{i}/model.joblib", b"w" * i) for i in range(6)]
    http.hold()

    async def main() -> ArtifactAgent:
        agent = ArtifactAgent(capped)
        calls = asyncio.gather(*(agent.fetch(f"m{i}", spec(uri)) for i, uri in enumerate(uris)))
        for started in range(2, 7):  # let one response through at a time: the next download takes its slot
            await until(lambda: sum(http.requests.values()) == started and http.in_flight == 2)
            http.release(1)
        http.release()
        await calls
        return agent

    agent = asyncio.run(main())
    assert http.peak == 2 and agent.stats()["peak_concurrent"] == 2
    assert sum(http.requests.values()) == 6 and agent.stats()["downloads_completed"] == 6


def test_concurrent_fetches_of_one_spec_share_one_download(http: FileServer, settings: Settings) -> None:
    uri = http.add("m/model.joblib", b"w")
    http.hold()
    events = Events()

    async def main() -> list[str]:
        agent = ArtifactAgent(settings, on_event=events)
        calls = [asyncio.ensure_future(agent.fetch(f"m{i % 2}", spec(uri))) for i in range(5)]
        await until(lambda: http.in_flight == 1 and agent.stats()["deduplicated"] == 4)
        http.release()
        return await asyncio.gather(*calls)

    paths = asyncio.run(main())
    assert len(set(paths)) == 1 and http.requests["/m/model.joblib"] == 1
    assert events.names("downloading") == ["m0", "m1"] and events.names("downloaded") == ["m0", "m1"]


def test_cache_survives_a_restart_and_evict_removes_it(http: FileServer, settings: Settings) -> None:
    uri = http.add("m.tgz", tar_bytes([(member("model.joblib"), b"w")]))
    events = Events()
    first = asyncio.run(ArtifactAgent(settings).fetch("iris", spec(uri)))
    restarted = ArtifactAgent(settings, on_event=events)  # a new process on the same node and cache dir
    assert asyncio.run(restarted.fetch("iris", spec(uri))) == first
    assert http.requests["/m.tgz"] == 1 and restarted.stats()["downloads_started"] == 0
    assert restarted.stats()["cache_hits"] == 1 and events.seen[-1][2]["cached"] is True
    asyncio.run(restarted.evict("iris", spec(uri)))
    assert not restarted.entry(spec(uri)).exists()
    asyncio.run(restarted.fetch("iris", spec(uri)))
    assert http.requests["/m.tgz"] == 2


def test_local_uris_are_not_cached_or_evicted(tmp_path: Path, settings: Settings) -> None:
    source = write_tree(tmp_path / "m", {"model.joblib": b"w"})
    agent = ArtifactAgent(settings)
    assert asyncio.run(agent.fetch("iris", spec(str(source)))) == str(source)
    asyncio.run(agent.evict("iris", spec(str(source))))
    assert (source / "model.joblib").exists() and agent.stats()["downloads_started"] == 0


def test_a_broken_download_leaves_no_cache_entry(http: FileServer, settings: Settings) -> None:
    uri = http.add("m/model.joblib", b"w" * 100_000)
    http.truncate("m/model.joblib")
    agent = ArtifactAgent(settings.model_copy(update={"download_attempts": 2}))
    with pytest.raises(StorageError, match="after 2 attempts") as caught:
        asyncio.run(agent.fetch("iris", spec(uri)))
    assert caught.value.transient and http.requests["/m/model.joblib"] == 2
    entry = agent.entry(spec(uri))
    assert sorted(p.name for p in entry.iterdir()) == [".lock"]  # no model, no marker, no partial file


def test_each_attempt_is_bounded_by_the_timeout(http: FileServer, settings: Settings) -> None:
    uri = http.add("m/model.joblib", b"w")
    http.hold()
    agent = ArtifactAgent(settings.model_copy(update={"download_attempts": 2, "download_timeout_s": 0.2}))

    async def main() -> None:
        try:
            with pytest.raises(StorageError, match="timed out") as caught:
                await agent.fetch("iris", spec(uri))
            assert caught.value.transient
        finally:
            http.release()  # lets the abandoned threads finish; they must not fill the entry

    asyncio.run(main())
    assert http.requests["/m/model.joblib"] == 2
    assert not (agent.entry(spec(uri)) / ".complete").exists() and not (agent.entry(spec(uri)) / "model").exists()
