"""What memory a replica really has and what a model really takes, read from the operating system.

A replica's model-memory budget is, unless set, a share of the memory the machine (or its container) really
has: the smaller of the cgroup limit and the machine's total, times ``replica_memory_fraction``, divided
among the replicas on the node. A model is charged the larger of the memory it declares and what loading it
cost the process (resident memory before and after), never less than its artifact's size: a compressed pickle
or a booster that expands on load is charged what it occupies. Linux's ``/proc`` and cgroup files; elsewhere
the readings are 0 and the artifact size stands.
"""

from __future__ import annotations

import os
from pathlib import Path

CGROUP_LIMITS = (Path("/sys/fs/cgroup/memory.max"), Path("/sys/fs/cgroup/memory/memory.limit_in_bytes"))
MEMINFO = Path("/proc/meminfo")
STATM = Path("/proc/self/statm")
_PAGE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096


def machine_memory_bytes(*, meminfo: Path = MEMINFO, cgroups: tuple[Path, ...] = CGROUP_LIMITS) -> int:
    """The memory this process's machine or container may use: min(cgroup limit, MemTotal); 0 if unknown."""
    total = 0
    try:
        for line in meminfo.read_text().splitlines():
            if line.startswith("MemTotal:"):
                total = int(line.split()[1]) * 1024
                break
    except (OSError, ValueError, IndexError):
        pass
    for path in cgroups:
        try:
            text = path.read_text().strip()
        except OSError:
            continue
        if text.isdigit() and int(text) < (1 << 60):  # "max" or a huge number: no limit
            total = min(total, int(text)) if total else int(text)
    return total


def replica_budget_bytes(*, fraction: float, replicas_on_node: int, machine_bytes: int | None = None) -> int:
    """The default model-memory budget of one replica (at least 64 MiB)."""
    machine = machine_memory_bytes() if machine_bytes is None else machine_bytes
    if machine <= 0:
        machine = 4 * 2**30
    return max(64 * 2**20, int(machine * fraction / max(1, replicas_on_node)))


def process_rss_bytes(*, statm: Path = STATM) -> int:
    """This process's resident memory now (0 where ``/proc`` is missing)."""
    try:
        return int(statm.read_text().split()[1]) * _PAGE
    except (OSError, ValueError, IndexError):
        return 0
