"""The manifests in kuberay/ are ones Kubernetes, KubeRay, Ray Serve and rayms all accept.

No cluster is needed. Built-in kinds go through ``kubernetes-validate --strict``, which passes any custom
resource silently, so custom kinds never go there, and a kind nothing here knows fails. TrainedModels are
checked against the repo's CRD, and the RayService against KubeRay's CRD when it is on this machine, with
unknown fields rejected (``tests/crd_schema.py``). The RayService's ``serveConfigV2`` must satisfy Serve's own
schema and build the rayms application. The Role is checked against what the real bridge does: run against
the in-repo fake API server, every request the bridge makes must be allowed, and every grant must be used.
"""

from __future__ import annotations

import asyncio
import copy
import importlib
import json
import re
import shutil
import subprocess
import sys
import time
import tomllib
from pathlib import Path

import kubernetes_validate
import pytest
import ray
import yaml
from kubernetes import client
from ray.serve import Application
from ray.serve.schema import ServeDeploySchema

from rayms.config import FRAMEWORKS, ModelSpec, Settings
from rayms.k8s import TrainedModelBridge
from rayms.k8s.resources import parse
from rayms.status import LoadReport
from rayms.registry import ModelRegistry
from rayms.statestore import StateStore
from tests.crd_schema import crd_problems, load_crd
from tests.fake_apiserver import RAYSERVICE_CRD_REFERENCE, FakeApiServer
from tests.support import DirectRegistry

ROOT = Path(__file__).resolve().parents[1]
KUBERAY = ROOT / "kuberay"
KSERVE_CRD_REFERENCE = ROOT.parent / "shared" / "reference" / "kserve-trainedmodel-crd.yaml"
KUBERNETES_VERSION = "1.30"
BUILTIN_KINDS = {"ServiceAccount", "Role", "RoleBinding", "CustomResourceDefinition"}
CUSTOM_KINDS = {("serving.rayms.io/v1alpha1", "TrainedModel"), ("serving.kserve.io/v1alpha1", "TrainedModel"),
                ("ray.io/v1", "RayService")}


def documents() -> list[tuple[str, dict]]:
    """Every YAML document under kuberay/, labelled ``path#index``."""
    docs = []
    for path in sorted(KUBERAY.rglob("*.yaml")):
        for index, doc in enumerate(yaml.safe_load_all(path.read_text())):
            if doc is not None:
                docs.append((f"{path.relative_to(ROOT)}#{index}", doc))
    return docs


def of_kind(kind: str) -> list[tuple[str, dict]]:
    return [(label, doc) for label, doc in documents() if doc["kind"] == kind]


def the_rayservice() -> dict:
    [(_, service)] = of_kind("RayService")
    return service


def serve_config() -> dict:
    return yaml.safe_load(the_rayservice()["spec"]["serveConfigV2"])


def app_args() -> dict:
    [app] = serve_config()["applications"]
    return app["args"]


def pod_templates() -> dict[str, dict]:
    cluster = the_rayservice()["spec"]["rayClusterConfig"]
    templates = {"head": cluster["headGroupSpec"]["template"]}
    templates.update({group["groupName"]: group["template"] for group in cluster.get("workerGroupSpecs", [])})
    return templates


def kserve_crd() -> dict:
    """KServe's TrainedModel CRD: the shared reference copy when present, else ours under KServe's group (ours
    claims to be KServe's field for field)."""
    if KSERVE_CRD_REFERENCE.is_file():
        return load_crd(KSERVE_CRD_REFERENCE)
    crd = copy.deepcopy(load_crd(KUBERAY / "trainedmodel-crd.yaml"))
    crd["spec"]["group"] = "serving.kserve.io"
    crd["metadata"]["name"] = "trainedmodels.serving.kserve.io"
    return crd


needs_kuberay_crd = pytest.mark.skipif(not RAYSERVICE_CRD_REFERENCE.is_file(),
                                       reason=f"KubeRay's RayService CRD is not at {RAYSERVICE_CRD_REFERENCE}")


def test_every_manifest_is_a_kind_something_here_validates():
    docs = documents()
    assert {label.split("#")[0] for label, _ in docs} >= {
        "kuberay/rbac.yaml", "kuberay/rayservice.yaml", "kuberay/trainedmodel-crd.yaml",
        *(f"kuberay/examples/{f}.yaml" for f in FRAMEWORKS)}
    for label, doc in docs:
        assert doc["kind"] in BUILTIN_KINDS or (doc["apiVersion"], doc["kind"]) in CUSTOM_KINDS, label
        assert doc["metadata"]["name"], label
        assert "namespace" not in doc["metadata"], f"{label}: manifests go to the namespace of `kubectl -n`"


