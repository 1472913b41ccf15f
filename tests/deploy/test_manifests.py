"""deploy/k8s: every rendered manifest validates offline against the Kubernetes schemas (strict, pinned
version) or, for CRDs, against the JSON schemas kept in deploy/k8s/schemas; and the pieces refer to each
other correctly (selectors, ports, probes, HPA/PDB targets, ConfigMap/Secret keys, the Triton address).

Overlays are rendered with the real `kubectl kustomize` (tests/deploy/manifests.py).
"""

from __future__ import annotations

import json
import re
from dataclasses import fields

import jsonschema
import kubernetes_validate
import pytest
import yaml

from service.config import Settings
from tests.harness import ROOT
from tests.deploy.manifests import kustomization, load_docs, pod_containers, render
from tests.deploy.metric_names import gateway_series

K8S_VERSION = "1.32.0"           # the cluster version the manifests target
K8S = ROOT / "deploy" / "k8s"
BASE = K8S / "base"
OVERLAYS = ["cpu", "gpu"]
CRD_SCHEMAS = {("monitoring.coreos.com/v1", "ServiceMonitor"): K8S / "schemas" / "servicemonitor-monitoring-v1.json"}
GATEWAY_DRAIN_SECONDS = 30       # service/server.py: grpc_server.stop(grace=30), uvicorn graceful shutdown 30 s


@pytest.fixture(scope="module")
def rendered() -> dict[str, list[dict]]:
    return {name: render(K8S / "overlays" / name) for name in OVERLAYS} | {"base": render(BASE)}


def one(docs: list[dict], kind: str, name: str | None = None) -> dict:
    found = [d for d in docs if d["kind"] == kind and (name is None or d["metadata"]["name"] == name)]
    assert len(found) == 1, f"expected one {kind} {name or ''}, found {len(found)}"
    return found[0]


def workloads(docs: list[dict]) -> list[dict]:
    return [d for d in docs if d["kind"] in ("Deployment", "StatefulSet")]


def selects(selector: dict, labels: dict) -> bool:
    """A Service's plain selector map, or a LabelSelector using matchLabels only."""
    if "matchLabels" in selector or "matchExpressions" in selector:
        assert "matchExpressions" not in selector, "only matchLabels selectors are used here"
        selector = selector["matchLabels"]
    return bool(selector) and all(labels.get(k) == v for k, v in selector.items())


def container_ports(workload: dict) -> dict[str, int]:
    return {p["name"]: p["containerPort"] for c in pod_containers(workload) for p in c.get("ports", [])}


# --------------------------------------------------------------------------------------------- schemas

@pytest.mark.parametrize("target", ["base", *OVERLAYS])
def test_every_manifest_validates_strictly(rendered, target):
    docs = rendered[target]
    assert docs
    for doc in docs:
        label = f"{target}: {doc['kind']}/{doc['metadata']['name']}"
        schema_path = CRD_SCHEMAS.get((doc["apiVersion"], doc["kind"]))
        if schema_path is not None:
            schema = json.loads(schema_path.read_text())
            errors = sorted(jsonschema.Draft202012Validator(schema).iter_errors(doc), key=str)
            assert not errors, f"{label}: {[f'{list(e.path)}: {e.message}' for e in errors]}"
            continue
        try:
            kubernetes_validate.validate(doc, K8S_VERSION, strict=True)
        except kubernetes_validate.utils.SchemaNotFoundError:
            pytest.fail(f"{label}: no schema for {doc['apiVersion']} {doc['kind']} (add one to deploy/k8s/schemas)")
        except kubernetes_validate.ValidationError as exc:
            pytest.fail(f"{label}: {'.'.join(map(str, exc.path))}: {exc.message}")


def test_strict_validation_rejects_what_it_should():
    """The validators in use do fail: an unknown field, a wrong type, a CRD typo."""
    deployment = load_docs(BASE / "gateway-deployment.yaml")[0]
    bad = json.loads(json.dumps(deployment))
    bad["spec"]["template"]["spec"]["containers"][0]["livenessProbe"]["httpGet"]["pathh"] = "/x"
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(bad, K8S_VERSION, strict=True)
    bad = json.loads(json.dumps(deployment))
    bad["spec"]["replicas"] = "two"
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(bad, K8S_VERSION, strict=True)
    monitor = load_docs(BASE / "gateway-servicemonitor.yaml")[0]
    monitor["spec"]["endpoints"][0]["intervall"] = "15s"
    schema = json.loads(CRD_SCHEMAS[("monitoring.coreos.com/v1", "ServiceMonitor")].read_text())
    assert list(jsonschema.Draft202012Validator(schema).iter_errors(monitor))


def test_crd_schemas_are_valid_json_schemas():
    for path in CRD_SCHEMAS.values():
        jsonschema.Draft202012Validator.check_schema(json.loads(path.read_text()))


# --------------------------------------------------------------------------------------------- layout

