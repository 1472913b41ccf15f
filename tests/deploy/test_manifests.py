"""deploy/k8s: every rendered manifest validates offline against the Kubernetes schemas (strict, pinned
version) or, for CRDs, against the JSON schemas kept in deploy/k8s/schemas; and the pieces refer to each
other correctly (selectors, ports, probes, HPA/PDB targets, ConfigMap/Secret keys, the Triton addresses).

Two topologies: one Triton whose PVC holds the banks in SQLite (base, cpu, gpu), and Triton replicas
following a PostgreSQL store (cpu-postgresql, gpu-postgresql: the cpu/gpu overlays plus
components/postgresql and components/cnpg), whose promises (replicas, PDB, anti-affinity, every
replica named to the gateway, the store's Secret, a synchronous 3-instance CloudNativePG Cluster)
are checked here.

Overlays are rendered with the real `kubectl kustomize` (tests/deploy/manifests.py).
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import fields
from pathlib import Path

import jsonschema
import kubernetes_validate
import pytest
import yaml

from service.config import Settings
from tests.deploy.manifests import kustomization, load_docs, pod_containers, render
from tests.deploy.metric_names import gateway_series
from tests.harness import ROOT

K8S_VERSION = "1.32.0"           # the cluster version the manifests target
K8S = ROOT / "deploy" / "k8s"
BASE = K8S / "base"
COMPONENTS = K8S / "components"
SINGLE = ["cpu", "gpu"]                                   # overlays of base: one Triton, SQLite on its PVC
REPLICATED = {"cpu-postgresql": "cpu", "gpu-postgresql": "gpu"}  # overlay: the overlay it adds PostgreSQL to
OVERLAYS = [*SINGLE, *REPLICATED]
EXTERNAL = "external-postgresql"                         # docs/deploy.md's overlay for a PostgreSQL of your own
TARGETS = ["base", *OVERLAYS, EXTERNAL]
REPLICATED_TARGETS = [*REPLICATED, EXTERNAL]
CRD_SCHEMAS = {
    ("monitoring.coreos.com/v1", "ServiceMonitor"): K8S / "schemas" / "servicemonitor-monitoring-v1.json",
    ("postgresql.cnpg.io/v1", "Cluster"): K8S / "schemas" / "cluster-postgresql-cnpg-v1.json",
}
# The Secret CloudNativePG writes for a Cluster's application owner (bootstrap.initdb): <cluster>-app.
CNPG_APP_SECRET_KEYS = {"username", "user", "password", "dbname", "host", "port", "pgpass", "uri", "jdbc-uri"}
STORE_SECRET = ("amserve-pg-app", "uri")                 # where every replicated pod reads AMSERVE_STORE
SECRETS_YOU_CREATE = {EXTERNAL: {STORE_SECRET[0]: {STORE_SECRET[1]}}}  # docs/deploy.md: kubectl create secret
GATEWAY_DRAIN_SECONDS = 30       # service/server.py: grpc_server.stop(grace=30), uvicorn graceful shutdown 30 s


@pytest.fixture(scope="module")
def rendered(tmp_path_factory) -> dict[str, list[dict]]:
    external = external_recipe_overlay(tmp_path_factory.mktemp("overlays"))
    return ({name: render(K8S / "overlays" / name) for name in OVERLAYS}
            | {"base": render(BASE), "external-postgresql": render(external)})


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


def provided_secrets(docs: list[dict]) -> dict[str, set[str]]:
    """Secret name -> keys: the Secrets rendered, and those CloudNativePG writes for each Cluster."""
    secrets = {d["metadata"]["name"]: {*d.get("data", {}), *d.get("stringData", {})}
               for d in docs if d["kind"] == "Secret"}
    clusters = {f"{d['metadata']['name']}-app": CNPG_APP_SECRET_KEYS for d in docs if d["kind"] == "Cluster"}
    assert not secrets.keys() & clusters.keys(), "a rendered Secret would clash with one the operator writes"
    return secrets | clusters


def secret_env(container: dict, name: str) -> tuple[str, str] | None:
    """(Secret, key) the container's environment variable `name` comes from; None if not from a Secret."""
    for env in container.get("env", []):
        if env["name"] == name:
            ref = env.get("valueFrom", {}).get("secretKeyRef")
            return None if ref is None else (ref["name"], ref["key"])
    return None


