"""Conformance tests for the fake Kubernetes API server and the TrainedModel CRD.

Each test pins one behaviour of the real kube-apiserver that rayms' controller
relies on, exercised through the *real* ``kubernetes`` client
(``CustomObjectsApi``, ``CoreV1Api``, ``watch.Watch``, ``dynamic``), so a
controller tested against ``tests/fake_apiserver`` sees what it would see on a
cluster.  The CRD tests check ``kuberay/trainedmodel-crd.yaml`` itself: KServe
spec parity, printer columns, short name, structural schema, and
``kubernetes-validate``.

Nothing here sleeps for a fixed time: conditions are polled with a timeout
(``FakeApiServer.wait_for``) and watches are bounded by ``timeoutSeconds``.
"""

from __future__ import annotations

import copy
import http.client
import itertools
import json
import threading
from pathlib import Path

import pytest
import yaml
from kubernetes import client, dynamic, watch
from kubernetes.client.rest import ApiException

try:  # tests/ is a package and the repo root is on sys.path
    from tests.fake_apiserver import TRAINEDMODEL_CRD, FakeApiServer, structural_problems
except ModuleNotFoundError:  # only tests/ itself is on sys.path
    from fake_apiserver import TRAINEDMODEL_CRD, FakeApiServer, structural_problems

GROUP, VERSION, PLURAL = "serving.rayms.io", "v1alpha1", "trainedmodels"
API_VERSION = f"{GROUP}/{VERSION}"
KSERVE_CRD = Path("/work/shared/reference/kserve-trainedmodel-crd.yaml")
_counter = itertools.count()


# ----------------------------------------------------------------------------- fixtures & helpers

@pytest.fixture(scope="module")
def server():
    """One server for tests that only touch their own namespace."""
    with FakeApiServer() as srv:
        yield srv
    assert srv.internal_errors == []


@pytest.fixture
def fresh():
    """A private server for tests that compact, drop watches or inject failures."""
    with FakeApiServer(crd_paths=[TRAINEDMODEL_CRD], bookmark_interval=0.2) as srv:
        yield srv
    assert srv.internal_errors == []


@pytest.fixture
def api(server):
    with client.ApiClient(server.client_configuration()) as api_client:
        yield client.CustomObjectsApi(api_client)


@pytest.fixture
def core(server):
    with client.ApiClient(server.client_configuration()) as api_client:
        yield client.CoreV1Api(api_client)


@pytest.fixture
def ns(core):
    """A namespace of its own for each test, created through the API."""
    name = f"t{next(_counter)}"
    core.create_namespace(client.V1Namespace(metadata=client.V1ObjectMeta(name=name)))
    return name


def custom_api(srv: FakeApiServer) -> client.CustomObjectsApi:
    return client.CustomObjectsApi(srv.api_client())


def tm(name: str, *, storage_uri: str = "s3://models/iris", **metadata) -> dict:
    return {
        "apiVersion": API_VERSION, "kind": "TrainedModel",
        "metadata": {"name": name, **metadata},
        "spec": {"inferenceService": "mms",
                 "model": {"storageUri": storage_uri, "framework": "sklearn", "memory": "256Mi"}},
    }


def status_of(exc: ApiException) -> dict:
    return json.loads(exc.body)


def owner_ref(obj: dict) -> dict:
    md = obj["metadata"]
    return {"apiVersion": obj["apiVersion"], "kind": obj["kind"], "name": md["name"],
            "uid": md["uid"], "controller": True, "blockOwnerDeletion": True}


def create(api, ns, body):
    return api.create_namespaced_custom_object(GROUP, VERSION, ns, PLURAL, body)


def get(api, ns, name):
    return api.get_namespaced_custom_object(GROUP, VERSION, ns, PLURAL, name)


def gone(srv, plural, name, ns):
    return lambda: srv.get_object(plural, name, ns) is None


def collect(func, *args, count: int, timeout: int = 5, w: watch.Watch | None = None, **kwargs):
    """Up to ``count`` events from a watch bounded by ``timeoutSeconds``."""
    w = w or watch.Watch()
    events = []
    for event in w.stream(func, *args, timeout_seconds=timeout, **kwargs):
        events.append(event)
        if len(events) >= count:
            w.stop()
            break
    return events


# ----------------------------------------------------------------------------- the CRD manifest

def _load_crd() -> dict:
    return yaml.safe_load(TRAINEDMODEL_CRD.read_text())


def _strip_descriptions(node):
    if isinstance(node, dict):
        return {k: _strip_descriptions(v) for k, v in node.items() if k != "description"}
    if isinstance(node, list):
        return [_strip_descriptions(v) for v in node]
    return node


def test_crd_identity_short_name_and_printer_columns():
    crd = _load_crd()
    spec = crd["spec"]
    assert crd["metadata"]["name"] == "trainedmodels.serving.rayms.io"
    assert (spec["group"], spec["scope"]) == ("serving.rayms.io", "Namespaced")
    assert spec["names"]["kind"] == "TrainedModel" and spec["names"]["plural"] == "trainedmodels"
    assert spec["names"]["shortNames"] == ["rtm"]  # KServe owns "tm"
    [version] = spec["versions"]
    assert (version["name"], version["served"], version["storage"]) == ("v1alpha1", True, True)
    assert version["subresources"] == {"status": {}}
    columns = [(c["name"], c["type"], c["jsonPath"]) for c in version["additionalPrinterColumns"]]
    assert columns == [
        ("URL", "string", ".status.url"),
        ("Ready", "string", '.status.conditions[?(@.type=="Ready")].status'),
        ("State", "string", ".status.state"),
        ("Age", "date", ".metadata.creationTimestamp"),
    ]


