"""The control plane as a security review meets it, on the path users get: ``rayms serve`` (HAProxy in front
of the replicas) configured as a server exposed beyond its machine (``trust_loopback`` off: tests bind only to
127.0.0.1), driven over HTTP and with the ``rayms`` CLI."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys

import pytest
import requests

from tests.conftest import free_port, wait_for
from tests.model_factory import make_data, make_sklearn

pytestmark = pytest.mark.e2e  # starts `rayms serve`, with its own Ray

RAYMS = [sys.executable, "-m", "rayms.cli"]
TOKEN = "a-long-random-control-token"


@pytest.fixture(scope="module")
def exposed(tmp_path_factory):
    root = tmp_path_factory.mktemp("exposed")
    make_sklearn(root / "repo" / "sec-model")
    allowed, _ = make_sklearn(root / "allowed" / "m")
    outside, _ = make_sklearn(root / "outside" / "m")
    token_file = root / "token"
    token_file.write_text(TOKEN)
    port = free_port()
    env = {**os.environ, "RAYMS_CACHE_DIR": str(root / "cache"), "RAYMS_TRUST_LOOPBACK": "false"}
    env.pop("RAY_ADDRESS", None)
    env.pop("RAYMS_CONTROL_TOKEN", None)
    log = root / "serve.log"
    with log.open("w") as out:
        process = subprocess.Popen(
            [*RAYMS, "serve", "--model-repository", str(root / "repo"), "--port", str(port), "--replicas", "1",
             "--control-token-file", str(token_file), "--allow-storage", str(root / "allowed")],
            stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    try:
        wait_for(lambda: "is serving" in log.read_text() or process.poll() is not None, timeout_s=240,
                 what="rayms serve to start")
        assert process.poll() is None, log.read_text()[-3000:]
        yield {"url": f"http://127.0.0.1:{port}", "allowed": allowed, "outside": outside, "env": env,
               "token_file": token_file, "log": log}
    finally:
        process.send_signal(signal.SIGINT)
        try:
            process.wait(timeout=90)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()


def auth(token=TOKEN):
    return {"Authorization": f"Bearer {token}"}


def test_without_the_token_nothing_can_list_load_or_unload(exposed):
    url = exposed["url"]
    for path, body in [("/v2/repository/index", None), ("/v2/repository/models/x/load",
                       {"storageUri": str(exposed["allowed"]), "framework": "sklearn"}),
                       ("/v2/repository/models/sec-model/unload", None)]:
        for headers in ({}, auth("wrong-token")):
            refused = requests.post(url + path, json=body, headers=headers, timeout=30)
            assert refused.status_code == 401, refused.text
            assert set(refused.json()) == {"error"}
    assert requests.get(f"{url}/v2/models", timeout=30).status_code == 401
    # inference needs no token unless one is configured
    rows = make_data(n=2, seed=1)[0].tolist()
    assert requests.post(f"{url}/v1/models/sec-model:predict", json={"instances": rows}, timeout=30).status_code == 200
    assert {r["name"] for r in requests.post(f"{url}/v2/repository/index", headers=auth(), timeout=30).json()} \
        == {"sec-model"}


def test_storage_outside_the_allowed_prefixes_is_refused(exposed):
    url = exposed["url"]
    refused = requests.post(f"{url}/v2/repository/models/from-outside/load", headers=auth(), timeout=60,
                            json={"storageUri": str(exposed["outside"]), "framework": "sklearn"})
    assert refused.status_code == 403 and "not allowed" in refused.json()["error"]
    passwd = requests.post(f"{url}/v2/repository/models/passwd/load", headers=auth(), timeout=60,
                           json={"storageUri": "file:///etc/passwd", "framework": "sklearn"})
    assert passwd.status_code == 403
    ok = requests.post(f"{url}/v2/repository/models/from-allowed/load", headers=auth(), timeout=120,
                       json={"storageUri": str(exposed["allowed"]), "framework": "sklearn"})
    assert ok.status_code == 200, ok.text


def test_the_cli_sends_the_token(exposed):
    def cli(*args, env):
        return subprocess.run([*RAYMS, *args, "--url", exposed["url"]], capture_output=True, text=True,
                              timeout=120, env=env, check=False)

    without = cli("models", "list", "--json", env=exposed["env"])
    assert without.returncode != 0 and "401" in without.stderr + without.stdout
    listed = cli("models", "list", "--json", env={**exposed["env"], "RAYMS_CONTROL_TOKEN": TOKEN})
    assert listed.returncode == 0, listed.stderr
    assert "sec-model" in {row["name"] for row in json.loads(listed.stdout)}
    by_file = cli("models", "list", "--json", "--token-file", str(exposed["token_file"]), env=exposed["env"])
    assert by_file.returncode == 0, by_file.stderr
    assert TOKEN not in exposed["log"].read_text()