BUILTIN = [(label, doc) for label, doc in documents() if doc["kind"] in BUILTIN_KINDS]
TRAINEDMODELS = of_kind("TrainedModel")


def kubernetes_problems(obj: dict) -> list[str]:
    try:
        kubernetes_validate.validate(obj, KUBERNETES_VERSION, strict=True)
    except kubernetes_validate.ValidationError as exc:
        return [f"{'.'.join(map(str, exc.path)) or '<root>'}: {exc.message}"]
    return []


@pytest.mark.parametrize("label,doc", BUILTIN, ids=[label for label, _ in BUILTIN])
def test_builtin_kinds_pass_strict_kubernetes_validation(label, doc):
    assert kubernetes_problems(doc) == [], label


def test_rayservice_pod_templates_pass_strict_kubernetes_validation():
    """kubernetes-validate cannot see inside a RayService, but its pod templates are plain PodTemplateSpecs."""
    for group, template in pod_templates().items():
        wrapper = {"apiVersion": "v1", "kind": "PodTemplate", "metadata": {"name": group}, "template": template}
        assert kubernetes_problems(wrapper) == [], f"{group} pod template"


@pytest.mark.parametrize("label,doc", TRAINEDMODELS, ids=[label for label, _ in TRAINEDMODELS])
def test_trainedmodels_match_their_crd_and_the_bridge_accepts_them(label, doc):
    ours = load_crd(KUBERAY / "trainedmodel-crd.yaml")
    assert crd_problems(doc, kserve_crd() if doc["apiVersion"].startswith("serving.kserve.io/") else ours) == []
    assert crd_problems({**doc, "apiVersion": "serving.rayms.io/v1alpha1"}, ours) == []  # only apiVersion differs
    parsed = parse({**doc, "metadata": {**doc["metadata"], "namespace": "default"}})
    assert parsed.problem == "" and isinstance(parsed.spec, ModelSpec), f"{label}: {parsed.problem}"
    assert parsed.inference_service == app_args()["inference_service"] == the_rayservice()["metadata"]["name"]
    assert parsed.spec.memory_bytes > 0, f"{label}: declare memory so replicas can budget it"


def test_examples_cover_every_framework_and_kserve_compat():
    examples = {label.split("#")[0]: doc for label, doc in of_kind("TrainedModel")}
    for framework in FRAMEWORKS:
        doc = examples[f"kuberay/examples/{framework}.yaml"]
        assert (doc["apiVersion"], doc["spec"]["model"]["framework"]) == ("serving.rayms.io/v1alpha1", framework)
    assert any(doc["apiVersion"] == "serving.kserve.io/v1alpha1" for doc in examples.values())


def test_the_schema_checks_catch_what_an_api_server_would_refuse_or_drop():
    ours = load_crd(KUBERAY / "trainedmodel-crd.yaml")
    good = yaml.safe_load((KUBERAY / "examples" / "sklearn.yaml").read_text())
    missing = copy.deepcopy(good)
    del missing["spec"]["model"]["storageUri"]
    assert crd_problems(missing, ours) == ["spec.model: 'storageUri' is a required property"]
    typo = copy.deepcopy(good)
    typo["spec"]["model"]["memroy"] = "1Gi"
    assert "'memroy' was unexpected" in " ".join(crd_problems(typo, ours))
    wrong_type = copy.deepcopy(good)
    wrong_type["spec"]["model"]["memory"] = ["256Mi"]
    assert crd_problems(wrong_type, ours)
    [account] = [d for _, d in of_kind("ServiceAccount")]
    assert kubernetes_problems({**account, "automount": True}) == [
        "<root>: Additional properties are not allowed ('automount' was unexpected)"]


# ------------------------------------------------------------------ the RayService

@needs_kuberay_crd
def test_rayservice_matches_kuberays_crd():
    crd = load_crd(RAYSERVICE_CRD_REFERENCE)
    service = the_rayservice()
    assert crd_problems(service, crd) == []
    broken = copy.deepcopy(service)
    broken["spec"]["rayClusterConfig"]["workerGroupSpecs"][0]["replicas"] = "two"
    broken["spec"]["rayClusterConfig"]["headGroupSpec"]["rayStartParam"] = {}
    problems = " ".join(crd_problems(broken, crd))
    assert "'two' is not of type 'integer'" in problems and "'rayStartParam' was unexpected" in problems