def test_crd_spec_is_kserves_field_for_field():
    schema = _load_crd()["spec"]["versions"][0]["schema"]["openAPIV3Schema"]
    spec = schema["properties"]["spec"]
    assert spec["required"] == ["inferenceService", "model"]
    model = spec["properties"]["model"]
    assert sorted(model["required"]) == ["framework", "memory", "storageUri"]
    assert model["properties"]["memory"]["x-kubernetes-int-or-string"] is True
    # rayms's own additions: optional, so every KServe manifest stays valid
    extensions = {"sha256"}
    assert not extensions & set(model["required"])
    if KSERVE_CRD.is_file():  # otherwise exact parity with KServe's published schema
        kserve = yaml.safe_load(KSERVE_CRD.read_text())
        kserve_spec = kserve["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"]
        ours = copy.deepcopy(spec)
        for name in extensions:
            del ours["properties"]["model"]["properties"][name]
        assert _strip_descriptions(ours) == _strip_descriptions(kserve_spec)
    status = schema["properties"]["status"]["properties"]
    condition = status["conditions"]["items"]
    assert set(condition["properties"]) == {"type", "status", "reason", "message",
                                            "lastTransitionTime", "severity"}
    assert condition["required"] == ["type", "status"]
    assert status["state"]["type"] == status["url"]["type"] == "string"
    assert status["address"]["properties"]["url"]["type"] == "string"
    assert status["observedGeneration"]["type"] == "integer"


def test_crd_schema_is_structural():
    schema = _load_crd()["spec"]["versions"][0]["schema"]["openAPIV3Schema"]
    untyped = []

    def walk(node, path):  # independent of the fake's own checker
        if not ("type" in node or node.get("x-kubernetes-int-or-string")
                or node.get("x-kubernetes-preserve-unknown-fields")):
            untyped.append(path)
        for key, child in node.get("properties", {}).items():
            walk(child, f"{path}.{key}")
        if isinstance(node.get("items"), dict):
            walk(node["items"], f"{path}[]")
        if isinstance(node.get("additionalProperties"), dict):
            walk(node["additionalProperties"], f"{path}{{}}")
        for alternative in node.get("anyOf", []):
            assert set(alternative) == {"type"}, f"{path}: anyOf may only hold types"

    walk(schema, "openAPIV3Schema")
    assert untyped == []
    assert schema["type"] == "object"
    assert structural_problems(schema) == []


def test_crd_passes_kubernetes_validate():
    kubernetes_validate = pytest.importorskip("kubernetes_validate")
    crd = _load_crd()
    kubernetes_validate.validate(crd, "1.30", strict=True)
    broken = copy.deepcopy(crd)
    broken["spec"]["versions"][0]["storage"] = "yes"
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(broken, "1.30", strict=True)


def test_kserve_manifest_works_by_changing_only_api_version(api, ns):
    manifest = yaml.safe_load("""
        apiVersion: serving.kserve.io/v1alpha1
        kind: TrainedModel
        metadata:
          name: model1
        spec:
          inferenceService: sklearn-iris-example
          model:
            storageUri: gs://kfserving-examples/models/sklearn/1.0/model
            framework: sklearn
            memory: 256Mi
    """)
    manifest["apiVersion"] = API_VERSION
    created = create(api, ns, manifest)
    assert created["spec"] == manifest["spec"]


# ----------------------------------------------------------------------------- discovery & CRDs

def test_discovery_documents(server):
    api_client = server.api_client()
    assert client.VersionApi(api_client).get_code().git_version.startswith("v1.")
    groups = {g.name: g for g in client.ApisApi(api_client).get_api_versions().groups}
    assert groups[GROUP].preferred_version.version == VERSION
    assert groups["ray.io"].preferred_version.version == "v1"
    resources = {r.name: r for r in
                 client.CustomObjectsApi(api_client).get_api_resources(GROUP, VERSION).resources}
    assert resources["trainedmodels"].short_names == ["rtm"]
    assert resources["trainedmodels"].namespaced is True
    assert set(resources["trainedmodels/status"].verbs) == {"get", "patch", "update"}
    core = {r.name for r in client.CoreV1Api(api_client).get_api_resources().resources}
    assert {"namespaces", "configmaps"} <= core


def test_dynamic_client_discovers_and_uses_the_crd(server, ns, tmp_path):
    dyn = dynamic.DynamicClient(server.api_client(), cache_file=str(tmp_path / "discovery.json"))
    resource = dyn.resources.get(api_version=API_VERSION, kind="TrainedModel")
    resource.create(body=tm("dyn"), namespace=ns)
    assert resource.get(name="dyn", namespace=ns).spec.model.framework == "sklearn"


def test_crd_registered_by_posting_it(fresh):
    extensions = client.ApiextensionsV1Api(fresh.api_client())
    crd = copy.deepcopy(_load_crd())
    crd["metadata"]["name"] = "widgets.example.com"
    crd["spec"].update(group="example.com", names={"kind": "Widget", "plural": "widgets"})
    created = extensions.create_custom_resource_definition(crd)
    assert {c.type for c in created.status.conditions} >= {"Established", "NamesAccepted"}
    widget = {"apiVersion": "example.com/v1alpha1", "kind": "Widget", "metadata": {"name": "w"},
              "spec": tm("x")["spec"]}
    custom_api(fresh).create_namespaced_custom_object("example.com", "v1alpha1", "default",
                                                      "widgets", widget)
    extensions.delete_custom_resource_definition("widgets.example.com")
    with pytest.raises(ApiException) as err:
        custom_api(fresh).list_namespaced_custom_object("example.com", "v1alpha1", "default",
                                                        "widgets")
    assert err.value.status == 404
    schemaless = copy.deepcopy(crd)
    del schemaless["spec"]["versions"][0]["schema"]
    with pytest.raises(ApiException) as err:
        extensions.create_custom_resource_definition(schemaless)
    assert err.value.status == 422


