"""The local mode's HAProxy environment: nothing on a fixed port, nothing shared between instances."""

from __future__ import annotations

import shutil
from pathlib import Path

from rayms.local import haproxy_env


def test_every_port_and_file_of_haproxy_mode_is_private_to_one_instance():
    first, second = haproxy_env(), haproxy_env()
    try:
        for env in (first, second):
            ports = {key: int(value) for key, value in env.items() if key.endswith("_PORT")}
            # Serve's idle fallback proxy defaults to 8500/9500: two instances on one machine would collide.
            assert {"RAY_SERVE_FALLBACK_PROXY_HTTP_PORT", "RAY_SERVE_FALLBACK_PROXY_GRPC_PORT"} <= set(ports)
            assert not {8500, 9500} & set(ports.values())
            assert Path(env["RAY_SERVE_HAPROXY_SERVER_STATE_BASE"]).is_dir()
            # no access log line per request to the machine's syslog (HAProxy's default, UDP 127.0.0.1:514)
            assert env["RAY_SERVE_HAPROXY_LOG_TARGET"].startswith(env["RAY_SERVE_HAPROXY_SERVER_STATE_BASE"] + "/")
        assert first["RAY_SERVE_HAPROXY_SERVER_STATE_BASE"] != second["RAY_SERVE_HAPROXY_SERVER_STATE_BASE"]
        assert first["RAY_SERVE_HAPROXY_SOCKET_PATH"] != second["RAY_SERVE_HAPROXY_SOCKET_PATH"]
    finally:
        for env in (first, second):
            shutil.rmtree(env["RAY_SERVE_HAPROXY_SERVER_STATE_BASE"], ignore_errors=True)


def test_free_ports_avoid_the_ephemeral_range_and_rays_own_ranges():
    from rayms.ports import PORT_RANGE, free_port

    low, high = (int(v) for v in Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split())
    ports = {free_port() for _ in range(20)}
    assert all(PORT_RANGE[0] <= port <= PORT_RANGE[1] for port in ports)
    assert not any(low <= port <= high for port in ports)  # never where outgoing connections draw from
    assert len(ports) > 1  # random, so instances starting together do not pick the same one


def test_stop_haproxy_stops_by_pid_only_the_processes_of_its_own_instance(tmp_path):
    import subprocess
    import sys

    from rayms.local import stop_haproxy

    mine, other = tmp_path / "rayms-haproxy-mine", tmp_path / "rayms-haproxy-mine2"
    sleeper = [sys.executable, "-c", "import signal; signal.pause()"]  # runs until signalled
    ours = subprocess.Popen([*sleeper, "-f", f"{mine}/abc/haproxy.cfg"])  # how HAProxy names its config
    theirs = subprocess.Popen([*sleeper, "-f", f"{other}/abc/haproxy.cfg"])  # another instance's: a longer name
    try:
        assert stop_haproxy(str(mine), timeout_s=10) == [ours.pid]
        assert ours.wait(timeout=10) is not None
        assert theirs.poll() is None
    finally:
        for process in (ours, theirs):
            process.kill()
            process.wait()
