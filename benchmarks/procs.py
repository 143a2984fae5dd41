"""Servers as process trees: start one, find every process it owns, read their CPU and memory, stop them all.

A Ray-based server is a dozen processes: the CLI (the Ray driver), the GCS and the raylet it starts, and the
workers the raylet starts (controller, proxy, replicas, agents). They all descend from the CLI process, but a
process whose parent exits is re-parented to init and would drop out of a plain tree walk, so the benchmark
also gives Ray a temporary folder of its own (``RAY_TMPDIR``) and counts every process whose command line names
it, together with that process's descendants. Processes of other Ray instances on the same machine never match.

Only processes found this way are ever signalled, each by its pid, after checking that the pid still belongs
to the same process (same start time).
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import requests

from rayms.ports import free_port

TICKS_PER_S = os.sysconf("SC_CLK_TCK")


def _stat(pid: int) -> list[str] | None:
    """Fields of ``/proc/<pid>/stat`` after the command name (index 0 is the state)."""
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return raw[raw.rindex(")") + 2:].split()


def _parents() -> dict[int, int]:
    parents = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit() and (fields := _stat(int(entry))) is not None:
            parents[int(entry)] = int(fields[1])
    return parents


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def descendants(roots: set[int], parents: dict[int, int] | None = None) -> set[int]:
    """``roots`` and every process below them."""
    parents = parents if parents is not None else _parents()
    children: dict[int, list[int]] = {}
    for pid, ppid in parents.items():
        children.setdefault(ppid, []).append(pid)
    found, todo = set(), [r for r in roots if r in parents]
    while todo:
        pid = todo.pop()
        if pid not in found:
            found.add(pid)
            todo.extend(children.get(pid, ()))
    return found


def server_processes(root: int, marker: str | None = None) -> set[int]:
    """The tree of ``root`` plus, when ``marker`` is given, the tree of every process whose command line has it."""
    parents = _parents()
    roots = {root}
    if marker:
        roots |= {pid for pid in parents if marker in _cmdline(pid)}
    return descendants(roots, parents)


def start_time(pid: int) -> int | None:
    """When ``pid`` started (clock ticks after boot); ``None`` when it is gone or a zombie."""
    fields = _stat(pid)
    return int(fields[19]) if fields and fields[0] != "Z" else None


def cpu_seconds(pids: set[int]) -> float:
    """User plus system CPU time of ``pids`` (processes that already exited count nothing)."""
    ticks = 0
    for pid in pids:
        if (fields := _stat(pid)) is not None:
            ticks += int(fields[11]) + int(fields[12])
    return ticks / TICKS_PER_S


def memory(pids: set[int]) -> dict[str, float]:
    """RSS and PSS summed over ``pids`` in MB (10**6 bytes), from ``/proc/<pid>/smaps_rollup``."""
    kib = {"Rss": 0, "Pss": 0}
    counted = 0
    for pid in pids:
        try:
            lines = Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines()
        except OSError:
            continue
        counted += 1
        for line in lines:
            key, _, rest = line.partition(":")
            if key in kib:
                kib[key] += int(rest.split()[0])
    return {"rss_mb": round(kib["Rss"] * 1024 / 1e6, 1), "pss_mb": round(kib["Pss"] * 1024 / 1e6, 1),
            "processes": counted}


def describe(pids: set[int]) -> list[str]:
    """Short names of ``pids`` (``ray::ServeReplica:...``, ``raylet``, ``python ...``) for the record."""
    names = []
    for pid in sorted(pids):
        words = _cmdline(pid).split() or ["?"]
        name = words[0] if words[0].startswith("ray::") else words[0].rsplit("/", 1)[-1]
        if name.startswith("python"):  # name the script or module instead of the interpreter
            if "-m" in words[:-1]:
                name = f"python -m {words[words.index('-m') + 1]}"
            elif "-c" in words[:-1] and "from" in words and words.index("from") + 1 < len(words):
                # multiprocessing's children: ``python -c "from multiprocessing.spawn import spawn_main; ..."``
                name = f"python -c {words[words.index('from') + 1]}"
            else:
                name = next((w.rsplit("/", 1)[-1] for w in words[1:] if not w.startswith("-")), name)
        names.append(name)
    return names


class ServerExited(RuntimeError):
    """The server process ended while we waited for it."""


def poll(condition: Callable[[], object], *, timeout_s: float, what: str, interval_s: float = 0.05) -> object:
    """Call ``condition`` until it returns something truthy; raise after ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    last: Exception | None = None
    while time.monotonic() < deadline:
        try:
            value = condition()
            if value:
                return value
        except ServerExited:
            raise
        except Exception as exc:  # keep polling through connection refusals while starting
            last = exc
        time.sleep(interval_s)
    raise TimeoutError(f"timed out after {timeout_s}s waiting for {what}; last error: {last}")