# ----------------------------------------------------------------------------- create / get

def test_create_answers_201_with_server_fields(api, ns):
    body = tm("iris")
    body["status"] = {"state": "Loaded"}  # dropped: status has its own subresource
    data, code, _ = api.create_namespaced_custom_object_with_http_info(GROUP, VERSION, ns,
                                                                       PLURAL, body)
    assert code == 201
    md = data["metadata"]
    assert md["namespace"] == ns and md["generation"] == 1
    assert md["uid"] and md["creationTimestamp"].endswith("Z")
    assert md["resourceVersion"].isdigit()
    assert "status" not in data
    assert get(api, ns, "iris") == data


def test_dry_run_stores_nothing(api, ns, server):
    before = server.resource_version
    created = api.create_namespaced_custom_object(GROUP, VERSION, ns, PLURAL, tm("dry"),
                                                  dry_run="All")
    assert created["metadata"]["name"] == "dry"
    assert server.get_object(PLURAL, "dry", ns) is None
    assert server.resource_version == before


def test_seeded_namespaces(core):
    names = {n.metadata.name: n.status.phase for n in core.list_namespace().items}
    assert names["default"] == names["kube-system"] == "Active"


def test_generate_name(api, ns):
    body = tm("")
    body["metadata"] = {"generateName": "model-"}
    first, second = create(api, ns, body), create(api, ns, body)
    assert first["metadata"]["name"].startswith("model-")
    assert first["metadata"]["name"] != second["metadata"]["name"]


def test_duplicate_create_is_409_already_exists(api, ns):
    create(api, ns, tm("dup"))
    with pytest.raises(ApiException) as err:
        create(api, ns, tm("dup"))
    assert err.value.status == 409
    status = status_of(err.value)
    assert (status["kind"], status["reason"]) == ("Status", "AlreadyExists")
    assert status["message"] == 'trainedmodels.serving.rayms.io "dup" already exists'


def test_get_missing_is_404_status(api, ns):
    with pytest.raises(ApiException) as err:
        get(api, ns, "nope")
    assert err.value.status == 404
    status = status_of(err.value)
    assert status == {"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
                      "message": 'trainedmodels.serving.rayms.io "nope" not found',
                      "reason": "NotFound", "code": 404,
                      "details": {"name": "nope", "group": GROUP, "kind": PLURAL}}


def test_create_into_missing_namespace_is_404(api):
    with pytest.raises(ApiException) as err:
        create(api, "no-such-namespace", tm("x"))
    assert err.value.status == 404


# ----------------------------------------------------------------------------- list

def test_list_pagination_is_a_consistent_snapshot(api, ns, server):
    for i in range(5):
        create(api, ns, tm(f"m{i}"))
    first = api.list_namespaced_custom_object(GROUP, VERSION, ns, PLURAL, limit=2)
    assert first["kind"] == "TrainedModelList"
    assert [i["metadata"]["name"] for i in first["items"]] == ["m0", "m1"]
    assert first["metadata"]["remainingItemCount"] == 3
    api.delete_namespaced_custom_object(GROUP, VERSION, ns, PLURAL, "m4")  # after page 1
    names, token = ["m0", "m1"], first["metadata"]["continue"]
    while token:
        page = api.list_namespaced_custom_object(GROUP, VERSION, ns, PLURAL, limit=2,
                                                 _continue=token)
        assert page["metadata"]["resourceVersion"] == first["metadata"]["resourceVersion"]
        names += [i["metadata"]["name"] for i in page["items"]]
        token = page["metadata"].get("continue")
    assert names == ["m0", "m1", "m2", "m3", "m4"]  # m4 is in the snapshot
    fresh_list = api.list_namespaced_custom_object(GROUP, VERSION, ns, PLURAL)
    assert len(fresh_list["items"]) == 4
    assert int(fresh_list["metadata"]["resourceVersion"]) == server.resource_version


def test_continue_token_expires_after_compaction(fresh):
    api = custom_api(fresh)
    for i in range(3):
        create(api, "default", tm(f"m{i}"))
    page = api.list_namespaced_custom_object(GROUP, VERSION, "default", PLURAL, limit=1)
    create(api, "default", tm("later"))
    fresh.compact()
    with pytest.raises(ApiException) as err:
        api.list_namespaced_custom_object(GROUP, VERSION, "default", PLURAL, limit=1,
                                          _continue=page["metadata"]["continue"])
    assert err.value.status == 410 and status_of(err.value)["reason"] == "Expired"


def test_delete_collection(api, ns):
    for name, app in (("d1", "x"), ("d2", "x"), ("d3", "y")):
        create(api, ns, tm(name, labels={"app": app}))
    api.delete_collection_namespaced_custom_object(GROUP, VERSION, ns, PLURAL,
                                                   label_selector="app=x")
    remaining = api.list_namespaced_custom_object(GROUP, VERSION, ns, PLURAL)["items"]
    assert [i["metadata"]["name"] for i in remaining] == ["d3"]


