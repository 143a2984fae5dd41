"""What a restart brings back, as a user meets it: ``rayms serve`` runs one after the other, as the same user
(same cache folder, same port), on different repositories.

Each run serves its own repository; models loaded through the API come back with the repository they were
loaded next to; a repository model the user unloaded stays unloaded; a folder rayms cannot read is a FAILED
model with its reason while the others serve.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from contextlib import contextmanager

import pytest
import requests

from tests.conftest import free_port, wait_for
from tests.model_factory import make_sklearn

pytestmark = pytest.mark.e2e  # starts `rayms serve`, with its own Ray

RAYMS = [sys.executable, "-m", "rayms.cli"]


@contextmanager
def serving(repo, *, port, cache, log):
    env = {**os.environ, "RAYMS_CACHE_DIR": str(cache)}
    env.pop("RAY_ADDRESS", None)
    with log.open("w") as out:
        process = subprocess.Popen([*RAYMS, "serve", "--model-repository", str(repo), "--port", str(port),
                                    "--replicas", "1"], stdout=out, stderr=subprocess.STDOUT, env=env,
                                   start_new_session=True)
    try:
        wait_for(lambda: "is serving" in log.read_text() or process.poll() is not None, timeout_s=240,
                 what="rayms serve to start")
        assert process.poll() is None, log.read_text()[-3000:]
        yield f"http://127.0.0.1:{port}"
    finally:
        process.send_signal(signal.SIGINT)
        try:
            process.wait(timeout=90)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()


def index(url) -> dict[str, dict]:
    return {row["name"]: row for row in requests.post(f"{url}/v2/repository/index", timeout=30).json()}


def test_each_run_serves_its_own_repository_and_remembers_what_the_user_did(tmp_path):
    repo_a, repo_b = tmp_path / "repo-a", tmp_path / "repo-b"
    make_sklearn(repo_a / "a1")
    make_sklearn(repo_a / "a2")
    (repo_a / "empty").mkdir(parents=True)  # no model file: FAILED, the rest still serve
    make_sklearn(repo_b / "b1")
    api_model, _ = make_sklearn(tmp_path / "elsewhere", kind="rf")
    port, cache = free_port(), tmp_path / "cache"

    with serving(repo_a, port=port, cache=cache, log=tmp_path / "a.log") as url:
        rows = index(url)
        assert rows["a1"]["state"] == rows["a2"]["state"] == "READY"
        assert rows["empty"]["state"] == "FAILED" and "empty" in rows["empty"]["reason"]
        assert "model empty: FAILED" in (tmp_path / "a.log").read_text()
        loaded = requests.post(f"{url}/v2/repository/models/by-api/load",
                               json={"storageUri": str(api_model), "framework": "sklearn"}, timeout=120)
        assert loaded.status_code == 200, loaded.text
        assert requests.post(f"{url}/v2/repository/models/a2/unload", timeout=60).status_code == 200

    with serving(repo_b, port=port, cache=cache, log=tmp_path / "b.log") as url:
        assert {n: r["state"] for n, r in index(url).items()} == {"b1": "READY"}

    with serving(repo_a, port=port, cache=cache, log=tmp_path / "a2.log") as url:
        rows = index(url)
        assert sorted(rows) == ["a1", "by-api", "empty"], "a2 was unloaded by the user and stays unloaded"
        assert rows["a1"]["state"] == rows["by-api"]["state"] == "READY"
        assert rows["by-api"]["source"] == "api" and rows["a1"]["source"] == "repository-folder"
