"""Listener ports for one rayms instance that nothing else on the machine is likely to take meanwhile.

A port the kernel hands out for ``bind(0)`` lies in its ephemeral range (32768–60999 on Linux), the same range
it draws from for outgoing connections. Ray opens many of those while it starts, so a port found free there
may be taken before HAProxy or a server binds it seconds later. Ports are drawn instead from a range no
default allocation uses: above Ray's worker ports (10002–19999) and below Serve's direct-ingress ports
(30000–31000) and the ephemeral range.
"""

from __future__ import annotations

import ipaddress
import random
import socket

PORT_RANGE = (20000, 29999)


def free_port(host: str = "127.0.0.1", *, attempts: int = 200) -> int:
    """A port in :data:`PORT_RANGE` that ``host`` can bind right now, picked at random so that instances
    starting side by side do not race for the same one."""
    pick = random.SystemRandom()
    for _ in range(attempts):
        port = pick.randint(*PORT_RANGE)
        with socket.socket() as sock:
            try:
                sock.bind((host, port))
            except OSError:
                continue
            return port
    raise OSError(f"no free port between {PORT_RANGE[0]} and {PORT_RANGE[1]} on {host}")


def is_loopback_address(host: str) -> bool:
    """Whether a bind address names this machine only (``127.0.0.0/8``, ``::1``, ``localhost``), without
    asking DNS. The one rule of "bound to loopback" (:mod:`rayms.access` adds a DNS lookup for other names)."""
    if host in ("localhost", "ip6-localhost"):
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False