def test_label_and_field_selectors(api, ns):
    create(api, ns, tm("a", labels={"app": "a", "tier": "gold"}))
    create(api, ns, tm("b", labels={"app": "b"}))
    create(api, ns, tm("c"))

    def names(**kwargs):
        result = api.list_namespaced_custom_object(GROUP, VERSION, ns, PLURAL, **kwargs)
        return [i["metadata"]["name"] for i in result["items"]]

    assert names(label_selector="app=a") == ["a"]
    assert names(label_selector="app in (a,b)") == ["a", "b"]
    assert names(label_selector="app,!tier") == ["b"]
    assert names(label_selector="app!=a") == ["b", "c"]
    assert names(field_selector="metadata.name=c") == ["c"]
    assert names(field_selector=f"metadata.namespace={ns},metadata.name!=c") == ["a", "b"]
    with pytest.raises(ApiException) as err:
        names(field_selector="spec.inferenceService=mms")
    assert err.value.status == 400
    everywhere = api.list_custom_object_for_all_namespaces(GROUP, VERSION, PLURAL,
                                                           label_selector="app=a")
    assert [(i["metadata"]["namespace"], i["metadata"]["name"]) for i in everywhere["items"]] \
        == [(ns, "a")]


# ----------------------------------------------------------------------------- update & patch

def test_replace_requires_current_resource_version(api, ns):
    obj = create(api, ns, tm("r"))
    obj["spec"]["model"]["storageUri"] = "s3://models/v2"
    replaced = api.replace_namespaced_custom_object(GROUP, VERSION, ns, PLURAL, "r", obj)
    assert replaced["metadata"]["generation"] == 2
    with pytest.raises(ApiException) as err:  # obj still carries the old resourceVersion
        api.replace_namespaced_custom_object(GROUP, VERSION, ns, PLURAL, "r", obj)
    assert err.value.status == 409
    status = status_of(err.value)
    assert status["reason"] == "Conflict"
    assert "the object has been modified" in status["message"]
    del obj["metadata"]["resourceVersion"]
    with pytest.raises(ApiException) as err:
        api.replace_namespaced_custom_object(GROUP, VERSION, ns, PLURAL, "r", obj)
    assert err.value.status == 422
    assert "must be specified for an update" in status_of(err.value)["message"]


def test_merge_patch(api, ns):
    obj = create(api, ns, tm("mp", labels={"a": "1", "b": "2"}))
    patched = api.patch_namespaced_custom_object(
        GROUP, VERSION, ns, PLURAL, "mp", {"metadata": {"labels": {"a": None, "c": "3"}}})
    assert patched["metadata"]["labels"] == {"b": "2", "c": "3"}
    assert patched["metadata"]["generation"] == 1  # metadata only
    assert int(patched["metadata"]["resourceVersion"]) > int(obj["metadata"]["resourceVersion"])
    again = api.patch_namespaced_custom_object(
        GROUP, VERSION, ns, PLURAL, "mp", {"metadata": {"labels": {"c": "3"}}})
    assert again["metadata"]["resourceVersion"] == patched["metadata"]["resourceVersion"]  # no-op
    with pytest.raises(ApiException) as err:
        api.patch_namespaced_custom_object(
            GROUP, VERSION, ns, PLURAL, "mp", {"metadata": {"resourceVersion": "1"}})
    assert err.value.status == 409


def test_json_patch(api, ns):
    create(api, ns, tm("jp"))
    ops = [{"op": "test", "path": "/spec/model/framework", "value": "sklearn"},
           {"op": "replace", "path": "/spec/model/storageUri", "value": "s3://models/v2"},
           {"op": "add", "path": "/metadata/labels", "value": {"x": "y"}}]
    patched = api.patch_namespaced_custom_object(GROUP, VERSION, ns, PLURAL, "jp", ops,
                                                 _content_type="application/json-patch+json")
    assert patched["spec"]["model"]["storageUri"] == "s3://models/v2"
    assert patched["metadata"]["labels"] == {"x": "y"}
    assert patched["metadata"]["generation"] == 2
    with pytest.raises(ApiException) as err:
        api.patch_namespaced_custom_object(
            GROUP, VERSION, ns, PLURAL, "jp",
            [{"op": "test", "path": "/spec/model/framework", "value": "onnx"}],
            _content_type="application/json-patch+json")
    assert err.value.status == 422


def test_strategic_merge_patch_on_a_custom_resource_is_415(api, ns):
    create(api, ns, tm("smp"))
    with pytest.raises(ApiException) as err:
        api.patch_namespaced_custom_object(
            GROUP, VERSION, ns, PLURAL, "smp", {"metadata": {"labels": {"a": "b"}}},
            _content_type="application/strategic-merge-patch+json")
    assert err.value.status == 415
    assert status_of(err.value)["reason"] == "UnsupportedMediaType"


