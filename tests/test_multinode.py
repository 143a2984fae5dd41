"""Two Ray nodes: replicas on both serve, and each node's artifact cache holds only what its replicas loaded.

A multi-node cluster needs a Ray instance of its own, and the session's ``ray_instance`` must stay up for
the other tests, so the scenario runs in a subprocess (``python -m tests.test_multinode WORKDIR``): it
starts a ``ray.cluster_utils.Cluster`` with two nodes, deploys rayms with one replica per node (each node
has one logical CPU and each replica asks for one), loads models from the real local HTTP file server
over real HTTP, and prints what it saw as one JSON line. The test asserts on that.

Both nodes share this machine's disk, so each node is started with its own ``NODE_DISK`` environment
variable and ``cache_dir`` is ``$NODE_DISK/cache``: an agent resolves it on its own node, so each node
gets its own cache folder, as separate machines would.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.e2e  # starts Ray in processes of its own

REPO = Path(__file__).resolve().parent.parent
MODELS = [f"node-model-{i}" for i in range(6)]


def scenario(workdir: Path) -> dict:
    """Run the two-node scenario; return the observations (run in the subprocess, never under pytest)."""
    import numpy as np
    import ray
    import requests
    from ray import serve
    from ray.cluster_utils import Cluster

    from rayms.app import build_app
    from rayms.config import Settings
    from tests.conftest import free_port, wait_for
    from tests.servers import FileServer
    from tests.support import prediction, v2_body
    from tests.test_e2e_lifecycle import ROWS, make_offset_model

    disks = {"head": workdir / "disk-head", "worker": workdir / "disk-worker"}
    cluster = Cluster(initialize_head=True, head_node_args={
        "num_cpus": 1, "include_dashboard": False, "env_vars": {"NODE_DISK": str(disks["head"])}})
    files = FileServer().start()
    try:
        worker = cluster.add_node(num_cpus=1, env_vars={"NODE_DISK": str(disks["worker"])})
        disk_of = {cluster.head_node.node_id: disks["head"], worker.node_id: disks["worker"]}
        ray.init(address=cluster.address, logging_level="warning", log_to_driver=False)
        cluster.wait_for_nodes()
        port = free_port()
        serve.start(proxy_location="HeadOnly", http_options={"host": "127.0.0.1", "port": port})
        # One logical CPU per node and one per replica: a placement slot, so each node gets exactly one
        # replica (Serve's default spreading is best effort). No real core is reserved by this.
        settings = Settings(app_name="multinode", num_replicas=2, replica_num_cpus=1, max_models_per_replica=50,
                            cache_dir="$NODE_DISK/cache", state_uri=str(workdir / "state.json"),
                            download_backoff_s=0.05)
        serve.run(build_app(settings), name=settings.app_name, route_prefix="/")
        url = f"http://127.0.0.1:{port}"
        wait_for(lambda: requests.get(url + "/v2/health/ready", timeout=30).ok, timeout_s=180, what="ready")

        uris, expected = {}, {}
        for i, name in enumerate(MODELS):
            path, predict = make_offset_model(workdir / "made" / name, offset=50.0 * i)
            uris[name] = files.add(f"{name}/model.joblib", path.read_bytes())
            expected[name] = predict(ROWS)
            body = {"storageUri": uris[name], "framework": "sklearn"}
            response = requests.post(f"{url}/v2/repository/models/{name}/load", json=body, timeout=300)
            assert response.status_code == 200, response.text
        answers = {}
        for name in MODELS:
            response = requests.post(f"{url}/v2/models/{name}/infer", json=v2_body(ROWS), timeout=120)
            answers[name] = response.status_code == 200 and bool(np.allclose(prediction(response), expected[name]))

        def observe() -> dict:
            replicas = requests.get(url + "/v2/repository/replicas", timeout=60).json()
            nodes = {}
            for node_id, disk in disk_of.items():
                agent = ray.get_actor(f"{settings.app_name}-agent-{node_id[:16]}", namespace="rayms")
                cached = {json.loads(p.read_text())["uri"] for p in (disk / "cache" / "artifacts").glob("*/.complete")}
                nodes[disk.name] = {
                    "replicas": [r["replica"] for r in replicas if r["node"] == node_id],
                    "resident": sorted({m for r in replicas if r["node"] == node_id for m in r["models"]}),
                    "cached": sorted(n for n, u in uris.items() if u in cached),
                    "agent": ray.get(agent.stats.remote(), timeout=60),
                }
            return nodes

        before = observe()
        gone = MODELS[0]
        assert requests.post(f"{url}/v2/repository/models/{gone}/unload", timeout=120).status_code == 200
        return {"answers": answers, "nodes": before, "after_unload": observe(), "unloaded": gone,
                "downloads": {name: files.requests[f"/{name}/model.joblib"] for name in MODELS}}
    finally:
        files.stop()
        serve.shutdown()
        ray.shutdown()
        cluster.shutdown()


@pytest.mark.slow
def test_two_nodes_serve_and_cache_only_what_their_replicas_loaded(tmp_path):
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0", "RAY_worker_niceness": "0"}
    proc = subprocess.Popen([sys.executable, "-m", "tests.test_multinode", str(tmp_path)], cwd=REPO, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        out, err = proc.communicate(timeout=280)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)  # the scenario and the Ray processes it started
        out, err = proc.communicate()
    lines = [line for line in out.splitlines() if line.startswith("RESULT ")]
    assert proc.returncode == 0 and lines, f"scenario failed ({proc.returncode}):\n{out[-3000:]}\n{err[-5000:]}"
    result = json.loads(lines[-1].removeprefix("RESULT "))

    assert all(result["answers"].values()), result["answers"]
    nodes = result["nodes"]
    assert sorted(nodes) == ["disk-head", "disk-worker"]
    for disk, node in nodes.items():
        assert len(node["replicas"]) == 1, f"{disk}: replicas {node['replicas']} (one per node expected)"
        assert node["resident"], f"{disk}: its replica serves nothing"
        assert node["cached"] == node["resident"], f"{disk}: cache {node['cached']} vs loaded {node['resident']}"
        assert node["agent"]["downloads_completed"] == len(node["resident"]), node["agent"]
    assert set().union(*(n["resident"] for n in nodes.values())) == set(MODELS)
    # Each download happened on the node that needed it, once per node holding the model.
    holders = {m: sum(m in n["resident"] for n in nodes.values()) for m in MODELS}
    assert result["downloads"] == holders, (result["downloads"], holders)
    gone = result["unloaded"]
    assert all(gone not in n["cached"] and gone not in n["resident"] for n in result["after_unload"].values())


if __name__ == "__main__":
    print("RESULT " + json.dumps(scenario(Path(sys.argv[1]))), flush=True)
