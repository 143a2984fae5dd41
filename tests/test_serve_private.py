"""``rayms.cluster.serve_private`` leans on Ray Serve internals; these tests fail loudly the day Ray changes them.

Two layers. The names the module uses (import paths, ``RequestRoutingInfo``'s fields, the parameters of
``record_request_routing_info`` on the client and the controller, the replica context's ``replica_id``)
are checked without Ray running, so an upgrade that renames anything fails here with the name in the
message. The behaviour is checked over a real Serve instance: a replica that reports model ids through
:func:`rayms.cluster.serve_private.report_model_ids` gets the handle calls made with those
``multiplexed_model_id``\\ s, and reporting logs no warning (``report_model_ids`` swallows errors so
serving survives them; the test must not).
"""

from __future__ import annotations

import dataclasses
import inspect

from tests.conftest import wait_for


def test_internal_names_and_signatures_are_the_ones_rayms_calls():
    from ray.serve._private.client import ServeControllerClient
    from ray.serve._private.common import ReplicaID, RequestRoutingInfo
    from ray.serve._private.controller import ServeController
    from ray.serve.context import ReplicaContext, _get_global_client, _get_internal_replica_context

    fields = {f.name: f for f in dataclasses.fields(RequestRoutingInfo)}
    assert {"replica_id", "multiplexed_model_ids"} <= set(fields), fields
    required = [n for n, f in fields.items()
                if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING]
    assert required == ["replica_id"], f"RequestRoutingInfo now requires {required}"
    assert fields["replica_id"].type in (ReplicaID, "ReplicaID")

    for owner in (ServeControllerClient, ServeController):
        # Once Ray runs, its tracing hook adds ``_ray_trace_ctx`` to actor methods; that one is Ray's own.
        parameters = [p for p in inspect.signature(owner.record_request_routing_info).parameters
                      if p != "_ray_trace_ctx"]
        assert parameters == ["self", "info"], f"{owner.__name__}.record_request_routing_info{parameters}"

    assert "replica_id" in {f.name for f in dataclasses.fields(ReplicaContext)}
    assert [p for p in inspect.signature(_get_global_client).parameters.values()
            if p.default is inspect.Parameter.empty] == [], "_get_global_client needs arguments now"
    assert _get_internal_replica_context() is None, "outside a replica there is no replica context"


def test_serve_multiplexing_still_reports_through_the_same_call():
    """Serve's own ``@serve.multiplexed`` is what rayms imitates; if it stops using this call, so should rayms."""
    from ray.serve import multiplex

    source = inspect.getsource(multiplex._ModelMultiplexWrapper)
    assert "record_request_routing_info(" in source and "RequestRoutingInfo(" in source
    assert "multiplexed_model_ids=" in source


def test_report_outside_a_replica_does_nothing():
    from rayms.cluster.serve_private import report_model_ids

    assert report_model_ids(["anything"]) is None


def test_reported_model_ids_route_requests_to_their_replica(ray_instance):
    from ray import serve

    from rayms.cluster.serve_private import report_model_ids

    @serve.deployment(num_replicas=2, ray_actor_options={"num_cpus": 0})
    class Reporter:
        def __init__(self) -> None:
            self.replica = serve.get_replica_context().replica_id.unique_id

        def claim(self) -> tuple[str, list[str]]:
            """Report this replica's own model id; return the id and any warning logged meanwhile."""
            import logging

            warnings: list[str] = []
            handler = logging.Handler(logging.WARNING)
            handler.emit = lambda record: warnings.append(record.getMessage())
            logger = logging.getLogger("rayms.replica")
            logger.addHandler(handler)
            try:
                report_model_ids([f"model-of-{self.replica}"])
            finally:
                logger.removeHandler(handler)
            return self.replica, warnings

        def whoami(self) -> str:
            return self.replica

    handle = serve.run(Reporter.bind(), name="serve-private", route_prefix=None)
    try:
        def claim_on_both() -> list | None:
            claims = handle.broadcast("claim").results(timeout_s=60)
            return claims if len(claims) == 2 else None

        claims = wait_for(claim_on_both, timeout_s=120, what="both replicas known to the handle")
        assert all(warnings == [] for _, warnings in claims), claims
        replicas = [replica for replica, _ in claims]

        def routed(replica: str, times: int) -> bool:
            target = handle.options(multiplexed_model_id=f"model-of-{replica}")
            return all(target.whoami.remote().result(timeout_s=60) == replica for _ in range(times))

        # Serve's routers learn the report through the controller's long poll: wait for it once.
        wait_for(lambda: all(routed(r, 5) for r in replicas), timeout_s=120, what="routing by model id")
        for replica in replicas:
            assert routed(replica, 20), f"a request for model-of-{replica} reached another replica"
    finally:
        serve.delete("serve-private")