def test_rayservice_name_is_one_kuberay_accepts():
    name = the_rayservice()["metadata"]["name"]
    assert len(name) <= 47 and re.fullmatch(r"[a-z]([-a-z0-9]*[a-z0-9])?", name), name  # KubeRay's limits


def test_serve_config_passes_serves_schema_and_builds_the_kubernetes_app():
    service = the_rayservice()
    assert isinstance(service["spec"]["serveConfigV2"], str)
    config = serve_config()
    schema = ServeDeploySchema.model_validate(config)
    [app] = schema.applications
    settings = Settings(**app.args)  # Settings forbids unknown fields: every arg is a real setting
    assert settings.kubernetes and settings.inference_service == service["metadata"]["name"]
    assert app.name == settings.app_name, "the Router and bridge find the application by Settings.app_name"
    assert (settings.host, settings.port) == (config["http_options"]["host"], config["http_options"]["port"])
    assert (config["http_options"]["host"], config["http_options"]["port"]) == ("0.0.0.0", 8000)
    module, _, attr = app.import_path.partition(":")
    application = getattr(importlib.import_module(module), attr)(app.args)
    assert isinstance(application, Application)
    from ray.serve._private.build_app import build_app  # private: the only offline view of the deployments
    built = build_app(application, name=app.name).deployments
    deployments = {d.name for d in built}
    assert "KubernetesBridge" in deployments
    # Serve's throughput settings go to rayms's own deployments, not to the cluster's drivers.
    from rayms.ray_env import SERVE_TUNING

    for deployment in built:
        assert deployment.ray_actor_options["runtime_env"]["env_vars"] == SERVE_TUNING, deployment.name
    assert {d["name"] for d in config["applications"][0].get("deployments", [])} <= deployments