def test_every_file_is_used_and_every_patch_target_exists(rendered):
    """kubectl fails on a JSON 6902 path that is not there; a patch's target and a strategic merge's
    containers are checked here."""
    listed = set(kustomization(BASE)["resources"])
    on_disk = {p.name for p in BASE.glob("*.yaml")} - {"kustomization.yaml"}
    assert listed == on_disk, f"unlisted: {on_disk - listed}, missing: {listed - on_disk}"
    for overlay in OVERLAYS:
        directory = K8S / "overlays" / overlay
        k = kustomization(directory)
        assert k["resources"] == ["../../base"]
        patch_files = {p["path"] for p in k["patches"]}
        assert patch_files == {p.name for p in directory.glob("*.yaml")} - {"kustomization.yaml"}
        for patch in k["patches"]:
            target = patch["target"]
            base = one(rendered["base"], target["kind"], target["name"])
            assert base["apiVersion"] == f"{target['group']}/{target['version']}", patch["path"]
            body = yaml.safe_load((directory / patch["path"]).read_text())
            if isinstance(body, dict):  # strategic merge: same object, containers that exist
                assert (body["kind"], body["metadata"]["name"]) == (base["kind"], base["metadata"]["name"])
                assert {c["name"] for c in pod_containers(body)} <= {c["name"] for c in pod_containers(base)}


# --------------------------------------------------------------------------------------------- cross-references

@pytest.mark.parametrize("target", ["base", *OVERLAYS])
def test_cross_references(rendered, target):
    docs = rendered[target]
    namespace = one(docs, "Namespace")["metadata"]["name"]
    for d in docs:
        if d["kind"] != "Namespace":
            assert d["metadata"].get("namespace") == namespace, d["metadata"]["name"]

    for w in workloads(docs):
        labels = w["spec"]["template"]["metadata"]["labels"]
        assert selects(w["spec"]["selector"], labels), f"{w['metadata']['name']} selector misses its pods"
        ports = container_ports(w)
        for c in pod_containers(w):
            for probe in ("startupProbe", "livenessProbe", "readinessProbe"):
                assert probe in c, f"{w['metadata']['name']}/{c['name']} has no {probe}"
                port = c[probe]["httpGet"]["port"]
                assert port in ports or port in ports.values(), f"{probe} on undeclared port {port}"
            assert c["resources"]["requests"] and c["resources"]["limits"]
            # ConfigMap / Secret references exist, with the keys asked for.
            for source in c.get("envFrom", []):
                one(docs, "ConfigMap", source["configMapRef"]["name"])
            for env in c.get("env", []):
                ref = env.get("valueFrom", {}).get("secretKeyRef")
                if ref:
                    secret = one(docs, "Secret", ref["name"])
                    assert ref["key"] in {**secret.get("data", {}), **secret.get("stringData", {})}

    for service in (d for d in docs if d["kind"] == "Service"):
        backends = [w for w in workloads(docs) if selects(service["spec"]["selector"], w["spec"]["template"]["metadata"]["labels"])]
        assert len(backends) == 1, f"Service {service['metadata']['name']} selects {len(backends)} workloads"
        ports = container_ports(backends[0])
        for p in service["spec"]["ports"]:
            assert p["targetPort"] in ports, f"{service['metadata']['name']}: targetPort {p['targetPort']}"
            assert ports[p["targetPort"]] == p["port"], "service port and container port differ"

    sts = one(docs, "StatefulSet")
    headless = one(docs, "Service", sts["spec"]["serviceName"])
    assert headless["spec"]["clusterIP"] == "None"
    claims = {t["metadata"]["name"] for t in sts["spec"]["volumeClaimTemplates"]}
    triton = pod_containers(sts)[0]
    assert "data" in claims and {"name": "data", "mountPath": "/data"} in triton["volumeMounts"]
    assert {"name": "AMSERVE_DATA_DIR", "value": "/data"} in triton["env"]

    for monitor in (d for d in docs if d["kind"] == "ServiceMonitor"):
        services = [s for s in docs if s["kind"] == "Service" and selects(monitor["spec"]["selector"], s["metadata"]["labels"])]
        assert len(services) == 1, f"ServiceMonitor {monitor['metadata']['name']} selects {len(services)} Services"
        for endpoint in monitor["spec"]["endpoints"]:
            assert endpoint["port"] in {p["name"] for p in services[0]["spec"]["ports"]}