def test_status_subresource_isolation_and_generation(api, ns):
    create(api, ns, tm("st"))
    # writes to the main resource ignore status
    main = api.patch_namespaced_custom_object(
        GROUP, VERSION, ns, PLURAL, "st",
        {"status": {"state": "Loaded"}, "metadata": {"labels": {"l": "1"}}})
    assert "status" not in main and main["metadata"]["generation"] == 1
    # writes to /status change only status and never bump generation
    status = api.patch_namespaced_custom_object_status(
        GROUP, VERSION, ns, PLURAL, "st",
        {"status": {"state": "Loaded", "observedGeneration": 1},
         "spec": {"inferenceService": "hijack"}, "metadata": {"labels": {"l": "2"}}})
    assert status["status"] == {"state": "Loaded", "observedGeneration": 1}
    assert status["spec"]["inferenceService"] == "mms"
    assert status["metadata"]["labels"] == {"l": "1"}
    assert status["metadata"]["generation"] == 1
    # a spec change bumps generation and keeps status
    spec = api.patch_namespaced_custom_object(
        GROUP, VERSION, ns, PLURAL, "st", {"spec": {"model": {"memory": "1Gi"}}})
    assert spec["metadata"]["generation"] == 2 and spec["status"]["state"] == "Loaded"
    # PUT /status, and re-writing the same status is a no-op
    spec["status"]["state"] = "Ready"
    put = api.replace_namespaced_custom_object_status(GROUP, VERSION, ns, PLURAL, "st", spec)
    assert put["status"]["state"] == "Ready" and put["metadata"]["generation"] == 2
    same = api.patch_namespaced_custom_object_status(GROUP, VERSION, ns, PLURAL, "st",
                                                     {"status": {"state": "Ready"}})
    assert same["metadata"]["resourceVersion"] == put["metadata"]["resourceVersion"]


def test_schema_validation_and_pruning(api, ns):
    body = tm("bad")
    del body["spec"]["model"]["storageUri"]
    with pytest.raises(ApiException) as err:
        create(api, ns, body)
    assert err.value.status == 422
    status = status_of(err.value)
    assert status["reason"] == "Invalid"
    assert status["message"] == ('TrainedModel.serving.rayms.io "bad" is invalid: '
                                 'spec.model.storageUri: Required value')
    assert status["details"]["causes"] == [{"reason": "FieldValueRequired",
                                            "message": "Required value",
                                            "field": "spec.model.storageUri"}]
    for memory in (True, "lots"):  # wrong type; int-or-string that is not a quantity
        body = tm("bad")
        body["spec"]["model"]["memory"] = memory
        with pytest.raises(ApiException) as err:
            create(api, ns, body)
        assert err.value.status == 422 and "spec.model.memory" in status_of(err.value)["message"]
    body = tm("pruned")
    body["spec"]["model"]["memory"] = 1073741824
    body["spec"]["replicas"] = 3  # not in the schema
    data, _, headers = api.create_namespaced_custom_object_with_http_info(
        GROUP, VERSION, ns, PLURAL, body)
    assert "replicas" not in data["spec"] and data["spec"]["model"]["memory"] == 1073741824
    assert 'unknown field \\"spec.replicas\\"' in headers.get("Warning", "")
    strict = tm("strict")
    strict["spec"]["replicas"] = 3
    with pytest.raises(ApiException) as err:
        api.create_namespaced_custom_object(GROUP, VERSION, ns, PLURAL, strict,
                                            field_validation="Strict")
    assert err.value.status == 400 and "spec.replicas" in status_of(err.value)["message"]
    # the status preserves unknown fields (the controller may add bookkeeping)
    kept = api.patch_namespaced_custom_object_status(GROUP, VERSION, ns, PLURAL, "pruned",
                                                     {"status": {"extra": {"k": 1}}})
    assert kept["status"] == {"extra": {"k": 1}}


# ----------------------------------------------------------------------------- delete & GC

def test_finalizers_and_deletion_timestamp(api, ns, server):
    create(api, ns, tm("fin", finalizers=["rayms.io/cleanup"]))
    deleted = api.delete_namespaced_custom_object(GROUP, VERSION, ns, PLURAL, "fin")
    md = deleted["metadata"]
    assert md["deletionTimestamp"] and md["deletionGracePeriodSeconds"] == 0
    assert md["generation"] == 2
    assert get(api, ns, "fin")["metadata"]["deletionTimestamp"] == md["deletionTimestamp"]
    again = api.delete_namespaced_custom_object(GROUP, VERSION, ns, PLURAL, "fin")
    assert again["metadata"]["resourceVersion"] == md["resourceVersion"]  # nothing changed
    with pytest.raises(ApiException) as err:
        api.patch_namespaced_custom_object(
            GROUP, VERSION, ns, PLURAL, "fin",
            {"metadata": {"finalizers": ["rayms.io/cleanup", "other/x"]}})
    assert err.value.status == 422 and "no new finalizers" in status_of(err.value)["message"]
    api.patch_namespaced_custom_object(GROUP, VERSION, ns, PLURAL, "fin",
                                       {"metadata": {"finalizers": None}})
    with pytest.raises(ApiException) as err:
        get(api, ns, "fin")
    assert err.value.status == 404
    history = [(e.type, e.obj["metadata"].get("deletionTimestamp") is not None)
               for e in server.events(PLURAL) if e.name == "fin" and e.namespace == ns]
    assert history == [("ADDED", False), ("MODIFIED", True), ("DELETED", True)]


def test_delete_without_finalizers_returns_success_status(api, ns):
    obj = create(api, ns, tm("plain"))
    result = api.delete_namespaced_custom_object(GROUP, VERSION, ns, PLURAL, "plain")
    assert result["kind"] == "Status" and result["status"] == "Success"
    assert result["details"] == {"name": "plain", "group": GROUP, "kind": PLURAL,
                                 "uid": obj["metadata"]["uid"]}
    with pytest.raises(ApiException) as err:
        api.delete_namespaced_custom_object(GROUP, VERSION, ns, PLURAL, "plain")
    assert err.value.status == 404


