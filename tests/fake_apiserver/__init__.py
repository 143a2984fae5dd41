"""A faithful-enough fake Kubernetes API server for rayms tests.

There is no kube-apiserver (nor envtest/kind) on the development and CI
machines, so tests run the *real* ``kubernetes`` Python client (and, if
wanted, kubectl) against this in-process HTTP server on ``127.0.0.1``.  It
serves the repo's real CRD YAML (``kuberay/trainedmodel-crd.yaml``) and
KubeRay's RayService CRD, so manifests and tests cannot drift apart.  Its
behaviour is pinned by ``tests/test_fake_apiserver.py``.

Honoured (semantics of kube-apiserver / apiextensions-apiserver):

* paths ``/api/v1/...`` and ``/apis/<g>/<v>/...``, namespaced and cluster-wide,
  ``<plural>[/<name>[/status]]``; discovery (``/version``, ``/api``, ``/api/v1``,
  ``/apis``, ``/apis/<g>``, ``/apis/<g>/<v>`` incl. ``<plural>/status``);
* CRDs loaded from YAML or POSTed to ``customresourcedefinitions`` (group,
  names, scope, served/storage versions, status subresource, schema);
  deleting a CRD deletes its objects;
* create (201, generateName, 409 AlreadyExists, 404 for a missing namespace),
  get (404 Status), list (resourceVersion, labelSelector incl. set-based,
  fieldSelector ``metadata.name``/``metadata.namespace``, ``limit`` +
  ``continue`` over a consistent snapshot, 410 for an expired token),
  PUT (resourceVersion required on CRs, 409 on stale), merge patch and JSON
  patch (strategic merge and apply patch on CRs -> 415), ``dryRun=All``,
  ``fieldValidation`` (Warn header / Strict 400 for pruned fields);
* status subresource isolation, ``metadata.generation`` bumped only by
  changes outside metadata/status, no-op writes bump nothing;
* pruning of undeclared fields, ``default:``, and validation of types,
  required, enum, pattern, bounds, int-or-string (422 Invalid with causes);
* finalizers and deletionTimestamp (no new finalizers while terminating),
  delete preconditions, propagationPolicy Background (default) / Foreground
  / Orphan, asynchronous ownerReference garbage collection by uid (after
  ``gc_delay``), objects of a deleted namespace collected;
* watch with resourceVersion resume, synthetic ADDED for RV unset/"0",
  label/field/namespace filtering with ADDED/DELETED on selector transitions,
  ``timeoutSeconds``, BOOKMARKs, ``sendInitialEvents``, and an ERROR event
  with a 410 Expired Status when the RV is older than the retained history.

Test hooks: ``compact()``, ``drop_watches()``, ``inject_failure()``, the
request log (``requests``, ``write_count``), direct object access and
in-process writes, ``wait_for()``.

Not implemented (do not rely on them): authentication, authorization/RBAC,
admission webhooks, CEL ``x-kubernetes-validations``, ``anyOf``/``oneOf``/
``allOf``/``not`` and ``format`` checks, conversion webhooks (versions are
served with the None strategy), server-side apply and managedFields,
strategic merge for custom resources, Table and protobuf output (so
``kubectl get`` shows NAME/AGE, not the CRD's printer columns), ``/scale``,
OpenAPI documents (``/openapi/v2|v3`` answer 404; use ``kubectl
--validate=false``), ``resourceVersion`` semantics on list/get (always the
latest state), "too large resource version" waits, namespace finalization
(deleting a namespace is immediate), pod/kubelet or any controller other
than the garbage collector.  Built-in kinds (ConfigMap, Service, Pod, ...)
are stored schemaless.
"""

from .errors import ApiError
from .schema import ResourceType, structural_problems
from .server import (
    BUILTIN_RAYSERVICE_CRD,
    RAYSERVICE_CRD_REFERENCE,
    TRAINEDMODEL_CRD,
    FakeApiServer,
    Injection,
    RequestRecord,
    default_crd_paths,
    load_crds,
)
from .store import Event

__all__ = [
    "ApiError", "BUILTIN_RAYSERVICE_CRD", "Event", "FakeApiServer", "Injection",
    "RAYSERVICE_CRD_REFERENCE", "RequestRecord", "ResourceType", "TRAINEDMODEL_CRD",
    "default_crd_paths", "load_crds", "structural_problems",
]
