"""Peer servers for ``serve_bench.py``: MLServer and KServe's Python model server, each in a venv of its own,
and the venv rayms itself is measured from.

Each peer gets ``benchmarks/.venvs/<kind>``, created with ``python3.11 -m venv`` and holding the peer's pinned
release plus the scikit-learn, numpy and joblib versions of the project venv (read at run time), so the
pickled models load into the same code that fitted them. A venv whose marker file lists exactly the
requirement lines wanted is reused as it is; anything else is rebuilt from scratch.

rayms runs from ``benchmarks/.venvs/rayms``: rayms installed as a user installs it (its own dependencies, at
the versions of ``.ci/constraints.txt``), without the project venv's test tools. One of those, KServe's
client, brings pandas, and Ray Serve imports pandas (and with it pyarrow) into every one of its processes
when it is installed: about 65 MB more in each of a dozen processes.

    .venv/bin/python benchmarks/peers.py [mlserver kserve rayms]     # create or check the venvs only
"""

from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
import sys
import time
from importlib.metadata import version
from pathlib import Path

import procs

BENCH = Path(__file__).resolve().parent
REPO = BENCH.parent
VENVS = BENCH / ".venvs"
# uvloop 0.22 (October 2025) breaks MLServer 1.7.1's inference workers: they call asyncio.get_event_loop()
# with no loop set, which uvloop now refuses (SeldonIO/MLServer#2286). 0.21 was current when 1.7.1 came out.
PINS = {"mlserver": ["mlserver==1.7.1", "mlserver-sklearn==1.7.1", "uvloop<0.22"], "kserve": ["kserve==0.21.0"],
        "rayms": ["-e", str(REPO), "-c", str(REPO / ".ci" / "constraints.txt")]}
SHARED = ("scikit-learn", "numpy", "joblib")  # same versions as the project venv: the pickles must load alike
MARKER = "bench-requirements.txt"  # the requirement lines a venv was installed with, written once pip succeeded
INSTALL_RECORD = "bench-install.json"  # how long that install took, and when
# Versions written into the benchmark's record.
REPORTED = {"mlserver": ["mlserver", "mlserver-sklearn", "fastapi", "uvicorn", "uvloop", *SHARED],
            "kserve": ["kserve", "fastapi", "uvicorn", "uvloop", *SHARED],
            "rayms": ["rayms", "ray", "fastapi", "uvicorn", "orjson", *SHARED]}


# ------------------------------------------------------------------------------------------ venvs
def requirements(kind: str) -> list[str]:
    if kind == "rayms":  # the constraints pin the shared libraries to the project venv's versions already
        return PINS[kind]
    return [*PINS[kind], *(f"{name}=={version(name)}" for name in SHARED)]


def fingerprint(kind: str) -> list[str]:
    """What a venv was built from: its requirement lines, and for rayms the files that decide its dependencies
    (its code is installed editable, so code changes need no rebuild)."""
    if kind != "rayms":
        return requirements(kind)
    digest = hashlib.sha256(b"".join((REPO / f).read_bytes() for f in ("pyproject.toml", ".ci/constraints.txt")))
    return [*requirements(kind), f"# pyproject.toml + constraints.txt sha256 {digest.hexdigest()}"]


def ensure_venv(kind: str, root: Path = VENVS) -> dict:
    """The venv of ``kind``, created and installed unless its marker already lists the same requirements.

    Returns ``{"python": ..., "requirements": [...], "reused": bool, "install_s": ..., "installed_at": ...}``
    (for a reused venv, the seconds and date of the install that made it).
    """
    venv = root / kind
    python = venv / "bin" / "python"
    marker = venv / MARKER
    wanted = requirements(kind)
    info = {"python": str(python), "requirements": wanted}
    if python.exists() and marker.exists() and marker.read_text().splitlines() == fingerprint(kind):
        try:
            earlier = json.loads((venv / INSTALL_RECORD).read_text())
        except (OSError, ValueError):
            earlier = {"install_s": None, "installed_at": None}
        return info | {"reused": True, **earlier}
    started = time.monotonic()
    shutil.rmtree(venv, ignore_errors=True)
    root.mkdir(parents=True, exist_ok=True)
    interpreter = shutil.which("python3.11") or sys.executable
    subprocess.run([interpreter, "-m", "venv", str(venv)], check=True)
    log = venv / "install.log"
    with open(log, "w") as out:
        done = subprocess.run([str(python), "-m", "pip", "install", "--no-input", *wanted],
                              stdout=out, stderr=subprocess.STDOUT)
    if done.returncode != 0:
        tail = log.read_text(errors="replace")[-3000:]
        raise RuntimeError(f"pip install into {venv} failed ({done.returncode}):\n{tail}")
    done_record = {"install_s": round(time.monotonic() - started, 1),
                   "installed_at": time.strftime("%Y-%m-%dT%H:%M:%S")}
    (venv / INSTALL_RECORD).write_text(json.dumps(done_record))
    marker.write_text("\n".join(fingerprint(kind)) + "\n")  # written last: a half-installed venv is never reused
    return info | {"reused": False, **done_record}