@dataclass
class Server:
    """One server started as a subprocess, owning every process found under it."""

    name: str
    cmd: list[str]
    port: int
    env: dict[str, str] = field(default_factory=dict)
    marker: str | None = None
    log_path: Path | None = None
    cwd: Path | None = None
    proc: subprocess.Popen | None = None
    started_at: float = 0.0
    known: dict[int, int | None] = field(default_factory=dict)  # pid -> start time, everything ever seen

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> "Server":
        log = open(self.log_path, "ab") if self.log_path else subprocess.DEVNULL
        self.started_at = time.monotonic()
        self.proc = subprocess.Popen(self.cmd, env={**os.environ, **self.env}, stdout=log, cwd=self.cwd,
                                     stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        return self

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def processes(self) -> set[int]:
        """Every process of this server now; remembered so :meth:`stop` can check none is left."""
        pids = server_processes(self.proc.pid, self.marker)
        for pid in pids:
            self.known.setdefault(pid, start_time(pid))
        return pids

    def wait_ready(self, probe: Callable[[], bool], timeout_s: float) -> float:
        """Seconds from spawn until ``probe`` holds (the process must stay up meanwhile)."""

        def check() -> bool:
            if not self.alive():
                raise ServerExited(f"{self.name} exited with {self.proc.returncode}: {self.log_tail(600)}")
            self.processes()
            return probe()

        poll(check, timeout_s=timeout_s, what=f"{self.name} ready", interval_s=0.1)
        return time.monotonic() - self.started_at

    def log_tail(self, chars: int = 4000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-chars:] if self.log_path else ""
        except OSError:
            return ""

    def get(self, path: str, **kwargs) -> requests.Response:
        return requests.get(self.url + path, timeout=kwargs.pop("timeout", 30), **kwargs)

    def post(self, path: str, **kwargs) -> requests.Response:
        return requests.post(self.url + path, timeout=kwargs.pop("timeout", 120), **kwargs)

    def stop(self, timeout_s: float = 90.0, again_after_s: float = 10.0) -> dict:
        """SIGTERM the server process and wait for every process it owned to exit.

        A server still running ``again_after_s`` later gets a second SIGTERM, as a user presses Ctrl-C twice:
        uvicorn-based servers (MLServer) wait for their background tasks after the first one and quit on the
        second. Returns how long the server process took to exit, whether it needed the second signal, how
        long until every process it owned was gone, and which processes had to be killed (by pid) because
        they were still there 30 s after it exited.
        """
        if self.proc is None:
            return {}
        if self.alive():
            self.processes()
        started = time.monotonic()
        signals = 0
        if self.alive():
            self.proc.send_signal(signal.SIGTERM)
            signals = 1
        try:
            self.proc.wait(timeout=again_after_s)
        except subprocess.TimeoutExpired:
            self.proc.send_signal(signal.SIGTERM)
            signals = 2
            try:
                self.proc.wait(timeout=max(timeout_s - again_after_s, 1.0))
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=30)
        exit_s = time.monotonic() - started

        def ours() -> list[int]:
            return [pid for pid, when in self.known.items() if when is not None and start_time(pid) == when]

        try:
            poll(lambda: not ours(), timeout_s=30, what=f"{self.name} processes to exit", interval_s=0.1)
        except TimeoutError:
            pass
        gone_s = time.monotonic() - started
        leftovers = ours()
        names = describe(set(leftovers))
        for pid in leftovers:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        return {"exit_code": self.proc.returncode, "stop_s": round(exit_s, 2), "sigterms": signals,
                "all_gone_s": round(gone_s, 2), "leftovers_killed": names}


def memory_by_process(pids: set[int]) -> list[dict]:
    """Per-process RSS/PSS (MB) with a short name, largest PSS first: where a server's memory sits."""
    rows = []
    for pid, name in zip(sorted(pids), describe(pids)):
        one = memory({pid})
        if one["processes"]:
            rows.append({"pid": pid, "name": name, "rss_mb": one["rss_mb"], "pss_mb": one["pss_mb"]})
    return sorted(rows, key=lambda r: -r["pss_mb"])


def busy_cpu_seconds() -> float:
    """CPU time all processes of the machine spent busy so far (from ``/proc/stat``)."""
    fields = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    idle = fields[3] + fields[4]
    return (sum(fields[:8]) - idle) / TICKS_PER_S


def rayms_command(venv: Path) -> list[str]:
    """How a user starts rayms: the ``rayms`` script of the venv, or ``python -m rayms.cli`` without it."""
    script = venv / "bin" / "rayms"
    if script.exists():
        return [str(script)]
    return [str(venv / "bin" / "python"), "-m", "rayms.cli"]


def rayms_server(repo_root: Path, work: Path, *, args: list[str], name: str = "rayms",
                 env: dict[str, str] | None = None, venv: Path | None = None) -> Server:
    """A ``rayms serve`` subprocess with its own Ray folder, state file and artifact cache under ``work``;
    ``env`` adds variables (e.g. ``RAYMS_INGRESS``); ``venv`` defaults to the project's ``.venv``."""
    work.mkdir(parents=True, exist_ok=True)
    port = free_port()
    cmd = [*rayms_command(venv or repo_root / ".venv"), "serve", "--port", str(port),
           "--state", str(work / "state.json"),
           "--cache-dir", str(work / "cache"), *args]
    # RAY_TMPDIR gives this Ray instance a folder no other instance uses: the marker of its processes.
    return Server(name=name, cmd=cmd, port=port, env={**(env or {}), "RAY_TMPDIR": str(work)}, marker=f"{work}/",
                  log_path=work / "server.log", cwd=repo_root)
