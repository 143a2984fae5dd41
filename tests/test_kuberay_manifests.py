"""The manifests in kuberay/ are ones Kubernetes, KubeRay, Ray Serve and rayms all accept, and they hold the
deployment to the hardening kuberay/README.md ("Security") promises.

No cluster is needed. Built-in kinds go through ``kubernetes-validate --strict``, which passes any custom
resource silently, so custom kinds never go there, and a kind nothing here knows fails. TrainedModels are
checked against the repo's CRD, and the RayService against KubeRay's CRD when it is on this machine, with
unknown fields rejected (``tests/crd_schema.py``). The RayService's ``serveConfigV2`` must satisfy Serve's own
schema and build the rayms application. The Role is checked against what the real bridge does: run against
the in-repo fake API server, every request the bridge makes must be allowed, and every grant must be used.

The hardening is checked property by property: who the containers run as and what they may write, that Ray
asks for its token, which connections the NetworkPolicies let in (an evaluator of their rules, below), that
the API token exists only on the pod the bridge is pinned to, where storage credentials come from, and how the
image is pinned and installed.
"""

from __future__ import annotations

import asyncio
import copy
import dataclasses
import functools
import importlib
import importlib.metadata
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
from kubernetes.config.incluster_config import SERVICE_CERT_FILENAME, SERVICE_TOKEN_FILENAME
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from ray.serve import Application
from ray.serve.schema import ServeDeploySchema

from rayms.config import ModelSpec, Settings
from rayms.framework_table import NAMES
from rayms.k8s import TrainedModelBridge
from rayms.k8s.client import SERVICE_ACCOUNT_NAMESPACE
from rayms.k8s.resources import parse
from rayms.status import LoadReport
from rayms.registry import ModelRegistry
from rayms.statestore import StateStore
from tests.crd_schema import crd_problems, load_crd
from tests.fake_apiserver import RAYSERVICE_CRD_REFERENCE, FakeApiServer
from tests.support import DirectRegistry

ROOT = Path(__file__).resolve().parents[1]
KUBERAY = ROOT / "kuberay"
FRAMEWORKS = [name for name in NAMES if name != "custom"]  # a custom model runs user code: no example of it
KSERVE_CRD_REFERENCE = ROOT.parent / "shared" / "reference" / "kserve-trainedmodel-crd.yaml"
KUBERNETES_VERSION = "1.30"
BUILTIN_KINDS = {"ServiceAccount", "Role", "RoleBinding", "CustomResourceDefinition", "NetworkPolicy"}
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


def start_params() -> dict[str, dict]:
    """Each group's rayStartParams, keyed like :func:`pod_templates`."""
    cluster = the_rayservice()["spec"]["rayClusterConfig"]
    return {"head": cluster["headGroupSpec"]["rayStartParams"],
            **{g["groupName"]: g["rayStartParams"] for g in cluster["workerGroupSpecs"]}}


def offered_resources() -> dict[str, dict]:
    """The custom Ray resources each group's nodes offer (``ray start --resources``, a quoted JSON string)."""
    return {group: json.loads(json.loads(params["resources"])) if "resources" in params else {}
            for group, params in start_params().items()}


def containers(template: dict) -> list[dict]:
    return [*template["spec"].get("initContainers", []), *template["spec"]["containers"]]


def mounts(template: dict) -> dict[str, tuple[dict, dict]]:
    """mountPath -> (mount, volume) of the Ray container (the first, as KubeRay counts)."""
    volumes = {v["name"]: v for v in template["spec"].get("volumes", [])}
    return {m["mountPath"]: (m, volumes[m["name"]]) for m in template["spec"]["containers"][0].get("volumeMounts", [])}


@functools.lru_cache(maxsize=1)
def built_deployments() -> dict:
    """The deployments of the application serveConfigV2 builds, as rayms's code declares them."""
    [app] = ServeDeploySchema.model_validate(serve_config()).applications
    module, _, attr = app.import_path.partition(":")
    application = getattr(importlib.import_module(module), attr)(app.args)
    assert isinstance(application, Application)
    from ray.serve._private.build_app import build_app  # private: the only offline view of the deployments
    return {d.name: d for d in build_app(application, name=app.name).deployments}