def external_recipe_overlay(tmp: Path) -> Path:
    """The external-PostgreSQL overlay of docs/deploy.md (written for deploy/k8s/overlays/<name>/), as a
    kustomization under `tmp` whose relative paths reach the same directories."""
    blocks = re.findall(r"```yaml\n(.*?)```", (ROOT / "docs" / "deploy.md").read_text(), flags=re.S)
    recipe = [b for b in blocks if b.startswith("# deploy/k8s/overlays/external-postgresql/kustomization.yaml")]
    assert len(recipe) == 1, "docs/deploy.md shows the external-PostgreSQL overlay once"
    directory = tmp / "external-postgresql"
    directory.mkdir()
    # kustomize takes relative paths only: from `directory` to where the recipe's paths point.
    here = Path(os.path.relpath(K8S / "overlays" / "external-postgresql", directory))
    text = re.sub(r"(?m)^(\s*- )(\.\./\S+)", lambda m: f"{m[1]}{os.path.normpath(here / m[2])}", recipe[0])
    (directory / "kustomization.yaml").write_text(text)
    return directory


# --------------------------------------------------------------------------------------------- schemas

@pytest.mark.parametrize("target", TARGETS)
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


@pytest.mark.parametrize("change", [
    lambda spec: spec.update(instance=3),                                      # a typo'd field
    lambda spec: spec.update(instances="3"),                                   # a wrong type
    lambda spec: spec.update(instances=0),
    lambda spec: spec["postgresql"]["synchronous"].update(method="all"),       # not any | first
    lambda spec: spec["postgresql"]["synchronous"].update(number=0),
    lambda spec: spec["postgresql"]["synchronous"].pop("number"),
    lambda spec: spec["postgresql"]["synchronous"].update(dataDurability="preferred", standbyNamesPre=["x"]),
    lambda spec: spec["postgresql"]["parameters"].update(max_connections=200),  # parameters are strings
    lambda spec: spec["bootstrap"].update(recovery={"source": "x"}),          # not in this subset
    lambda spec: spec["storage"].update(size="20 GB"),
    lambda spec: spec["affinity"].update(podAntiAffinityType="always"),
])
def test_cluster_schema_rejects_what_it_should(change):
    cluster = load_docs(COMPONENTS / "cnpg" / "postgres-cluster.yaml")[0]
    validator = jsonschema.Draft202012Validator(json.loads(CRD_SCHEMAS[("postgresql.cnpg.io/v1", "Cluster")].read_text()))
    assert not list(validator.iter_errors(cluster))
    change(cluster["spec"])
    assert list(validator.iter_errors(cluster))


def test_crd_schemas_are_valid_json_schemas():
    for path in CRD_SCHEMAS.values():
        jsonschema.Draft202012Validator.check_schema(json.loads(path.read_text()))


# --------------------------------------------------------------------------------------------- layout

def test_every_file_is_used_and_every_patch_target_exists(rendered):
    """kubectl fails on a JSON 6902 path that is not there; a patch's target and a strategic merge's
    containers are checked here, for the overlays of base and for the components."""
    listed = set(kustomization(BASE)["resources"])
    on_disk = {p.name for p in BASE.glob("*.yaml")} - {"kustomization.yaml"}
    assert listed == on_disk, f"unlisted: {on_disk - listed}, missing: {listed - on_disk}"
    assert {p.name for p in (K8S / "overlays").iterdir()} == set(OVERLAYS), "an overlay the tests do not render"

    def check(directory: Path, k: dict, parent: list[dict]) -> None:
        """Every file of `directory` is listed, and every patch targets an object of `parent`."""
        files = {p["path"] for p in k.get("patches", [])} | set(k.get("resources", []))
        assert files == {p.name for p in directory.glob("*.yaml")} - {"kustomization.yaml"}, directory.name
        for patch in k.get("patches", []):
            target = patch["target"]
            base = one(parent, target["kind"], target["name"])
            assert base["apiVersion"] == "/".join(filter(None, (target.get("group"), target["version"]))), patch["path"]
            body = yaml.safe_load((directory / patch["path"]).read_text())
            if isinstance(body, dict):  # strategic merge: same object, containers that exist
                assert (body["kind"], body["metadata"]["name"]) == (base["kind"], base["metadata"]["name"])
                assert {c["name"] for c in pod_containers(body)} <= {c["name"] for c in pod_containers(base)}

    for overlay in SINGLE:
        directory = K8S / "overlays" / overlay
        k = kustomization(directory)
        assert k["resources"] == ["../../base"]
        check(directory, {"patches": k["patches"]}, rendered["base"])
    used = set()
    for overlay, parent in REPLICATED.items():
        k = kustomization(K8S / "overlays" / overlay)
        assert k["resources"] == [f"../{parent}"] and "patches" not in k, "PostgreSQL comes from components only"
        assert k["namespace"] == one(rendered[parent], "Namespace")["metadata"]["name"]
        for component in k["components"]:
            directory = (K8S / "overlays" / overlay / component).resolve()
            ck = kustomization(directory)
            assert ck["kind"] == "Component" and "namespace" not in ck
            check(directory, {"patches": ck.get("patches", []),
                              "resources": [r for r in ck.get("resources", []) if not r.startswith("..")]},
                  rendered[parent])
            used.add(directory.name)
    assert used == {p.name for p in COMPONENTS.iterdir()}, "a component no overlay uses"