def test_delete_preconditions(api, ns):
    create(api, ns, tm("pre"))
    with pytest.raises(ApiException) as err:
        api.delete_namespaced_custom_object(
            GROUP, VERSION, ns, PLURAL, "pre",
            body=client.V1DeleteOptions(preconditions=client.V1Preconditions(uid="wrong")))
    assert err.value.status == 409 and "Precondition failed" in status_of(err.value)["message"]


def test_owner_reference_gc_is_asynchronous_and_by_uid():
    with FakeApiServer(gc_delay=0.5) as srv:
        api, core = custom_api(srv), client.CoreV1Api(srv.api_client())
        owner = create(api, "default", tm("owner"))
        # GC goes by uid: a reference naming "owner" with a uid that does not exist is dangling
        core.create_namespaced_config_map("default", client.V1ConfigMap(
            metadata=client.V1ObjectMeta(name="stranger", owner_references=[
                client.V1OwnerReference(api_version=API_VERSION, kind="TrainedModel",
                                        name="owner", uid="00000000-0000-0000-0000-000000000000")])))
        srv.wait_for(gone(srv, "configmaps", "stranger", "default"), timeout=5)
        ref = client.V1OwnerReference(**{
            "api_version": API_VERSION, "kind": "TrainedModel", "name": "owner",
            "uid": owner["metadata"]["uid"], "controller": True})
        core.create_namespaced_config_map("default", client.V1ConfigMap(
            metadata=client.V1ObjectMeta(name="dep-cm", owner_references=[ref])))
        api.create_namespaced_custom_object("ray.io", "v1", "default", "rayservices", {
            "apiVersion": "ray.io/v1", "kind": "RayService",
            "metadata": {"name": "dep-rs", "ownerReferences": [owner_ref(owner)],
                         "finalizers": ["ray.io/rayservice-finalizer"]},
            "spec": {"rayClusterConfig": {"headGroupSpec": {"rayStartParams": {}, "template": {
                "spec": {"containers": [{"name": "ray-head", "image": "rayproject/ray"}]}}}}}})
        api.delete_namespaced_custom_object(GROUP, VERSION, "default", PLURAL, "owner")
        assert srv.get_object("configmaps", "dep-cm") is not None  # GC has not run yet
        srv.wait_for(gone(srv, "configmaps", "dep-cm", "default"), timeout=5)
        rs = srv.wait_for(lambda: (srv.get_object("rayservices", "dep-rs") or {})
                          .get("metadata", {}).get("deletionTimestamp"), timeout=5)
        assert rs  # its own finalizer keeps it until the finalizer is removed
        srv.patch_object("rayservices", "dep-rs", {"metadata": {"finalizers": None}})
        assert srv.get_object("rayservices", "dep-rs") is None


def test_foreground_and_orphan_propagation(api, ns, core, server):
    for policy in ("Foreground", "Orphan"):
        owner = create(api, ns, tm(f"own-{policy.lower()}"))
        dep_name = f"dep-{policy.lower()}"
        core.create_namespaced_config_map(ns, {"metadata": {
            "name": dep_name, "ownerReferences": [owner_ref(owner)]}})
        result = api.delete_namespaced_custom_object(GROUP, VERSION, ns, PLURAL,
                                                     owner["metadata"]["name"],
                                                     propagation_policy=policy)
        expected = "foregroundDeletion" if policy == "Foreground" else "orphan"
        assert expected in result["metadata"]["finalizers"]
        server.wait_for(gone(server, PLURAL, owner["metadata"]["name"], ns), timeout=5)
        dependent = server.get_object("configmaps", dep_name, ns)
        if policy == "Foreground":
            assert dependent is None  # deleted before the owner went away
        else:
            assert dependent is not None and "ownerReferences" not in dependent["metadata"]


def test_deleting_a_namespace_collects_its_objects(api, core, ns, server):
    create(api, ns, tm("inside"))
    core.delete_namespace(ns)
    server.wait_for(gone(server, PLURAL, "inside", ns), timeout=5)


# ----------------------------------------------------------------------------- watch

def test_watch_events_in_order_and_resume(api, ns):
    rv = api.list_namespaced_custom_object(GROUP, VERSION, ns, PLURAL)["metadata"]["resourceVersion"]
    create(api, ns, tm("w", labels={"k": "v"}))
    api.patch_namespaced_custom_object(GROUP, VERSION, ns, PLURAL, "w", {"spec": {"model": {
        "framework": "onnx"}}})
    api.delete_namespaced_custom_object(GROUP, VERSION, ns, PLURAL, "w")
    events = collect(api.list_namespaced_custom_object, GROUP, VERSION, ns, PLURAL, count=3,
                     resource_version=rv)
    assert [e["type"] for e in events] == ["ADDED", "MODIFIED", "DELETED"]
    rvs = [int(e["object"]["metadata"]["resourceVersion"]) for e in events]
    assert rvs == sorted(rvs) and rvs[0] > int(rv)
    assert events[1]["object"]["spec"]["model"]["framework"] == "onnx"
    resumed = collect(api.list_namespaced_custom_object, GROUP, VERSION, ns, PLURAL, count=2,
                      resource_version=str(rvs[0]))
    assert [(e["type"], e["object"]["metadata"]["resourceVersion"]) for e in resumed] == \
        [("MODIFIED", str(rvs[1])), ("DELETED", str(rvs[2]))]
    # a label selector turns a label removal into DELETED
    create(api, ns, tm("w2", labels={"k": "v"}))
    api.patch_namespaced_custom_object(GROUP, VERSION, ns, PLURAL, "w2",
                                       {"metadata": {"labels": None}})
    selected = collect(api.list_namespaced_custom_object, GROUP, VERSION, ns, PLURAL, count=5,
                       resource_version=rv, label_selector="k=v")
    assert [(e["type"], e["object"]["metadata"]["name"]) for e in selected] == [
        ("ADDED", "w"), ("MODIFIED", "w"), ("DELETED", "w"), ("ADDED", "w2"), ("DELETED", "w2")]


