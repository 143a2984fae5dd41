"""The ``rayms`` command as a user runs it: ``rayms serve`` in its own process (its own Ray, HAProxy in
front, model replicas answering HTTP), driven with ``rayms models`` / ``rayms predict`` and plain HTTP,
then stopped with Ctrl-C."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys

import numpy as np
import pytest
import requests

from tests.conftest import free_port, wait_for
from tests.model_factory import make_data, make_lightgbm, make_sklearn, make_xgboost
from tests.servers import rayms_serve

RAYMS = [sys.executable, "-m", "rayms.cli"]


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    repo = tmp_path_factory.mktemp("repo")
    expected = {
        "cli-sk": make_sklearn(repo / "cli-sk")[1],
        "cli-xgb": make_xgboost(repo / "cli-xgb")[1],
        "cli-lgb": make_lightgbm(repo / "cli-lgb")[1],
    }
    (repo / "cli-broken").mkdir()  # a folder that cannot be served must not stop the others
    (repo / "cli-broken" / "model.bst").write_bytes(b"written by neither XGBoost nor LightGBM")
    extra, _ = make_sklearn(tmp_path_factory.mktemp("extra") / "m", kind="rf")
    port = free_port()
    log = tmp_path_factory.mktemp("log") / "serve.log"
    env = {"RAYMS_CACHE_DIR": str(tmp_path_factory.mktemp("cache"))}
    args = ["--model-repository", str(repo), "--port", str(port), "--replicas", "2"]
    with rayms_serve(args, log=log, env=env) as process:
        yield {"url": f"http://127.0.0.1:{port}", "expected": expected, "process": process, "log": log,
               "extra": extra, "env": {**os.environ, **env}}


def cli(served, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([*RAYMS, *args, "--url", served["url"]], capture_output=True, text=True, timeout=300,
                          env=served["env"], check=False)


def test_repository_models_are_ready_and_answer_v1_and_v2(served):
    log = served["log"].read_text()
    assert "model cli-sk: READY" in log
    assert "model cli-broken: FAILED" in log and "no xgboost or lightgbm model format" in log
    rows = make_data(n=4, seed=11)[0]
    for name, expected in served["expected"].items():
        want = np.asarray(expected(rows))
        v1 = requests.post(f"{served['url']}/v1/models/{name}:predict", json={"instances": rows.tolist()}, timeout=30)
        assert v1.status_code == 200, v1.text
        assert np.allclose(v1.json()["predictions"], want)
        body = {"inputs": [{"name": "x", "shape": list(rows.shape), "datatype": "FP64", "data": rows.ravel().tolist()}]}
        v2 = requests.post(f"{served['url']}/v2/models/{name}/infer", json=body, timeout=30)
        assert v2.status_code == 200, v2.text
        assert np.allclose(v2.json()["outputs"][0]["data"], want.ravel())


def test_each_model_has_one_home_replica_behind_haproxy(served):
    rows = make_data(n=1, seed=2)[0].tolist()
    for _ in range(5):
        for name in served["expected"]:
            assert requests.post(f"{served['url']}/v1/models/{name}:predict", json={"instances": rows},
                                 timeout=30).status_code == 200
    replicas = requests.get(f"{served['url']}/v2/repository/replicas", timeout=30).json()
    assert len(replicas) == 2
    # The registry's initial load may have placed a model anywhere; V1 traffic then goes to one home.
    for name in served["expected"]:
        holders = [r["replica"] for r in replicas if name in r["models"]]
        assert 1 <= len(holders) <= 2


def test_models_commands_and_predict(served):
    listed = cli(served, "models", "list")
    assert listed.returncode == 0, listed.stderr
    assert "cli-sk" in listed.stdout and "READY" in listed.stdout
    loaded = cli(served, "models", "load", "cli-extra", "--storage-uri", str(served["extra"]), "--framework", "sklearn",
                 "--memory", "16Mi", "--max-batch-size", "8")
    assert loaded.returncode == 0, loaded.stderr
    assert json.loads(loaded.stdout)["state"] == "READY"
    predicted = cli(served, "predict", "cli-extra", "--data", "[[5.1, 3.5, 1.4, 0.2]]")
    assert predicted.returncode == 0, predicted.stderr
    assert json.loads(predicted.stdout)["model_name"] == "cli-extra"
    holders = [r["models"]["cli-extra"] for r in requests.get(f"{served['url']}/v2/repository/replicas").json()
               if "cli-extra" in r["models"]]
    assert any("batched_requests" in held for held in holders), "the replica that answered batches the model"
    as_json = json.loads(cli(served, "models", "list", "--json").stdout)
    extra = next(r for r in as_json if r["name"] == "cli-extra")
    assert extra["declaredMemory"] == 16 * 2**20 and extra["measuredMemory"] > 0
    unloaded = cli(served, "models", "unload", "cli-extra")
    assert unloaded.returncode == 0, unloaded.stderr
    missing = cli(served, "predict", "cli-extra", "--data", "[[5.1, 3.5, 1.4, 0.2]]")
    assert missing.returncode != 0 and "404" in missing.stderr and "cli-extra" in missing.stderr
    bad = cli(served, "models", "load", "cli-bad", "--storage-uri", "/nope/model.joblib", "--framework", "sklearn")
    assert bad.returncode != 0 and "cli-bad" in bad.stderr


def test_a_replica_killed_under_traffic_fails_at_most_the_requests_it_was_answering(served):
    import threading

    import psutil

    url = served["url"]
    before = {r["replica"] for r in requests.get(f"{url}/v2/repository/replicas", timeout=30).json()}
    victims = [p for p in psutil.Process(served["process"].pid).children(recursive=True)
               if "ServeReplica:rayms:ModelReplica" in " ".join(p.cmdline())]
    assert len(victims) == 2
    statuses: list[int] = []
    errors: list[str] = []
    stop = threading.Event()
    rows = make_data(n=1, seed=5)[0].tolist()

    def traffic() -> None:
        session = requests.Session()
        while not stop.is_set():
            for name in served["expected"]:
                try:
                    statuses.append(session.post(f"{url}/v1/models/{name}:predict", json={"instances": rows},
                                                 timeout=30).status_code)
                except requests.RequestException as exc:
                    errors.append(repr(exc))
                    statuses.append(-1)

    threads = [threading.Thread(target=traffic) for _ in range(3)]
    for thread in threads:
        thread.start()
    wait_for(lambda: len(statuses) > 30, timeout_s=60, what="traffic before the kill")
    victims[0].kill()

    def replaced() -> bool:
        now = {r["replica"] for r in requests.get(f"{url}/v2/repository/replicas", timeout=30).json()}
        return len(now) == 2 and now != before

    wait_for(replaced, timeout_s=180, interval_s=0.5, what="the killed replica replaced")
    count = len(statuses)
    wait_for(lambda: len(statuses) > count + 30, timeout_s=60, what="traffic after the replacement")
    stop.set()
    for thread in threads:
        thread.join()
    # Requests in flight on the killed replica fail (HAProxy replays only requests no replica received, so a
    # request that kills a replica is never sent on to the next): at most one per client connection in flight
    # at the moment of the kill, never anything after it.
    failed = [s for s in statuses if s not in (200, 503)]
    assert len(failed) <= 3, ({s: statuses.count(s) for s in set(statuses)}, errors[:3])
    assert statuses[-10:] == [200] * 10


def test_ctrl_c_stops_everything_it_started(served):
    process, url = served["process"], served["url"]
    process.send_signal(signal.SIGINT)
    process.wait(timeout=120)
    assert process.returncode == 0, served["log"].read_text()[-2000:]
    with pytest.raises(requests.ConnectionError):
        requests.get(f"{url}/v2/health/live", timeout=5)
    # no process of its session (Ray, HAProxy, workers) is left behind
    leftover = subprocess.run(["pgrep", "-s", str(process.pid)], capture_output=True, text=True, check=False)
    assert leftover.stdout.strip() == "", f"left running: {leftover.stdout}"


@pytest.mark.parametrize(("flags", "named"), [
    (["--replicas", "0"], "num_replicas"),
    (["--max-batch-size", "0"], "max_batch_size"),
    (["--max-models-per-replica", "-1"], "max_models_per_replica"),
    (["--port", "70000"], "port"),
    (["--port", "8123", "--grpc-port", "8123"], "grpc_port"),
    (["--replica-memory", "lots"], "--replica-memory"),
])
def test_serve_refuses_bad_settings_before_starting_anything(flags, named, tmp_path):
    done = subprocess.run([*RAYMS, "serve", "--cache-dir", str(tmp_path), *flags], capture_output=True, text=True,
                          timeout=120, check=False)
    assert done.returncode == 2, done.stderr[-2000:]
    assert named in done.stderr and "Traceback" not in done.stderr
    assert "starting rayms" not in done.stdout


def test_serve_flags_override_the_environment_only_when_given(monkeypatch):
    from rayms.cli import parser, serve_settings

    monkeypatch.setenv("RAYMS_PORT", "8123")
    monkeypatch.setenv("RAYMS_HOST", "127.0.0.2")
    monkeypatch.setenv("RAYMS_NUM_REPLICAS", "3")
    from_env = serve_settings(parser().parse_args(["serve"]))
    assert (from_env.host, from_env.port, from_env.num_replicas) == ("127.0.0.2", 8123, 3)
    flagged = serve_settings(parser().parse_args(["serve", "--port", "9001", "--replicas", "1"]))
    assert (flagged.host, flagged.port, flagged.num_replicas) == ("127.0.0.2", 9001, 1)


def test_bad_overrides_are_refused_when_the_app_is_built_not_inside_a_replica():
    from pydantic import ValidationError

    from rayms.app import build_app

    with pytest.raises(ValidationError, match="num_replicas"):
        build_app(num_replicas=-3)
    with pytest.raises(ValidationError, match="no_such_setting"):
        build_app(no_such_setting=1)