# --------------------------------------------------------------------------------------------- cross-references

@pytest.mark.parametrize("target", TARGETS)
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
            secrets = provided_secrets(docs) | SECRETS_YOU_CREATE.get(target, {})
            for env in c.get("env", []):
                ref = env.get("valueFrom", {}).get("secretKeyRef")
                if ref:
                    assert ref["name"] in secrets, f"{env['name']}: no Secret {ref['name']}"
                    assert ref["key"] in secrets[ref["name"]], f"{env['name']}: Secret {ref['name']} has no {ref['key']}"

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
    claims = {t["metadata"]["name"] for t in sts["spec"].get("volumeClaimTemplates", [])}
    triton = pod_containers(sts)[0]
    mounts = {m["mountPath"]: m["name"] for m in triton["volumeMounts"]}
    env = {e["name"] for e in triton["env"]}
    if target in REPLICATED_TARGETS:  # the banks are in PostgreSQL: Triton keeps nothing of its own
        assert not claims and "/data" not in mounts and "AMSERVE_DATA_DIR" not in env
        assert "AMSERVE_STORE" in env
    else:  # SQLite on the PVC
        assert "data" in claims and mounts.get("/data") == "data" and "AMSERVE_STORE" not in env
        assert {"name": "AMSERVE_DATA_DIR", "value": "/data"} in triton["env"]
    for pdb in (d for d in docs if d["kind"] == "PodDisruptionBudget"):
        selected = [w for w in workloads(docs) if selects(pdb["spec"]["selector"], w["spec"]["template"]["metadata"]["labels"])]
        assert len(selected) == 1, f"PodDisruptionBudget {pdb['metadata']['name']} selects {len(selected)} workloads"

    for monitor in (d for d in docs if d["kind"] == "ServiceMonitor"):
        services = [s for s in docs if s["kind"] == "Service" and selects(monitor["spec"]["selector"], s["metadata"]["labels"])]
        assert len(services) == 1, f"ServiceMonitor {monitor['metadata']['name']} selects {len(services)} Services"
        for endpoint in monitor["spec"]["endpoints"]:
            assert endpoint["port"] in {p["name"] for p in services[0]["spec"]["ports"]}


@pytest.mark.parametrize("target", TARGETS)
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

    pdb = one(docs, "PodDisruptionBudget", "amserve-gateway")
    assert selects(pdb["spec"]["selector"], pod_labels)
    assert pdb["spec"]["minAvailable"] < hpa["spec"]["minReplicas"], "the PDB would block every drain"

    spec = gateway["spec"]["template"]["spec"]
    container = spec["containers"][0]
    sleep = int(container["lifecycle"]["preStop"]["exec"]["command"][-1])
    assert spec["terminationGracePeriodSeconds"] >= sleep + GATEWAY_DRAIN_SECONDS
    assert spec["securityContext"]["runAsNonRoot"] is True


@pytest.mark.parametrize("target", TARGETS)
def test_gateway_settings_and_triton_address(rendered, target):
    docs = rendered[target]
    config = one(docs, "ConfigMap", "amserve-gateway")["data"]
    known = {f"AMSERVE_{f.name.upper()}" for f in fields(Settings)}
    assert set(config) <= known, f"not amserve settings: {set(config) - known}"
    assert config["AMSERVE_BACKEND"] == "triton" and config["AMSERVE_HOST"] == "0.0.0.0"

    gateway = one(docs, "Deployment", "amserve-gateway")
    ports = container_ports(gateway)
    assert (int(config["AMSERVE_REST_PORT"]), int(config["AMSERVE_GRPC_PORT"])) == (ports["http"], ports["grpc"])

    # Every Triton pod by its headless-Service name, on Triton's gRPC port: pod 0 alone over SQLite
    # (its PVC holds the banks, which no second pod could share), each replica over PostgreSQL.
    sts = one(docs, "StatefulSet", "amserve-triton")
    triton = pod_containers(sts)[0]
    triton_ports = container_ports(sts)
    name, service, namespace = sts["metadata"]["name"], sts["spec"]["serviceName"], sts["metadata"]["namespace"]
    replicas = sts["spec"].get("replicas", 1)
    urls = config["AMSERVE_TRITON_URL"].split(",")
    if target in REPLICATED_TARGETS:
        assert urls == [f"{name}-{i}.{service}.{namespace}.svc:{triton_ports['grpc']}" for i in range(replicas)]
    else:
        assert replicas == 1 and urls == [f"{name}-0.{service}:{triton_ports['grpc']}"]
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
    # Only the gateway of the gpu overlays is on GPU-less nodes: nothing else asks for a GPU.
    for target in ("gpu", "gpu-postgresql"):
        assert json.dumps(rendered[target]).count("nvidia.com/gpu\":") == 2  # request and limit of Triton's pods
    assert "nvidia.com/gpu" not in json.dumps(rendered["cpu-postgresql"])


