"""``rayms serve --demo`` as the README tells a new user to run it: the command in its own process (its own
Ray, HAProxy in front of the model replicas), every ``curl`` command it prints run as printed, then SIGTERM.

The commands run with the real ``curl`` when it is installed (else the same requests go out from Python).
The demo models are iris classifiers and the sample rows a setosa and a virginica, so a sensible answer
names classes 0 and 2: as labels, or as probabilities whose largest entry is that class.
"""

from __future__ import annotations

import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import psutil
import pytest
import requests

from rayms.demo import DEMO_MODELS, SAMPLE
from tests.conftest import free_port, wait_for

RAYMS = [sys.executable, "-m", "rayms.cli"]
SPECIES = [0, 2]  # SAMPLE is a setosa and a virginica


@dataclass
class Demo:
    process: subprocess.Popen
    log: Path
    url: str

    def output(self) -> str:
        return self.log.read_text()


@pytest.fixture(scope="module")
def demo(tmp_path_factory) -> Iterator[Demo]:
    root = tmp_path_factory.mktemp("demo")
    port = free_port()
    env = {**os.environ, "RAYMS_CACHE_DIR": str(root / "cache")}
    env.pop("RAY_ADDRESS", None)
    log = root / "serve.log"
    with log.open("w") as out:
        process = subprocess.Popen(
            [*RAYMS, "serve", "--demo", "--demo-dir", str(root / "models"), "--port", str(port)],
            stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    started = Demo(process=process, log=log, url=f"http://127.0.0.1:{port}")
    try:
        wait_for(lambda: "is serving" in started.output() or process.poll() is not None, timeout_s=300,
                 what="rayms serve --demo to start")
        assert process.poll() is None, started.output()[-3000:]
        yield started
    finally:
        if process.poll() is None:  # a test failed before stopping it: stop it all the same
            process.send_signal(signal.SIGINT)
            try:
                process.wait(timeout=90)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait()


def printed_commands(output: str) -> list[list[str]]:
    """The commands listed under "Try it:", split as a shell would."""
    _, _, rest = output.partition("Try it:\n")
    lines = []
    for line in rest.splitlines():
        if not line.strip():
            break
        lines.append(shlex.split(line))
    return lines


def run(command: list[str]) -> tuple[int, str]:
    """(HTTP status, body) of one printed command."""
    assert command[0] == "curl", command
    if shutil.which("curl"):
        done = subprocess.run([*command, "--max-time", "60", "-w", "\n%{http_code}"], capture_output=True,
                              text=True, timeout=90, check=False)
        assert done.returncode == 0, (command, done.stderr)
        body, _, status = done.stdout.rpartition("\n")
        return int(status), body
    args = command[1:]
    data = args[args.index("-d") + 1] if "-d" in args else None
    method = args[args.index("-X") + 1] if "-X" in args else ("POST" if data is not None else "GET")
    [url] = [a for a in args if a.startswith("http")]
    response = requests.request(method, url, data=data, timeout=60)
    return response.status_code, response.text


def classes(values) -> list[int]:
    array = np.asarray(values, dtype=np.float64)
    return (array.argmax(axis=1) if array.ndim == 2 else array).astype(int).tolist()


def test_the_demo_serves_its_models_behind_haproxy(demo):
    output = demo.output()
    for name in DEMO_MODELS:
        assert f"model {name}: READY" in output, output[-3000:]
    children = [p.name() for p in psutil.Process(demo.process.pid).children(recursive=True)]
    assert "haproxy" in children, children


def test_every_printed_curl_command_answers_200_with_a_sensible_body(demo):
    commands = printed_commands(demo.output())
    urls = [next(a for a in c if a.startswith("http")) for c in commands]
    assert urls == [f"{demo.url}/v1/models",
                    *(u for name in DEMO_MODELS for u in (f"{demo.url}/v1/models/{name}:predict",
                                                          f"{demo.url}/v2/models/{name}/infer")),
                    f"{demo.url}/v2/repository/index"]
    for command, url in zip(commands, urls):
        status, body = run(command)
        assert status == 200, (shlex.join(command), status, body)
        answer = json.loads(body)
        path = url.removeprefix(demo.url)
        if path == "/v1/models":
            assert sorted(answer["models"]) == sorted(DEMO_MODELS)
        elif path.endswith(":predict"):
            assert classes(answer["predictions"]) == SPECIES, (path, answer)
        elif path.endswith("/infer"):
            output = answer["outputs"][0]
            assert answer["model_name"] == path.split("/")[3] and output["shape"][0] == len(SAMPLE)
            assert classes(np.reshape(output["data"], output["shape"])) == SPECIES, (path, answer)
        else:
            assert {(row["name"], row["state"]) for row in answer} == {(n, "READY") for n in DEMO_MODELS}


def test_sigterm_stops_the_demo_and_everything_it_started(demo):
    """Runs last: it stops the demo's process."""
    process = demo.process
    process.send_signal(signal.SIGTERM)
    process.wait(timeout=120)
    assert process.returncode == 0, demo.output()[-2000:]
    assert "stopping rayms" in demo.output()
    with pytest.raises(requests.ConnectionError):
        requests.get(f"{demo.url}/v2/health/live", timeout=5)
    leftover = subprocess.run(["pgrep", "-s", str(process.pid)], capture_output=True, text=True, check=False)
    assert leftover.stdout.strip() == "", f"left running: {leftover.stdout}"