def test_watch_without_resource_version_starts_with_current_state(api, ns):
    create(api, ns, tm("x1"))
    create(api, ns, tm("x2"))
    events = collect(api.list_namespaced_custom_object, GROUP, VERSION, ns, PLURAL, count=2)
    assert [(e["type"], e["object"]["metadata"]["name"]) for e in events] == \
        [("ADDED", "x1"), ("ADDED", "x2")]


def test_concurrent_watch_streams(api, ns, server):
    results: list[list] = [[] for _ in range(3)]

    def run(out):
        out.extend(collect(api.list_namespaced_custom_object, GROUP, VERSION, ns, PLURAL,
                           count=1, timeout=10, resource_version=str(server.resource_version)))

    threads = [threading.Thread(target=run, args=(out,)) for out in results]
    for t in threads:
        t.start()
    server.wait_for(lambda: server.active_watches >= 3, timeout=5)
    create(api, ns, tm("broadcast"))
    for t in threads:
        t.join(timeout=10)
    assert [[e["object"]["metadata"]["name"] for e in out] for out in results] == \
        [["broadcast"]] * 3


def test_watch_bookmarks(fresh):
    api = custom_api(fresh)
    rv = api.list_namespaced_custom_object(GROUP, VERSION, "default", PLURAL)["metadata"][
        "resourceVersion"]
    w = watch.Watch()
    events = collect(api.list_namespaced_custom_object, GROUP, VERSION, "default", PLURAL,
                     count=2, w=w, resource_version=rv, allow_watch_bookmarks=True)
    assert [e["type"] for e in events] == ["BOOKMARK", "BOOKMARK"]
    assert events[0]["object"]["kind"] == "TrainedModel"
    assert events[0]["object"]["metadata"]["resourceVersion"] == rv
    assert w.resource_version == rv
    create(api, "default", tm("b"))
    events = collect(api.list_namespaced_custom_object, GROUP, VERSION, "default", PLURAL,
                     count=2, resource_version=rv, allow_watch_bookmarks=True)
    assert [e["type"] for e in events] == ["ADDED", "BOOKMARK"]
    assert events[1]["object"]["metadata"]["resourceVersion"] == \
        events[0]["object"]["metadata"]["resourceVersion"]


def test_watch_from_compacted_resource_version_gets_410(fresh):
    api = custom_api(fresh)
    old = create(api, "default", tm("a"))["metadata"]["resourceVersion"]
    create(api, "default", tm("b"))
    floor = fresh.compact()
    # on the wire: HTTP 200, then one ERROR event carrying a 410 Expired Status
    conn = http.client.HTTPConnection("127.0.0.1", fresh.port, timeout=5)
    conn.request("GET", f"/apis/{GROUP}/{VERSION}/namespaces/default/{PLURAL}"
                        f"?watch=true&resourceVersion={old}&timeoutSeconds=5")
    response = conn.getresponse()
    assert response.status == 200
    lines = response.read().decode().splitlines()
    conn.close()
    assert [json.loads(line) for line in lines] == [{"type": "ERROR", "object": {
        "kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
        "message": f"too old resource version: {old} ({floor})", "reason": "Expired",
        "code": 410}}]
    # the client raises ApiException(410) at once with timeout_seconds ...
    with pytest.raises(ApiException) as err:
        collect(api.list_namespaced_custom_object, GROUP, VERSION, "default", PLURAL, count=1,
                resource_version=old)
    assert err.value.status == 410
    # ... and after its single retry without it
    with pytest.raises(ApiException) as err:
        next(iter(watch.Watch().stream(api.list_namespaced_custom_object, GROUP, VERSION,
                                       "default", PLURAL, resource_version=old)))
    assert err.value.status == 410
    # the current resourceVersion is still fine
    create(api, "default", tm("c"))
    events = collect(api.list_namespaced_custom_object, GROUP, VERSION, "default", PLURAL,
                     count=1, resource_version=str(floor))
    assert events[0]["object"]["metadata"]["name"] == "c"


def test_bounded_history_expires_old_resource_versions():
    with FakeApiServer(crd_paths=[TRAINEDMODEL_CRD], max_events=3) as srv:
        api = custom_api(srv)
        rvs = [create(api, "default", tm(f"h{i}"))["metadata"]["resourceVersion"]
               for i in range(5)]
        assert [e.name for e in srv.events(PLURAL)] == ["h2", "h3", "h4"]
        with pytest.raises(ApiException) as err:
            collect(api.list_namespaced_custom_object, GROUP, VERSION, "default", PLURAL,
                    count=1, resource_version=rvs[0])
        assert err.value.status == 410
        events = collect(api.list_namespaced_custom_object, GROUP, VERSION, "default", PLURAL,
                         count=2, resource_version=rvs[2])
        assert [e["object"]["metadata"]["name"] for e in events] == ["h3", "h4"]


def test_initial_resource_version_is_already_compacted(fresh):
    with pytest.raises(ApiException) as err:
        collect(custom_api(fresh).list_namespaced_custom_object, GROUP, VERSION, "default",
                PLURAL, count=1, resource_version="1")
    assert err.value.status == 410