@pytest.mark.parametrize("target", REPLICATED)
def test_postgresql_keeps_its_overlays_hardware(rendered, target):
    """The components change the topology, not the sizing: Triton and the gateway run as in the
    overlay they are added to, but for the store and Triton's volume."""
    parent = rendered[REPLICATED[target]]
    for kind, name in (("StatefulSet", "amserve-triton"), ("Deployment", "amserve-gateway")):
        mine, theirs = one(rendered[target], kind, name), one(parent, kind, name)
        for a, b in zip(pod_containers(mine), pod_containers(theirs), strict=True):
            for key in ("image", "args", "command", "resources", "ports", "startupProbe", "livenessProbe", "readinessProbe"):
                assert a.get(key) == b.get(key), f"{target}: {name} {key} differs from {REPLICATED[target]}"
        for key in ("nodeSelector", "tolerations", "securityContext", "terminationGracePeriodSeconds"):
            assert mine["spec"]["template"]["spec"].get(key) == theirs["spec"]["template"]["spec"].get(key), key
    assert one(rendered[target], "Deployment")["spec"].get("replicas") == one(parent, "Deployment")["spec"].get("replicas")


@pytest.mark.parametrize("target", REPLICATED_TARGETS)
def test_replicated_topology(rendered, target):
    docs = rendered[target]
    sts = one(docs, "StatefulSet", "amserve-triton")
    pod_labels = sts["spec"]["template"]["metadata"]["labels"]
    replicas = sts["spec"]["replicas"]
    assert replicas >= 2, "reads must not depend on one Triton replica"

    # One Triton per node, and a drain takes at most all but one of them.
    terms = sts["spec"]["template"]["spec"]["affinity"]["podAntiAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"]
    assert any(t["topologyKey"] == "kubernetes.io/hostname" and selects(t["labelSelector"], pod_labels) for t in terms)
    pdbs = [d for d in docs if d["kind"] == "PodDisruptionBudget" and selects(d["spec"]["selector"], pod_labels)]
    assert len(pdbs) == 1, "one PodDisruptionBudget for the Triton pods"
    assert 1 <= pdbs[0]["spec"]["minAvailable"] < replicas, "the PDB would allow no Triton or block every drain"

    # The gateway names every replica (headless DNS, see test_gateway_settings_and_triton_address).
    config = one(docs, "ConfigMap", "amserve-gateway")["data"]
    service, namespace, grpc = sts["spec"]["serviceName"], sts["metadata"]["namespace"], container_ports(sts)["grpc"]
    urls = set(config["AMSERVE_TRITON_URL"].split(","))
    for ordinal in range(replicas):
        assert f"{sts['metadata']['name']}-{ordinal}.{service}.{namespace}.svc:{grpc}" in urls, f"replica {ordinal}"

    # Gateway and Triton open the same store, its DSN (a password inside) from a Secret, never a ConfigMap.
    gateway = pod_containers(one(docs, "Deployment", "amserve-gateway"))[0]
    triton = pod_containers(sts)[0]
    assert secret_env(gateway, "AMSERVE_STORE") == STORE_SECRET, "the gateway's AMSERVE_STORE"
    assert secret_env(triton, "AMSERVE_STORE") == STORE_SECRET, "Triton's AMSERVE_STORE"
    assert "AMSERVE_STORE" not in config

    clusters = [d for d in docs if d["kind"] == "Cluster"]
    if target == EXTERNAL:
        assert not clusters, "an external PostgreSQL needs no CloudNativePG Cluster"
        return
    cluster = one(docs, "Cluster")
    assert f"{cluster['metadata']['name']}-app" == STORE_SECRET[0], "AMSERVE_STORE is not the Cluster's app Secret"
    spec = cluster["spec"]
    assert spec["instances"] == 3
    sync = spec["postgresql"]["synchronous"]
    assert sync["method"] in ("any", "first") and 1 <= sync["number"] < spec["instances"]
    assert sync.get("dataDurability", "required") == "required", "commits acknowledged by the primary alone"
    assert spec["bootstrap"]["initdb"] == {"database": "amserve", "owner": "amserve"}
    assert spec["storage"]["size"]
    affinity = spec["affinity"]
    assert affinity.get("enablePodAntiAffinity", True) is True
    assert (affinity["topologyKey"], affinity["podAntiAffinityType"]) == ("kubernetes.io/hostname", "required")


def test_secret_placeholder_keeps_the_service_closed(rendered):
    from service.api.auth import parse_keys

    secret = one(rendered["base"], "Secret", "amserve-api-keys")
    table = parse_keys(secret["stringData"]["api-keys.json"], "secret")
    assert table, "an empty key list would run the service open"