def test_cluster_offers_what_the_application_asks_for():
    cluster = the_rayservice()["spec"]["rayClusterConfig"]
    settings = Settings(**app_args())
    templates = pod_templates()
    containers = [c for t in templates.values() for c in t["spec"]["containers"]]
    assert cluster["rayVersion"] == ray.__version__
    assert len({c["image"] for c in containers}) == 1
    for group, template in templates.items():
        mounts = {m["mountPath"] for c in template["spec"]["containers"] for m in c.get("volumeMounts", [])}
        assert settings.cache_dir in mounts, f"{group}: every node downloads into cache_dir"
    # The registry's custom resource exists, on the group where its state folder is mounted.
    start_params = {"head": cluster["headGroupSpec"]["rayStartParams"],
                    **{g["groupName"]: g["rayStartParams"] for g in cluster["workerGroupSpecs"]}}
    offered = {group: json.loads(json.loads(params["resources"])) for group, params in start_params.items()
               if "resources" in params}
    for override in serve_config()["applications"][0].get("deployments", []):
        for resource in override.get("ray_actor_options", {}).get("resources", {}):
            [group] = [g for g, res in offered.items() if resource in res]
            mounts = {m["mountPath"] for c in templates[group]["spec"]["containers"] for m in c.get("volumeMounts", [])}
            assert str(Path(settings.resolved_state_uri()).parent) in mounts
    # KubeRay exposes the head's port named `serve` as rayms-serve-svc, and creates no such Service when the
    # head declares ports but none named `serve`.
    [head] = templates["head"]["spec"]["containers"]
    ports = {p.get("name"): p["containerPort"] for p in head.get("ports", [])}
    assert not ports or ports.get("serve") == settings.port
    # Model replicas fit on the workers (the head offers no CPU to them).
    assert start_params["head"].get("num-cpus") == "0"
    slots = sum(g["replicas"] * int(float(g["template"]["spec"]["containers"][0]["resources"]["limits"]["cpu"])
                                    // settings.replica_num_cpus) for g in cluster["workerGroupSpecs"])
    assert slots >= settings.num_replicas


def test_every_node_routes_by_model_through_haproxy_as_rayms_serve_does():
    from rayms.ray_env import HAPROXY_ROUTING

    for group, template in pod_templates().items():
        for container in template["spec"]["containers"]:
            env = {e["name"]: e.get("value") for e in container.get("env", [])}
            assert {k: env.get(k) for k in HAPROXY_ROUTING} == HAPROXY_ROUTING, group
    assert serve_config()["proxy_location"] == "EveryNode", "HAProxy runs where Serve would run its proxies"


def test_dockerfile_builds_the_image_the_rayservice_runs():
    dockerfile = (KUBERAY / "Dockerfile").read_text()
    [base] = re.findall(r"^FROM\s+(\S+)", dockerfile, flags=re.M)
    assert base == f"rayproject/ray:{ray.__version__}-py{sys.version_info.major}{sys.version_info.minor}"
    for sources in re.findall(r"^COPY\s+(?:--\S+\s+)*(.+)\s+\S+$", dockerfile, flags=re.M):
        for source in sources.split():
            assert (ROOT / source).exists(), source
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    [extras] = re.findall(r'pip install .*\[([a-z0-9,]+)\]', dockerfile)
    assert set(extras.split(",")) <= set(project["optional-dependencies"])
    images = {c["image"] for t in pod_templates().values() for c in t["spec"]["containers"]}
    assert images == {f"rayms:{project['version']}"}
    assert f"-t rayms:{project['version']}" in dockerfile


def test_pods_run_as_the_account_the_role_is_bound_to():
    [(_, account)] = of_kind("ServiceAccount")
    roles = {doc["metadata"]["name"] for _, doc in of_kind("Role")}
    for label, binding in of_kind("RoleBinding"):
        assert binding["roleRef"]["kind"] == "Role" and binding["roleRef"]["name"] in roles, label
        assert binding["subjects"] == [{"kind": "ServiceAccount", "name": account["metadata"]["name"]}], label
    for group, template in pod_templates().items():
        assert template["spec"]["serviceAccountName"] == account["metadata"]["name"], group
        assert template["spec"].get("automountServiceAccountToken", True), f"{group}: the bridge needs the token"
    assert account.get("automountServiceAccountToken", True)


# ------------------------------------------------------------------ against the (fake) API server

def contains(stored, sent) -> bool:
    """Whether everything ``sent`` is in ``stored`` unchanged (the server may add defaults, nothing else)."""
    if isinstance(sent, dict):
        return isinstance(stored, dict) and all(k in stored and contains(stored[k], v) for k, v in sent.items())
    if isinstance(sent, list):
        return isinstance(stored, list) and len(stored) == len(sent) and all(map(contains, stored, sent))
    return stored == sent


def test_examples_and_rayservice_are_created_by_the_api_server():
    with FakeApiServer(crds=[kserve_crd()]) as server:
        api = client.CustomObjectsApi(server.api_client())
        for label, doc in [*of_kind("TrainedModel"), *of_kind("RayService")]:
            group, _, version = doc["apiVersion"].rpartition("/")
            plural = doc["kind"].lower() + "s"
            created, status, _ = api.create_namespaced_custom_object_with_http_info(
                group, version, "default", plural, copy.deepcopy(doc))
            assert status == 201, label
            assert contains(created["spec"], doc["spec"]), f"{label}: the API server dropped or changed fields"
        assert server.internal_errors == []


@pytest.mark.skipif(shutil.which("kubectl") is None, reason="kubectl is not installed")
def test_readme_shows_what_kubectl_prints(tmp_path):
    """The README's expected output for applying and deleting the manifests is what kubectl really prints."""
    readme = (KUBERAY / "README.md").read_text()
    examples = [f"kuberay/examples/{f}.yaml" for f in ("xgboost", "lightgbm", "onnx")]
    with FakeApiServer(crd_paths=[]) as server:  # the CRD is applied below, as in the README
        kubeconfig = server.write_kubeconfig(tmp_path / "kubeconfig")

        def kubectl(*args: str) -> list[str]:
            done = subprocess.run(["kubectl", f"--kubeconfig={kubeconfig}", *args], cwd=ROOT, capture_output=True,
                                  text=True, timeout=120)
            assert done.returncode == 0, (args, done.stderr)
            return done.stdout.strip().splitlines()

        apply = ("apply", "--validate=false")  # the fake serves no OpenAPI document to validate with
        printed = [*kubectl(*apply, "-f", "kuberay/trainedmodel-crd.yaml"),
                   *kubectl(*apply, "-f", "kuberay/rayservice.yaml"),
                   *kubectl(*apply, "-f", "kuberay/examples/sklearn.yaml"),
                   *kubectl("delete", "rtm", "sklearn-iris"),
                   *kubectl(*apply, *(a for f in examples for a in ("-f", f))),
                   *kubectl("delete", "rayservice", "rayms")]
    assert len(printed) == 8
    assert [line for line in printed if line not in readme] == []


class Placer:
    """Loads succeed at once; the bridge's traffic, not model loading, is under test."""

    async def load(self, name, spec, version):
        return LoadReport(replica="r0", measured_bytes=100, load_time_s=0.01, metadata={})

    async def unload(self, name, spec):
        return None


def request_attributes(method: str, path: str, query: dict) -> tuple[str, str, str, str | None]:
    """(apiGroup, resource[/subresource], verb, name) of a request, as the API server's authorizer sees it."""
    parts = [p for p in path.split("/") if p]
    group, rest = ("", parts[2:]) if parts[0] == "api" else (parts[1], parts[3:])
    if rest[0] == "namespaces" and len(rest) > 2:
        rest = rest[2:]
    resource, name, sub = (rest + [None, None])[:3]
    if name is None:
        verb = {"GET": "watch" if query.get("watch") in ("true", "True", "1") else "list", "POST": "create",
                "DELETE": "deletecollection"}[method]
    else:
        verb = {"GET": "get", "PUT": "update", "PATCH": "patch", "DELETE": "delete"}[method]
    return group, f"{resource}/{sub}" if sub else resource, verb, name


def role_rules(path: Path) -> list[dict]:
    [role] = [d for d in yaml.safe_load_all(path.read_text()) if d and d["kind"] == "Role"]
    return role["rules"]


def allows(rules: list[dict], group: str, resource: str, verb: str, name: str | None) -> bool:
    return any(group in r["apiGroups"] and resource in r["resources"] and verb in r["verbs"]
               and (not r.get("resourceNames") or name in r["resourceNames"]) for r in rules)


async def until(predicate, what: str, timeout_s: float = 60.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s}s waiting for {what}")
        await asyncio.sleep(0.05)


@pytest.mark.parametrize("kserve_compat", [False, True], ids=["rayms", "kserve-compat"])
async def test_role_grants_exactly_what_the_bridge_uses(kserve_compat, tmp_path):
    rules = role_rules(KUBERAY / "rbac.yaml")
    if kserve_compat:
        rules = [r for r in rules if "serving.rayms.io" not in r["apiGroups"]]
        rules += role_rules(KUBERAY / "rbac-kserve-compat.yaml")
    for rule in rules:
        assert "*" not in rule["apiGroups"] + rule["resources"] + rule["verbs"], rule
    example = "kserve-trainedmodel.yaml" if kserve_compat else "sklearn.yaml"
    model = yaml.safe_load((KUBERAY / "examples" / example).read_text())
    group = model["apiVersion"].split("/")[0]
    name = model["metadata"]["name"]
    settings = Settings(**{**app_args(), "cache_dir": str(tmp_path), "state_uri": str(tmp_path / "models.json"),
                           "namespace": "default", "kserve_compat": kserve_compat})
    with FakeApiServer(crds=[kserve_crd()], gc_delay=0.1) as server:
        server.create_object(copy.deepcopy(the_rayservice()), namespace="default")
        server.create_object(model, namespace="default")
        registry = ModelRegistry(settings, store=StateStore(settings.resolved_state_uri()), placer=Placer())
        bridge = TrainedModelBridge(settings, registry=DirectRegistry(registry), api=server.api_client(),
                                    namespace="default")
        await bridge.start()
        try:
            def ready() -> bool:
                status = (server.get_object("trainedmodels", name, group=group) or {}).get("status") or {}
                return any(c["type"] == "Ready" and c["status"] == "True" for c in status.get("conditions", []))

            await until(ready, f"{name} Ready")
            await until(lambda: server.get_object("trainedmodels", name, group=group)["metadata"].get(
                "ownerReferences"), "the RayService to own the TrainedModel")
            owners = server.get_object("trainedmodels", name, group=group)["metadata"]["ownerReferences"]
            assert [(o["kind"], o["name"]) for o in owners] == [("RayService", settings.inference_service)]
            assert owners[0]["blockOwnerDeletion"] is False  # True would need update on rayservices/finalizers
            server.delete_object("rayservices", settings.inference_service, group="ray.io")
            await until(lambda: server.get_object("trainedmodels", name, group=group) is None, "garbage collection")
            await until(lambda: not registry.list(), "the collected model to be unregistered")
        finally:
            await bridge.stop()
        used = {request_attributes(r.method, r.path, r.query) for r in server.requests}
    denied = [u for u in used if not allows(rules, *u)]
    assert denied == [], f"the Role does not allow requests the bridge makes: {denied}"
    unused = {(g, res, v) for r in rules for g in r["apiGroups"] for res in r["resources"] for v in r["verbs"]} - {
        (g, res, v) for g, res, v, _ in used}
    assert unused == set(), f"the Role grants what the bridge never uses: {unused}"
