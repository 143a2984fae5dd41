"""HAProxy replays a request on another replica only if no byte of it reached the first one.

HAProxy's documentation calls every retry-on keyword other than ``conn-failure`` (and ``0rtt-rejected``, early
data the server refused) dangerous unless replays are harmless: after ``empty-response`` or
``response-timeout`` the replica did receive the request, and a request that killed or hung one replica then
goes to the next. ``rayms serve`` and the RayService (tests/test_kuberay_manifests.py checks they agree) take
their HAProxy variables from :data:`rayms.ray_env.HAPROXY_ROUTING`.
"""

from __future__ import annotations

from rayms.ray_env import HAPROXY_ROUTING

SAFE = {"conn-failure", "0rtt-rejected", "none"}


def test_haproxy_retries_only_requests_no_replica_received() -> None:
    retry_on = HAPROXY_ROUTING["RAY_SERVE_HAPROXY_RETRY_ON"].split()
    assert retry_on and set(retry_on) <= SAFE, retry_on
