"""Everything in rayms that calls Ray or Ray Serve, and nothing else.

The rest of rayms is plain Python and asyncio behind small Protocols (the registry's
:class:`~rayms.registry.Placer`, the data plane's :class:`~rayms.dataplane.Models` and
:class:`~rayms.dataplane.Control`, the model host's :class:`~rayms.host.ArtifactSource` and
:class:`~rayms.host.RegistryReporter`, the bridge's :class:`~rayms.k8s.bridge.RegistryClient`); this package
implements them over Serve handles and Ray actors and defines the Serve deployments that own those objects:

- :mod:`~rayms.cluster.remote`: the one rule that turns an exception from another Ray process back into the
  :class:`~rayms.errors.RaymsError` it was;
- :mod:`~rayms.cluster.handles`: the Protocol implementations over deployment handles;
- :mod:`~rayms.cluster.agent`: the node's artifact agent actor;
- :mod:`~rayms.cluster.deployments`: the deployment classes, their names, and the application graph;
- :mod:`~rayms.cluster.grpc`: the gRPC service's binding to Serve;
- :mod:`~rayms.cluster.batch`: batch scoring on Ray Data (:mod:`rayms.scoring` is its plain logic);
- :mod:`~rayms.cluster.metrics` and :mod:`~rayms.cluster.serve_private`: Ray's metrics API, and the one use of
  Serve internals.
"""