def deployment_overrides() -> dict[str, dict]:
    [app] = serve_config()["applications"]
    return {d["name"]: d for d in app.get("deployments", [])}


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
        "kuberay/rbac.yaml", "kuberay/rayservice.yaml", "kuberay/trainedmodel-crd.yaml", "kuberay/networkpolicy.yaml",
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
    built = built_deployments()
    assert "KubernetesBridge" in built
    # Serve's throughput settings go to rayms's own deployments, not to the cluster's drivers.
    from rayms.ray_env import SERVE_TUNING

    for deployment in built.values():
        assert deployment.ray_actor_options["runtime_env"]["env_vars"] == SERVE_TUNING, deployment.name
    assert set(deployment_overrides()) <= set(built)


def test_cluster_offers_what_the_application_asks_for():
    cluster = the_rayservice()["spec"]["rayClusterConfig"]
    settings = Settings(**app_args())
    templates = pod_templates()
    all_containers = [c for t in templates.values() for c in t["spec"]["containers"]]
    assert cluster["rayVersion"] == ray.__version__
    assert len({c["image"] for c in all_containers}) == 1
    for group, template in templates.items():
        assert settings.cache_dir in mounts(template), f"{group}: every node downloads into cache_dir"
    # KubeRay exposes the head's port named `serve` as rayms-serve-svc, and creates no such Service when the
    # head declares ports but none named `serve`.
    [head] = templates["head"]["spec"]["containers"]
    ports = {p.get("name"): p["containerPort"] for p in head.get("ports", [])}
    assert not ports or ports.get("serve") == settings.port
    # Model replicas fit on the workers (the head offers no CPU to them).
    assert start_params()["head"].get("num-cpus") == "0"
    slots = sum(g["replicas"] * int(float(g["template"]["spec"]["containers"][0]["resources"]["limits"]["cpu"])
                                    // settings.replica_num_cpus) for g in cluster["workerGroupSpecs"])
    assert slots >= settings.num_replicas


def api_credential_files() -> set[str]:
    """What an in-cluster client reads: the kubernetes client's token and CA, and the bridge's namespace file."""
    return {SERVICE_TOKEN_FILENAME, SERVICE_CERT_FILENAME, str(SERVICE_ACCOUNT_NAMESPACE)}


def projected_files(template: dict) -> dict[str, str]:
    """Files the Ray container sees from projected volumes: path -> the kind of source each comes from."""
    files = {}
    for path, (_, volume) in mounts(template).items():
        for source in volume.get("projected", {}).get("sources", []):
            [(kind, spec)] = source.items()
            items = [spec["path"]] if kind == "serviceAccountToken" else [i["path"] for i in spec.get("items", [])]
            files.update({str(Path(path) / item): kind for item in items})
    return files


def has_api_token(template: dict) -> bool:
    spec = template["spec"]
    projected = any("serviceAccountToken" in source for volume in spec.get("volumes", [])
                    for source in volume.get("projected", {}).get("sources", []))
    return projected or spec.get("automountServiceAccountToken", True)


def test_pinned_deployments_keep_their_options_and_run_where_their_files_are():
    """The registry runs where its state folder is mounted and the bridge where the API token is, each pinned
    by a custom resource that exactly one group offers. Serve replaces a deployment's ray_actor_options whole
    with the config's (``override_deployment_info`` in ray/serve/_private/application_state.py), so an
    override that left out the code's runtime_env or num_cpus would silently change the deployment."""
    settings = Settings(**app_args())
    templates, offered, built, overrides = pod_templates(), offered_resources(), built_deployments(), deployment_overrides()
    needs = {"Registry": lambda t: str(Path(settings.resolved_state_uri()).parent) in mounts(t),
             "KubernetesBridge": lambda t: api_credential_files() <= set(projected_files(t))}
    assert set(needs) <= set(overrides), "the registry and the bridge are pinned"
    for name, override in overrides.items():
        given = override.get("ray_actor_options", {})
        code = {k: v for k, v in built[name].ray_actor_options.items() if k != "resources"}
        assert {k: given.get(k) for k in code} == code, f"{name}: the override drops options rayms's code sets"
        for resource in given.get("resources", {}):
            groups = [g for g, res in offered.items() if resource in res]
            assert len(groups) == 1, f"{name} asks for {resource!r}, offered by {groups}"
            assert needs[name](templates[groups[0]]), f"{name} is pinned to {groups[0]}, which lacks its files"
        assert given.get("resources") or name not in needs, f"{name} is not pinned"


def test_only_the_bridges_pod_holds_an_api_token():
    """Model code (unpickled artifacts) runs on the workers, which get no ServiceAccount token. The head gets a
    projected, expiring one, with the CA and the namespace an in-cluster client reads."""
    [(_, account)] = of_kind("ServiceAccount")
    assert account.get("automountServiceAccountToken") is False, "the account mounts no token by default"
    [resource] = deployment_overrides()["KubernetesBridge"]["ray_actor_options"]["resources"]
    [bridge_group] = [g for g, res in offered_resources().items() if resource in res]
    for group, template in pod_templates().items():
        assert template["spec"].get("automountServiceAccountToken") is False, group
        if group != bridge_group:
            assert not has_api_token(template), f"{group}: an API token where the bridge does not run"
            continue
        files = projected_files(template)
        assert {f: files.get(f) for f in sorted(api_credential_files())} == {
            SERVICE_CERT_FILENAME: "configMap", str(SERVICE_ACCOUNT_NAMESPACE): "downwardAPI",
            SERVICE_TOKEN_FILENAME: "serviceAccountToken"}
        [token] = [s["serviceAccountToken"] for v in template["spec"]["volumes"]
                   for s in v.get("projected", {}).get("sources", []) if "serviceAccountToken" in s]
        assert token.get("expirationSeconds", 3600) <= 3600 and "audience" not in token, "an API token, renewed"
        [(mount, _)] = [m for path, m in mounts(template).items() if path == str(Path(SERVICE_TOKEN_FILENAME).parent)]
        assert mount.get("readOnly") is True


def test_every_node_routes_by_model_through_haproxy_as_rayms_serve_does():
    from rayms.ray_env import HAPROXY_ROUTING

    for group, template in pod_templates().items():
        for container in template["spec"]["containers"]:
            env = {e["name"]: e.get("value") for e in container.get("env", [])}
            assert {k: env.get(k) for k in HAPROXY_ROUTING} == HAPROXY_ROUTING, group
    assert serve_config()["proxy_location"] == "EveryNode", "HAProxy runs where Serve would run its proxies"


def test_grpc_is_served_and_exposed_on_its_own_port():
    from ray.serve.config import gRPCOptions

    from rayms.cluster.grpc import SERVICER_FUNCTION

    options = gRPCOptions(**serve_config()["grpc_options"])
    assert options.grpc_servicer_functions == [SERVICER_FUNCTION]
    assert callable(options.grpc_servicer_func_callable[0])  # the import path resolves
    ports = {p["name"]: p["port"] for p in the_rayservice()["spec"]["serveService"]["spec"]["ports"]}
    assert ports == {"serve": serve_config()["http_options"]["port"], "grpc": options.port}


def dockerfile() -> str:
    return (KUBERAY / "Dockerfile").read_text()


def test_dockerfile_builds_the_image_the_rayservice_runs():
    text = dockerfile()
    for sources in re.findall(r"^COPY\s+(?:--\S+\s+)*(.+)\s+\S+$", text, flags=re.M):
        for source in sources.split():
            assert (ROOT / source).exists(), source
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    [extras] = re.findall(r'pip install .*\[([a-z0-9,]+)\]', text)
    assert set(extras.split(",")) <= set(project["optional-dependencies"])
    images = {c["image"] for t in pod_templates().values() for c in t["spec"]["containers"]}
    assert images == {f"rayms:{project['version']}"}
    assert f"-t rayms:{project['version']}" in text
    # The pods run as the image's own numeric user (its last USER uid:gid), so the image's files stay theirs.
    uid, gid = re.findall(r"^USER\s+(\S+)", text, flags=re.M)[-1].split(":")
    for group, template in pod_templates().items():
        pod = template["spec"]["securityContext"]
        assert (pod["runAsUser"], pod["runAsGroup"]) == (int(uid), int(gid)), group


DIGEST = re.compile(r"sha256:[0-9a-f]{64}")


def test_image_base_is_pinned_by_digest():
    """A tag can be moved to other content, a digest cannot. The Dockerfile either names the digest or takes it
    as a build argument without a default, so a build without one stops at FROM; a default must be a digest."""
    text = dockerfile()
    [base] = re.findall(r"^FROM\s+(\S+)", text, flags=re.M)
    name, _, digest = base.partition("@")
    assert name == f"rayproject/ray:{ray.__version__}-py{sys.version_info.major}{sys.version_info.minor}", (
        "the base's Ray and Python are the cluster's")
    if DIGEST.fullmatch(digest):
        return
    arg = re.fullmatch(r"\$\{(\w+)\}|\$(\w+)", digest)
    assert arg, f"FROM {base}: pinned by neither a digest nor a digest argument"
    arg = arg[1] or arg[2]
    [default] = re.findall(rf"^ARG\s+{arg}(?:=(\S*))?\s*$", text.split("\nFROM", 1)[0], flags=re.M)
    assert default == "" or DIGEST.fullmatch(default), f"ARG {arg}={default}: not sha256:<64 hex digits>"
    assert f"--build-arg {arg}=" in (KUBERAY / "README.md").read_text(), "the README's build command sets it"


def constraint_pins() -> dict[str, str]:
    pins = {}
    for line in (ROOT / ".ci" / "constraints.txt").read_text().splitlines():
        name, _, version = line.partition("==")
        if version:
            pins[canonicalize_name(name)] = version.strip()
    return pins


def requirement_closure(requirements: list[Requirement]) -> set[str]:
    """Every distribution ``requirements`` pull in, as far as this environment has them installed (the image's
    platform and Python are this machine's), following extras and markers as pip does."""
    seen: set[tuple[str, frozenset]] = set()
    todo = list(requirements)
    while todo:
        req = todo.pop()
        key = (canonicalize_name(req.name), frozenset(req.extras))
        if key in seen:
            continue
        seen.add(key)
        try:
            requires = importlib.metadata.distribution(req.name).requires or []
        except importlib.metadata.PackageNotFoundError:
            continue
        for dependency in map(Requirement, requires):
            markers = [{"extra": extra} for extra in ("", *req.extras)]
            if dependency.marker is None or any(dependency.marker.evaluate(m) for m in markers):
                todo.append(dependency)
    return {name for name, _ in seen}


def test_image_installs_rayms_from_the_constraints_file():
    """The image gets the versions the suite runs with: pip installs under .ci/constraints.txt, which pins rayms's
    requirements, those of the extras the image installs, and what they pull in."""
    text = dockerfile()
    copied = {source: dest for sources, dest in re.findall(r"^COPY\s+(?:--\S+\s+)*(.+)\s+(\S+)$", text, flags=re.M)
              for source in sources.split()}
    [install] = re.findall(r"pip install (.+)", text)
    constraints = re.findall(r"(?:--constraint|-c)[ =](\S+)", install)
    assert constraints == [copied[".ci/constraints.txt"]], "pip reads the repository's constraints file"
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    [extras] = re.findall(r'\[([a-z0-9,]+)\]', install)
    wanted = [Requirement(r) for r in project["dependencies"]]
    wanted += [Requirement(r) for extra in extras.split(",") for r in project["optional-dependencies"][extra]]
    pins = constraint_pins()
    unpinned = sorted(requirement_closure(wanted) - set(pins))
    assert unpinned == [], f"the image would get whatever version pip picks of {unpinned}"
    for req in wanted:
        assert req.specifier.contains(pins[canonicalize_name(req.name)]), f"{req}: the pin is outside its range"


def test_pods_run_as_the_account_the_role_is_bound_to():
    [(_, account)] = of_kind("ServiceAccount")
    roles = {doc["metadata"]["name"] for _, doc in of_kind("Role")}
    for label, binding in of_kind("RoleBinding"):
        assert binding["roleRef"]["kind"] == "Role" and binding["roleRef"]["name"] in roles, label
        assert binding["subjects"] == [{"kind": "ServiceAccount", "name": account["metadata"]["name"]}], label
    for group, template in pod_templates().items():
        assert template["spec"]["serviceAccountName"] == account["metadata"]["name"], group


# ------------------------------------------------------------------ hardening

def test_every_pod_and_container_runs_unprivileged():
    """Non-root by number, no privilege escalation (the base image's sudo is inert), a read-only root, no
    capabilities, the runtime's default seccomp profile. KubeRay copies the Ray container's securityContext to
    the init container it adds, so these reach every container the pods run."""
    for group, template in pod_templates().items():
        pod = template["spec"].get("securityContext", {})
        assert pod.get("runAsNonRoot") is True and pod.get("seccompProfile") == {"type": "RuntimeDefault"}, group
        for container in containers(template):
            where, own = f"{group}/{container['name']}", container.get("securityContext", {})
            effective = {**{k: pod[k] for k in ("runAsNonRoot", "runAsUser", "seccompProfile") if k in pod}, **own}
            assert effective.get("runAsNonRoot") is True, where
            assert isinstance(effective.get("runAsUser"), int) and effective["runAsUser"] > 0, where
            assert effective.get("seccompProfile") == {"type": "RuntimeDefault"}, where
            assert own.get("allowPrivilegeEscalation") is False, where
            assert own.get("readOnlyRootFilesystem") is True, where
            assert own.get("capabilities") == {"drop": ["ALL"]}, where
            assert not own.get("privileged"), where


def written_paths(group: str, container: dict, monkeypatch) -> dict[str, str]:
    """What Ray and rayms write on a node of ``group``, worked out the way they do in that container."""
    from ray._common.utils import get_default_ray_temp_dir  # private: Ray's own rule for its session folder
    from ray.serve._private import constants as serve_constants  # private: where Serve keeps HAProxy's files

    env = {e["name"]: e["value"] for e in container.get("env", []) if "value" in e}
    for variable in ("RAY_TMPDIR", "TMPDIR"):
        monkeypatch.delenv(variable, raising=False)
        if variable in env:
            monkeypatch.setenv(variable, env[variable])
    settings = Settings(**app_args())
    paths = {"Ray's session folder": start_params()[group].get("temp-dir") or get_default_ray_temp_dir(),
             "the artifact cache": settings.cache_dir}
    for variable in ("RAY_SERVE_HAPROXY_CONFIG_FILE_LOC", "RAY_SERVE_HAPROXY_SOCKET_PATH",
                     "RAY_SERVE_HAPROXY_SERVER_STATE_BASE", "RAY_SERVE_HAPROXY_SERVER_STATE_FILE"):
        paths[f"HAProxy's {variable}"] = env.get(variable) or getattr(serve_constants, variable)
    if "rayms-state" in offered_resources()[group]:
        paths["the registry's state file"] = str(Path(settings.resolved_state_uri()).parent)
    return paths


def test_what_ray_and_rayms_write_is_on_a_writable_volume(monkeypatch):
    """The root filesystem is read-only, so every folder Ray or rayms writes must be a writable emptyDir."""
    for group, template in pod_templates().items():
        writable = [path for path, (mount, volume) in mounts(template).items()
                    if "emptyDir" in volume and not mount.get("readOnly")]
        [container] = template["spec"]["containers"]
        for what, path in written_paths(group, container, monkeypatch).items():
            assert any(Path(path).is_relative_to(root) for root in writable), f"{group}: {what} ({path}) is read-only"


def test_ray_asks_every_caller_for_the_clusters_token():
    """Ray's token authentication, on through KubeRay's authOptions: KubeRay sets RAY_AUTH_MODE=token and
    RAY_AUTH_TOKEN (from the Secret's key `auth_token`) in every Ray container, but only in a container that
    does not set them itself."""
    cluster = the_rayservice()["spec"]["rayClusterConfig"]
    auth = cluster.get("authOptions", {})
    assert auth.get("mode") == "token"
    assert auth.get("secretName"), "the token is the Secret's, the same for a RayService's successive clusters"
    assert not auth.get("enableK8sTokenAuth"), "KubeRay refuses Kubernetes token auth for a RayService"
    for group, template in pod_templates().items():
        for container in containers(template):
            overrides = {e["name"] for e in container.get("env", [])} & {"RAY_AUTH_MODE", "RAY_AUTH_TOKEN"}
            assert not overrides, f"{group}/{container['name']} sets {overrides}, which KubeRay then leaves alone"
    readme = (KUBERAY / "README.md").read_text()
    assert f"kubectl create secret generic {auth['secretName']} --from-literal=auth_token=" in readme


SECRET_NAMES = re.compile(r"KEY|SECRET|TOKEN|PASSW|CREDENTIAL|CONNECTION_STRING|SAS", re.IGNORECASE)
STORAGE_CREDENTIALS = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN")


def test_storage_credentials_come_from_a_secret_on_every_pod_never_from_the_serve_config():
    """serveConfigV2 is readable by whoever can read the RayService, and storage_env reached only the agents.
    Credentials are Secret references in every Ray container's environment instead, so every Ray process on the
    pod (the registry with an s3:// state file, the agents that download) sees them."""
    [app] = serve_config()["applications"]
    in_config = [*Settings(**app["args"]).storage_env, *app.get("runtime_env", {}).get("env_vars", {}),
                 *(v for d in app.get("deployments", [])
                   for v in d.get("ray_actor_options", {}).get("runtime_env", {}).get("env_vars", {}))]
    assert [name for name in in_config if SECRET_NAMES.search(name)] == []
    for group, template in pod_templates().items():
        for container in containers(template):
            where, env = f"{group}/{container['name']}", container.get("env", [])
            for variable in env:
                if SECRET_NAMES.search(variable["name"]):
                    assert "value" not in variable and "secretKeyRef" in variable.get("valueFrom", {}), (
                        f"{where}: {variable['name']} in plain text")
            references = {e["name"]: e["valueFrom"]["secretKeyRef"] for e in env
                          if "secretKeyRef" in e.get("valueFrom", {})}
            assert set(STORAGE_CREDENTIALS) <= set(references), where
            for name in STORAGE_CREDENTIALS:
                assert references[name]["optional"] is True, f"{where}: pods start without the Secret too"


# A small evaluator of NetworkPolicy ingress rules (networking.k8s.io/v1 semantics: a pod that some policy
# selects is isolated and admits what any rule of a selecting policy admits). Peers are pods; ipBlock rules
# match no pod here.

def selects(selector: dict | None, labels: dict[str, str]) -> bool:
    """A LabelSelector: matchLabels and matchExpressions all hold; ``{}`` selects everything."""
    if selector is None:
        return False
    if any(labels.get(key) != value for key, value in selector.get("matchLabels", {}).items()):
        return False
    for expression in selector.get("matchExpressions", []):
        key, operator, values = expression["key"], expression["operator"], expression.get("values", [])
        holds = {"In": labels.get(key) in values and key in labels, "NotIn": labels.get(key) not in values,
                 "Exists": key in labels, "DoesNotExist": key not in labels}[operator]
        if not holds:
            return False
    return True


@dataclasses.dataclass
class Pod:
    labels: dict[str, str]
    namespace: str = "default"
    ports: dict[str, int] = dataclasses.field(default_factory=dict)

    @property
    def namespace_labels(self) -> dict[str, str]:
        return {"kubernetes.io/metadata.name": self.namespace}


def admits(policies: list[dict], peer: Pod, target: Pod, port: int) -> bool:
    """Whether a TCP connection from ``peer`` to ``target``'s ``port`` gets in (the policies are in the
    target's namespace, as kubectl -n puts them)."""
    selecting = [p["spec"] for p in policies if "Ingress" in p["spec"].get("policyTypes", ["Ingress"])
                 and selects(p["spec"]["podSelector"], target.labels)]
    if not selecting:
        return True

    def port_matches(rule_port: dict) -> bool:
        if rule_port.get("protocol", "TCP") != "TCP":
            return False
        if "port" not in rule_port:
            return True
        first = rule_port["port"] if isinstance(rule_port["port"], int) else target.ports.get(rule_port["port"])
        return first is not None and first <= port <= rule_port.get("endPort", first)

    def peer_matches(source: dict) -> bool:
        if "ipBlock" in source:
            return False
        namespaces, pods = source.get("namespaceSelector"), source.get("podSelector")
        in_namespace = selects(namespaces, peer.namespace_labels) if namespaces is not None else (
            peer.namespace == target.namespace)
        return in_namespace and (pods is None or selects(pods, peer.labels))

    return any((not rule.get("ports") or any(map(port_matches, rule["ports"])))
               and (not rule.get("from") or any(map(peer_matches, rule["from"])))
               for spec in selecting for rule in spec.get("ingress", []))


KUBERAY_FIXED_LABELS = ("ray.io/node-type", "ray.io/group", "ray.io/cluster")


def ray_pod(group: str, template: dict, cluster: str = "rayms-x7k2p") -> Pod:
    """A pod KubeRay makes from ``template``: its own labels, then the template's, except the three KubeRay never
    lets a template change (labelPod in ray-operator/controllers/ray/common/pod.go)."""
    labels = {"ray.io/is-ray-node": "yes", "ray.io/cluster": cluster,
              "ray.io/node-type": "head" if group == "head" else "worker",
              "ray.io/group": "headgroup" if group == "head" else group,
              "app.kubernetes.io/name": "kuberay", "app.kubernetes.io/created-by": "kuberay-operator"}
    labels.update({k: v for k, v in template.get("metadata", {}).get("labels", {}).items()
                   if k not in KUBERAY_FIXED_LABELS})
    ports = {p["name"]: p["containerPort"] for c in template["spec"]["containers"] for p in c.get("ports", [])
             if "name" in p}
    return Pod(labels=labels, ports=ports)


# Ports Ray listens on besides Serve's (defaults of Ray 2.60; the nodes' RPC and object-manager ports are
# random, the worker range starts at 10002, direct-ingress replicas take 30000-31000).
RAY_PORTS = {"GCS": 6379, "dashboard": 8265, "Ray client": 10001, "dashboard agent": 52365, "metrics": 8080,
             "a worker process": 10002, "a replica behind HAProxy": 30000, "Serve's fallback proxy": 8500}


def serving_ports() -> set[int]:
    """The ports of rayms-serve-svc: the head's port named `serve`, and any named `serve-*` (gRPC)."""
    [head] = pod_templates()["head"]["spec"]["containers"]
    named = {p["containerPort"] for p in head.get("ports", []) if p.get("name", "").startswith("serve")}
    return named or {8000}


def network_policies() -> list[dict]:
    return [doc for _, doc in of_kind("NetworkPolicy")]


def test_clients_reach_the_serving_port_and_nothing_else():
    policies, serving = network_policies(), serving_ports()
    clients = {"a client in another namespace": Pod({"app": "shop"}, namespace="shop"),
               "a notebook in the same namespace": Pod({"app": "notebook"}),
               "another Ray cluster's head": Pod({"ray.io/node-type": "head", "ray.io/is-ray-node": "yes",
                                                 "app.kubernetes.io/name": "kuberay"})}
    for group, template in pod_templates().items():
        target = ray_pod(group, template)
        for who, client_pod in clients.items():
            reached = {port for port in serving | set(RAY_PORTS.values()) if admits(policies, client_pod, target, port)}
            assert reached == serving, f"{who} reaches {sorted(reached)} on the {group} pods"


def test_ray_ports_are_open_between_the_clusters_own_pods():
    policies, templates = network_policies(), pod_templates()
    pods = {group: ray_pod(group, template) for group, template in templates.items()}
    # A RayService upgrade starts a second cluster from the same templates; its pods are peers too.
    pods.update({f"{group} (next cluster)": ray_pod(group, t, cluster="rayms-q9w4z") for group, t in templates.items()})
    for source, peer in pods.items():
        for destination, target in pods.items():
            closed = [what for what, port in RAY_PORTS.items() if not admits(policies, peer, target, port)]
            assert closed == [], f"{source} -> {destination}: {closed} closed"


def test_the_kuberay_operator_reaches_the_heads_dashboard_only():
    """KubeRay submits serveConfigV2 and reads the applications' status through the head's dashboard, and
    probes the head's serving port."""
    policies, templates = network_policies(), pod_templates()
    operator = Pod({"app.kubernetes.io/name": "kuberay-operator"}, namespace="kuberay-system")
    for group, template in templates.items():
        target = ray_pod(group, template)
        reached = {what for what, port in RAY_PORTS.items() if admits(policies, operator, target, port)}
        assert reached == ({"dashboard"} if group == "head" else set()), f"the operator reaches {reached} on {group}"
        assert all(admits(policies, operator, target, port) for port in serving_ports())


def test_the_network_policy_evaluator_follows_kubernetes_rules():
    """The evaluator above, on rules whose answer Kubernetes' documentation gives."""
    web = Pod({"app": "web"})
    policy = {"spec": {"podSelector": {"matchLabels": {"app": "web"}}, "policyTypes": ["Ingress"], "ingress": [
        {"from": [{"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "ops"}},
                   "podSelector": {"matchExpressions": [{"key": "role", "operator": "In", "values": ["probe"]}]}}],
         "ports": [{"port": "http"}, {"port": 9000, "endPort": 9010}]}]}}
    web.ports = {"http": 8080}
    prober = Pod({"role": "probe"}, namespace="ops")
    assert admits([policy], prober, web, 8080) and admits([policy], prober, web, 9005)
    assert not admits([policy], prober, web, 9011)  # outside the range
    assert not admits([policy], Pod({"role": "probe"}), web, 8080)  # both selectors must hold
    assert not admits([policy], Pod({"role": "other"}, namespace="ops"), web, 8080)
    assert admits([policy], Pod({}), Pod({"app": "db"}), 5432)  # a pod no policy selects is not isolated
    deny_all = {"spec": {"podSelector": {}, "policyTypes": ["Ingress"]}}
    assert not admits([deny_all], prober, web, 8080)
    assert admits([deny_all, policy], prober, web, 8080)  # policies add up


def test_the_readme_security_table_names_tests_that_exist():
    readme = (KUBERAY / "README.md").read_text()
    table = readme[readme.index("## Security"):readme.index("### Secrets")]
    named = set(re.findall(r"`(test_\w+)`", table))
    assert len(named) >= 8, "a test per threat"
    assert sorted(name for name in named if not callable(globals().get(name))) == []


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
        secret = the_rayservice()["spec"]["rayClusterConfig"]["authOptions"]["secretName"]
        printed = [*kubectl(*apply, "-f", "kuberay/trainedmodel-crd.yaml"),
                   *kubectl("create", "secret", "generic", secret, "--from-literal=auth_token=not-a-real-token"),
                   *kubectl(*apply, "-f", "kuberay/rayservice.yaml"),
                   *kubectl(*apply, "-f", "kuberay/examples/sklearn.yaml"),
                   *kubectl("delete", "rtm", "sklearn-iris"),
                   *kubectl(*apply, *(a for f in examples for a in ("-f", f))),
                   *kubectl("delete", "rayservice", "rayms")]
    assert len(printed) == 9
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