def installed(python: str, names: list[str]) -> dict[str, str]:
    """Versions of ``names`` inside the venv of ``python`` (for the benchmark's record)."""
    code = ("import json, sys; from importlib.metadata import version; "
            "print(json.dumps({n: version(n) for n in sys.argv[1:]}))")
    out = subprocess.run([python, "-c", code, *names], capture_output=True, text=True)
    try:
        return json.loads(out.stdout)
    except ValueError:
        return {"error": out.stderr[-500:]}


# ------------------------------------------------------------------------------------------ servers
def model_names(models: Path) -> list[str]:
    """The models of a repository folder: every ``<name>/model.joblib`` under it."""
    return sorted(p.name for p in models.iterdir() if (p / "model.joblib").is_file())


def mlserver_repository(folder: Path, models: Path, *, load_at_startup: bool) -> dict:
    """MLServer's model repository: ``settings.json`` plus ``<name>/model-settings.json`` per model, each
    pointing at ``models/<name>/model.joblib`` (the models themselves are not copied).

    MLServer's defaults are kept (one parallel inference worker, metrics, gzip) except: it listens on
    127.0.0.1 on free ports (gRPC cannot be turned off, so it gets a free port too, as do the metrics), and
    ``debug`` is off, which also turns off uvicorn's access log."""
    folder.mkdir(parents=True, exist_ok=True)
    settings = {"host": "127.0.0.1", "http_port": procs.free_port(), "grpc_port": procs.free_port(),
                "metrics_port": procs.free_port(), "debug": False, "load_models_at_startup": load_at_startup}
    (folder / "settings.json").write_text(json.dumps(settings, indent=1))
    for name in model_names(models):
        (folder / name).mkdir(exist_ok=True)
        model_settings = {"name": name, "implementation": "mlserver_sklearn.SKLearnModel",
                          "parameters": {"uri": str(models / name / "model.joblib")}}
        (folder / name / "model-settings.json").write_text(json.dumps(model_settings, indent=1))
    return settings


def mlserver(work: Path, models: Path, *, preload: bool, venv: Path = VENVS / "mlserver") -> procs.Server:
    """``mlserver start <repository>``. With ``preload`` it loads every model before it answers ready;
    without, it starts empty and ``POST /v2/repository/models/{name}/load`` loads ``name`` from its
    repository folder. Runs in ``work`` because MLServer keeps ``.metrics`` and ``.envs`` in its cwd."""
    work.mkdir(parents=True, exist_ok=True)
    repository = work / "mlserver-repository"
    settings = mlserver_repository(repository, models.resolve(), load_at_startup=preload)
    return procs.Server(name="mlserver", cmd=[str(venv / "bin" / "mlserver"), "start", str(repository)],
                        port=settings["http_port"], log_path=work / "server.log", cwd=work)


def kserve(work: Path, models: Path, *, preload: bool, venv: Path = VENVS / "kserve") -> procs.Server:
    """``kserve_server.py`` (KServe's ``ModelServer`` over the joblib files) with the KServe venv's python."""
    work.mkdir(parents=True, exist_ok=True)
    port = procs.free_port()
    cmd = [str(venv / "bin" / "python"), str(BENCH / "kserve_server.py"), "--port", str(port),
           "--model-dir", str(models.resolve()), *(["--preload"] if preload else [])]
    return procs.Server(name="kserve", cmd=cmd, port=port, log_path=work / "server.log", cwd=work)


SERVERS = {"mlserver": mlserver, "kserve": kserve}


def make_server(kind: str, work: Path, models: Path, *, preload: bool) -> procs.Server:
    return SERVERS[kind](work, models, preload=preload, venv=VENVS / kind)


def main() -> None:
    for kind in sys.argv[1:] or list(PINS):
        info = ensure_venv(kind)
        print(kind, json.dumps(info), flush=True)


if __name__ == "__main__":
    main()