@pytest.mark.parametrize("target", ["base", *OVERLAYS])
def test_gateway_hpa_pdb_and_drain(rendered, target):
    docs = rendered[target]
    gateway = one(docs, "Deployment", "amserve-gateway")
    pod_labels = gateway["spec"]["template"]["metadata"]["labels"]

    hpa = one(docs, "HorizontalPodAutoscaler")
    assert hpa["apiVersion"] == "autoscaling/v2"
    ref = hpa["spec"]["scaleTargetRef"]
    assert (ref["apiVersion"], ref["kind"], ref["name"]) == ("apps/v1", "Deployment", "amserve-gateway")
    pods_metrics = [m["pods"]["metric"]["name"] for m in hpa["spec"]["metrics"] if m["type"] == "Pods"]
    assert pods_metrics, "the HPA scales on a custom pods metric"
    adapter = yaml.safe_load((ROOT / "deploy" / "prometheus" / "adapter-values.yaml").read_text())
    served = {rule["name"]["as"]: rule["seriesQuery"] for rule in adapter["rules"]["custom"]}
    for name in pods_metrics:
        assert name in served, f"prometheus-adapter serves no {name}"
        series = re.match(r"[a-zA-Z_:][a-zA-Z0-9_:]*", served[name]).group(0)
        assert series in gateway_series(), f"{series} is not a gateway metric"

    pdb = one(docs, "PodDisruptionBudget")
    assert selects(pdb["spec"]["selector"], pod_labels)
    assert pdb["spec"]["minAvailable"] < hpa["spec"]["minReplicas"], "the PDB would block every drain"

    spec = gateway["spec"]["template"]["spec"]
    container = spec["containers"][0]
    sleep = int(container["lifecycle"]["preStop"]["exec"]["command"][-1])
    assert spec["terminationGracePeriodSeconds"] >= sleep + GATEWAY_DRAIN_SECONDS
    assert spec["securityContext"]["runAsNonRoot"] is True


@pytest.mark.parametrize("target", ["base", *OVERLAYS])
def test_gateway_settings_and_triton_address(rendered, target):
    docs = rendered[target]
    config = one(docs, "ConfigMap", "amserve-gateway")["data"]
    known = {f"AMSERVE_{f.name.upper()}" for f in fields(Settings)}
    assert set(config) <= known, f"not amserve settings: {set(config) - known}"
    assert config["AMSERVE_BACKEND"] == "triton" and config["AMSERVE_HOST"] == "0.0.0.0"

    gateway = one(docs, "Deployment", "amserve-gateway")
    ports = container_ports(gateway)
    assert (int(config["AMSERVE_REST_PORT"]), int(config["AMSERVE_GRPC_PORT"])) == (ports["http"], ports["grpc"])

    sts = one(docs, "StatefulSet", "amserve-triton")
    host, port = config["AMSERVE_TRITON_URL"].rsplit(":", 1)
    assert host == f"{sts['metadata']['name']}-0.{sts['spec']['serviceName']}"
    triton = pod_containers(sts)[0]
    triton_ports = container_ports(sts)
    assert int(port) == triton_ports["grpc"]
    flags = dict(a.removeprefix("--").split("=", 1) for a in triton["args"] if a.startswith("--"))
    assert triton["args"][0] == "tritonserver"
    assert {k: int(flags[f"{k}-port"]) for k in ("http", "grpc", "metrics")} == triton_ports
    for probe, path in (("livenessProbe", "/v2/health/live"), ("readinessProbe", "/v2/health/ready")):
        assert triton[probe]["httpGet"] == {"path": path, "port": "http"}

    gateway_container = pod_containers(gateway)[0]
    assert gateway_container["livenessProbe"]["httpGet"]["path"] == "/healthz/live"
    assert gateway_container["readinessProbe"]["httpGet"]["path"] == "/healthz/ready"
    for workload in (gateway, sts):
        image = pod_containers(workload)[0]["image"]
        assert re.fullmatch(r"[\w.-]+(/[\w.-]+)+:[\w.-]+", image), f"image {image} not rewritten by kustomize"


def test_overlays_size_for_their_hardware(rendered):
    gpu_sts = one(rendered["gpu"], "StatefulSet")
    spec = gpu_sts["spec"]["template"]["spec"]
    triton = pod_containers(gpu_sts)[0]
    assert triton["resources"]["limits"]["nvidia.com/gpu"] == "1"
    assert spec["nodeSelector"] and any(t["key"] == "nvidia.com/gpu" for t in spec["tolerations"])
    assert "--model-config-name=gpu" in triton["args"]

    for target in ("base", "cpu"):
        text = json.dumps(rendered[target])
        assert "nvidia.com/gpu" not in text and "--model-config-name" not in text
    cpu_triton = pod_containers(one(rendered["cpu"], "StatefulSet"))[0]
    base_triton = pod_containers(one(rendered["base"], "StatefulSet"))[0]
    assert cpu_triton["resources"] != base_triton["resources"]
    # Only the gateway of the gpu overlay is on GPU-less nodes: nothing else asks for a GPU.
    assert json.dumps(rendered["gpu"]).count("nvidia.com/gpu\":") == 2  # request and limit of Triton


def test_secret_placeholder_keeps_the_service_closed(rendered):
    from service.api.auth import parse_keys

    secret = one(rendered["base"], "Secret", "amserve-api-keys")
    table = parse_keys(secret["stringData"]["api-keys.json"], "secret")
    assert table, "an empty key list would run the service open"