def test_drop_watches_ends_streams(fresh):
    api = custom_api(fresh)
    outcome: dict = {}

    def bounded():
        outcome["events"] = collect(api.list_namespaced_custom_object, GROUP, VERSION,
                                    "default", PLURAL, count=1, timeout=30,
                                    resource_version=str(fresh.resource_version))

    thread = threading.Thread(target=bounded)
    thread.start()
    fresh.wait_for(lambda: fresh.active_watches == 1)
    assert fresh.drop_watches() == 1
    thread.join(timeout=5)
    assert not thread.is_alive() and outcome["events"] == []

    # without timeoutSeconds the client re-watches from its last resourceVersion
    seen: list = []

    def resuming():
        w = watch.Watch()
        for event in w.stream(api.list_namespaced_custom_object, GROUP, VERSION, "default",
                              PLURAL, resource_version=str(fresh.resource_version)):
            seen.append((event["type"], event["object"]["metadata"]["name"]))
            if len(seen) == 2:
                w.stop()

    fresh.wait_for(lambda: fresh.active_watches == 0)
    thread = threading.Thread(target=resuming)
    thread.start()
    fresh.wait_for(lambda: fresh.active_watches == 1)
    create(api, "default", tm("before-drop"))
    fresh.wait_for(lambda: len(seen) == 1)
    fresh.drop_watches()
    fresh.wait_for(lambda: fresh.active_watches == 1)
    create(api, "default", tm("after-drop"))
    thread.join(timeout=5)
    assert seen == [("ADDED", "before-drop"), ("ADDED", "after-drop")]

    # an abrupt drop surfaces as a connection error in the client
    errors: list = []

    def abrupt():
        try:
            collect(api.list_namespaced_custom_object, GROUP, VERSION, "default", PLURAL,
                    count=1, timeout=30, resource_version=str(fresh.resource_version))
        except Exception as exc:  # noqa: BLE001 - urllib3's exact type varies
            errors.append(exc)

    fresh.wait_for(lambda: fresh.active_watches == 0)  # the client closed the last one
    thread = threading.Thread(target=abrupt)
    thread.start()
    fresh.wait_for(lambda: fresh.active_watches == 1)
    fresh.drop_watches(abrupt=True)
    thread.join(timeout=5)
    assert not thread.is_alive() and len(errors) == 1


# ----------------------------------------------------------------------------- hooks

def test_injected_failures(fresh):
    api = custom_api(fresh)
    injection = fresh.inject_failure("create", PLURAL, status=500)
    with pytest.raises(ApiException) as err:
        create(api, "default", tm("x"))
    assert err.value.status == 500 and status_of(err.value)["reason"] == "InternalError"
    create(api, "default", tm("x"))
    assert injection.hits == 1
    fresh.inject_failure("patch", PLURAL, status=429, retry_after=1, times=None)
    for _ in range(2):
        with pytest.raises(ApiException) as err:
            api.patch_namespaced_custom_object(GROUP, VERSION, "default", PLURAL, "x", {})
        assert err.value.status == 429 and err.value.headers["Retry-After"] == "1"
    fresh.clear_failures()
    api.patch_namespaced_custom_object(GROUP, VERSION, "default", PLURAL, "x", {})


def test_write_counter(fresh):
    api = custom_api(fresh)
    fresh.reset_request_log()
    create(api, "default", tm("c"))
    get(api, "default", "c")
    api.list_namespaced_custom_object(GROUP, VERSION, "default", PLURAL)
    api.patch_namespaced_custom_object(GROUP, VERSION, "default", PLURAL, "c",
                                       {"metadata": {"labels": {"a": "b"}}})
    api.delete_namespaced_custom_object(GROUP, VERSION, "default", PLURAL, "c")
    assert fresh.write_count == 3
    assert [(r.method, r.status) for r in fresh.requests] == [
        ("POST", 201), ("GET", 200), ("GET", 200), ("PATCH", 200), ("DELETE", 200)]


def test_rayservice_status_can_be_set_like_kuberay_would(api, ns, server):
    api.create_namespaced_custom_object("ray.io", "v1", ns, "rayservices", {
        "apiVersion": "ray.io/v1", "kind": "RayService", "metadata": {"name": "mms"},
        "spec": {"rayClusterConfig": {"headGroupSpec": {"rayStartParams": {}, "template": {
            "spec": {"containers": [{"name": "ray-head", "image": "rayproject/ray"}]}}}}}})
    server.patch_object("rayservices", "mms", {"status": {"serviceStatus": "Running"}}, ns,
                        subresource="status")
    got = api.get_namespaced_custom_object("ray.io", "v1", ns, "rayservices", "mms")
    assert got["status"]["serviceStatus"] == "Running"
    assert server.objects("rayservices", ns)[0]["metadata"]["generation"] == 1


def test_stop_closes_everything():
    srv = FakeApiServer(crd_paths=[TRAINEDMODEL_CRD])
    srv.start()
    api = custom_api(srv)
    finished = threading.Event()

    def watcher():
        collect(api.list_namespaced_custom_object, GROUP, VERSION, "default", PLURAL, count=1,
                timeout=60, resource_version=str(srv.resource_version))
        finished.set()

    thread = threading.Thread(target=watcher)
    thread.start()
    srv.wait_for(lambda: srv.active_watches == 1)
    port = srv.port
    srv.stop()
    thread.join(timeout=5)
    assert finished.is_set()
    assert not [t for t in threading.enumerate() if t.name.endswith(f"-{port}")]
    with pytest.raises(OSError):
        http.client.HTTPConnection("127.0.0.1", port, timeout=2).request("GET", "/version")
