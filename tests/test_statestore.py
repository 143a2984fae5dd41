"""The persisted desired set survives bad writes and hand edits, and reaches remote stores with credentials.

Local files are real files in ``tmp_path``; the remote store is moto's S3 server on 127.0.0.1, reached with
credentials passed to the store (as ``Settings.storage_env``) while the process itself has none. Disk
failures are injected by making one system call fail, the way a full or broken disk would.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import stat
from pathlib import Path

import pytest

from rayms.config import ModelSpec, Settings
from rayms.errors import StorageError
from rayms.registry import ModelRegistry
from rayms.statestore import StateStore
from rayms.status import LoadReport
from tests.servers import MotoS3, credentials

pytestmark = pytest.mark.timeout(60)


def entry(name: str, uri: str = "file:///models/m.joblib", **extra) -> dict:
    return {"modelName": name, "modelSpec": {"storageUri": uri, "framework": "sklearn"}, "source": "repository",
            "version": 1, **extra}


def kept_copies(folder: Path) -> list[Path]:
    return sorted(folder.glob("models.json.corrupt-*"))


# -- local files -----------------------------------------------------------------------------------------------

def test_a_truncated_file_is_kept_aside_and_every_entry_before_the_cut_survives(tmp_path, caplog):
    path = tmp_path / "models.json"
    StateStore(str(path)).write([entry("a"), entry("b"), entry("c")])
    original = path.read_bytes()
    path.write_bytes(original[: original.index(b'"c"') + 2])  # cut inside the third entry

    store = StateStore(str(path))
    with caplog.at_level(logging.ERROR, logger="rayms.statestore"):
        entries = store.read()

    assert [e["modelName"] for e in entries] == ["a", "b"]
    [kept] = kept_copies(tmp_path)
    assert kept.read_bytes() == original[: original.index(b'"c"') + 2], "the damaged bytes are kept as they were"
    assert json.loads(path.read_text()) == entries, "the file now holds what the application started with"
    [record] = [r for r in caplog.records if r.levelno == logging.ERROR]
    assert str(path) in record.getMessage() and str(kept) in record.getMessage()
    assert "not valid JSON" in record.getMessage()
    assert any(str(kept) in p for p in store.problems) and any("not valid JSON" in p for p in store.problems)
    # read again: the file is sound now, nothing more is set aside
    assert StateStore(str(path)).read() == entries
    assert len(kept_copies(tmp_path)) == 1


def test_hand_edited_entries_are_checked_like_registrations_and_the_bad_ones_skipped(tmp_path, caplog):
    path = tmp_path / "models.json"
    path.write_text(json.dumps([
        entry("good"),
        entry("../escape"),
        {"modelName": "nospec"},
        entry("tf", modelSpec={"storageUri": "s3://b/m", "framework": "tensorflow"}),
        entry("huge", modelSpec={"storageUri": "s3://b/m", "framework": "sklearn", "memory": "lots"}),
        "just a string",
        entry("good", uri="file:///other"),
        entry("v0", version=0),
        entry("src", source=7),
        entry("also-good", uri="s3://bucket/model.joblib"),
    ]))
    store = StateStore(str(path))
    with caplog.at_level(logging.ERROR, logger="rayms.statestore"):
        entries = store.read()

    assert [e["modelName"] for e in entries] == ["good", "also-good"]
    assert entries[0]["modelSpec"]["storageUri"] == "file:///models/m.joblib", "the first of two duplicates wins"
    text = "\n".join(store.problems)
    for why in ("'../escape' is invalid", "model nospec: invalid model spec", "tensorflow", "'lots' is not a "
                "Kubernetes quantity", "not an object", "listed twice", "version 0", "source 7"):
        assert why in text, why
    assert len(kept_copies(tmp_path)) == 1
    assert "entry 2 skipped" in caplog.text


@pytest.mark.parametrize("content", [b"\xff\xfe not text", b'{"modelName": "a"}', b"garbage", b"[{]"])
def test_a_file_that_is_not_a_list_of_models_starts_empty_and_is_kept(tmp_path, content):
    path = tmp_path / "models.json"
    path.write_bytes(content)
    store = StateStore(str(path))
    assert store.read() == []
    [kept] = kept_copies(tmp_path)
    assert kept.read_bytes() == content
    assert json.loads(path.read_text()) == []
    assert store.problems


def test_an_empty_or_missing_file_is_an_empty_set_and_no_problem(tmp_path):
    store = StateStore(str(tmp_path / "models.json"))
    assert store.read() == []
    (tmp_path / "models.json").write_text("  \n")
    assert store.read() == [] and store.problems == [] and kept_copies(tmp_path) == []


def test_an_unreadable_file_is_an_error_and_is_not_touched(tmp_path):
    path = tmp_path / "models.json"
    path.mkdir()  # a folder where the file should be: reading fails, the content may be fine elsewhere
    with pytest.raises(StorageError, match="cannot read model state"):
        StateStore(str(path)).read()
    assert path.is_dir() and kept_copies(tmp_path) == []


def test_a_failed_write_raises_and_leaves_the_previous_file_whole(tmp_path, monkeypatch):
    path = tmp_path / "models.json"
    store = StateStore(str(path))
    store.write([entry("a")])
    before = path.read_bytes()

    def disk_full(fd):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "fsync", disk_full)
    with pytest.raises(StorageError, match="No space left") as caught:
        store.write([entry("a"), entry("b")])
    assert caught.value.transient, "a full disk may clear: the registry can try again"
    monkeypatch.undo()
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["models.json"], "no temporary file is left behind"

    with pytest.raises(StorageError, match="not JSON"):
        store.write([{"modelName": "a", "modelSpec": object()}])
    assert path.read_bytes() == before


def test_a_write_flushes_the_file_and_its_folder(tmp_path, monkeypatch):
    flushed: list[str] = []
    real_fsync = os.fsync

    def spy(fd):
        flushed.append("folder" if stat.S_ISDIR(os.fstat(fd).st_mode) else "file")
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", spy)
    StateStore(str(tmp_path / "state" / "models.json")).write([entry("a")])
    assert flushed == ["file", "folder"], "the rename is durable only once the folder is flushed"


async def test_the_registry_starts_from_a_damaged_file_with_the_sound_models(tmp_path):
    """What used to stop the application for good: the registry restoring from a truncated file."""
    path = tmp_path / "models.json"
    StateStore(str(path)).write([entry("a"), entry("b"), entry("c")])
    path.write_bytes(path.read_bytes()[:-30])

    class Placer:
        async def load(self, name, spec, version):
            return LoadReport(replica="r0", measured_bytes=1, load_time_s=0.01, metadata={})

        async def unload(self, name, spec):
            pass

    settings = Settings(cache_dir=str(tmp_path), replica_memory_bytes=2**30)
    store = StateStore(str(path))
    registry = ModelRegistry(settings, store=store, placer=Placer())
    assert await registry.restore() == 2
    for name in ("a", "b"):
        assert (await registry.wait_settled(name, timeout_s=5)).state == "READY"
    assert store.problems and len(kept_copies(tmp_path)) == 1
    await registry.register("d", ModelSpec(storage_uri="file:///d", framework="sklearn"), "repository")
    assert [e["modelName"] for e in json.loads(path.read_text())] == ["a", "b", "d"]
    await registry.close()


# -- remote store ----------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def moto():
    server = MotoS3().start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def no_ambient_credentials(monkeypatch, tmp_path):
    """This process knows no AWS credentials or endpoint: only what is passed to the store counts."""
    for key in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_PROFILE", "AWS_ENDPOINT_URL",
                "AWS_ENDPOINT_URL_S3", "S3_ENDPOINT", "AWS_DEFAULT_REGION", "AWS_REGION"):
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setenv("AWS_CONFIG_FILE", os.devnull)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", os.devnull)
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")


def test_s3_state_uses_the_credentials_it_is_given(moto, no_ambient_credentials):
    bucket = moto.bucket("state-with-credentials")
    uri = f"{bucket}/rayms/models.json"
    env = {**credentials(), "AWS_ENDPOINT_URL": moto.endpoint}
    settings = Settings(storage_env=env, state_uri=uri)

    store = StateStore(settings.resolved_state_uri(), env=settings.storage_env, timeout_s=10)
    assert store.read() == []
    store.write([entry("a"), entry("b")])
    assert [e["modelName"] for e in StateStore(uri, env=env).read()] == ["a", "b"]

    without = StateStore(uri, env={"AWS_ENDPOINT_URL": moto.endpoint}, timeout_s=5)
    with pytest.raises(StorageError, match="model state"):
        without.write([entry("x")])

    # a damaged remote file is kept next to it, as a local one is
    client = moto.client()
    body = client.get_object(Bucket="state-with-credentials", Key="rayms/models.json")["Body"].read()
    client.put_object(Bucket="state-with-credentials", Key="rayms/models.json", Body=body[:-25])
    damaged = StateStore(uri, env=env)
    assert [e["modelName"] for e in damaged.read()] == ["a"]
    keys = [o["Key"] for o in client.list_objects_v2(Bucket="state-with-credentials")["Contents"]]
    [kept] = [k for k in keys if k.startswith("rayms/models.json.corrupt-")]
    assert client.get_object(Bucket="state-with-credentials", Key=kept)["Body"].read() == body[:-25]
    assert any(kept in p for p in damaged.problems)


def test_the_state_file_is_readable_by_the_servers_user_only(tmp_path):
    """It keeps full storage URIs (a restore needs them), credentials included."""
    path = tmp_path / "models.json"
    StateStore(str(path)).write([{"modelName": "m", "source": "api", "version": 1,
                                  "modelSpec": {"storageUri": "https://u:secret@h/m.joblib", "framework": "sklearn"}}])
    assert path.stat().st_mode & 0o777 == 0o600
