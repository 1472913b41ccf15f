"""Rendering of deploy/k8s kustomizations for the manifest tests.

`render()` uses `kubectl kustomize` or `kustomize build` when either is on PATH. Without them it falls
back to `render_lite()`, a small renderer of the subset of kustomize that deploy/k8s uses: `resources`
(files and directories), `namespace`, `images` (newName/newTag), and `patches` given by `path` with a
`target` — strategic-merge patches (lists of named items merged by `name`, other lists replaced) and
JSON 6902 patches (add / replace / remove). Anything else in a kustomization is an error, so the
fallback never silently renders something different from kustomize.
"""

from __future__ import annotations

import copy
import shutil
import subprocess
from pathlib import Path

import yaml

SUPPORTED_KEYS = {"apiVersion", "kind", "resources", "namespace", "images", "patches"}
CLUSTER_SCOPED = {"Namespace", "ClusterRole", "ClusterRoleBinding", "CustomResourceDefinition", "PriorityClass",
                  "StorageClass", "PersistentVolume", "RuntimeClass"}


def load_docs(path: Path) -> list[dict]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d]


def kustomize_tool() -> list[str] | None:
    if shutil.which("kubectl"):
        return ["kubectl", "kustomize"]
    if shutil.which("kustomize"):
        return ["kustomize", "build"]
    return None


def render(directory: Path) -> list[dict]:
    tool = kustomize_tool()
    if tool is None:
        return render_lite(directory)
    done = subprocess.run([*tool, str(directory)], capture_output=True, text=True, timeout=60)
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(tool)} {directory} failed:\n{done.stderr}")
    return [d for d in yaml.safe_load_all(done.stdout) if d]


def kustomization(directory: Path) -> dict:
    return yaml.safe_load((directory / "kustomization.yaml").read_text())


def matches(resource: dict, target: dict) -> bool:
    group, _, version = resource["apiVersion"].rpartition("/")
    return ((target.get("kind") in (None, resource["kind"]))
            and (target.get("name") in (None, resource["metadata"]["name"]))
            and (target.get("group") in (None, group))
            and (target.get("version") in (None, version)))


def strategic_merge(base, patch):
    if isinstance(base, dict) and isinstance(patch, dict):
        out = dict(base)
        for key, value in patch.items():
            if value is None:
                out.pop(key, None)
            elif key in out:
                out[key] = strategic_merge(out[key], value)
            else:
                out[key] = copy.deepcopy(value)
        return out
    if (isinstance(base, list) and isinstance(patch, list) and patch
            and all(isinstance(x, dict) and "name" in x for x in base + patch)):
        out = [copy.deepcopy(x) for x in base]
        index = {x["name"]: i for i, x in enumerate(out)}
        # kustomize puts items the patch adds first, in the patch's order, then the merged originals.
        added = []
        for item in patch:
            if item["name"] in index:
                out[index[item["name"]]] = strategic_merge(out[index[item["name"]]], item)
            else:
                added.append(copy.deepcopy(item))
        return added + out
    return copy.deepcopy(patch)


def _pointer(path: str) -> list:
    parts = [p.replace("~1", "/").replace("~0", "~") for p in path.lstrip("/").split("/")]
    return [int(p) if p.isdigit() else p for p in parts]


def json6902(resource: dict, operations: list[dict]) -> dict:
    out = copy.deepcopy(resource)
    for op in operations:
        *parents, last = _pointer(op["path"])
        node = out
        for key in parents:
            node = node[key]
        if op["op"] == "add":
            if isinstance(node, list):
                node.append(op["value"]) if last == "-" else node.insert(last, op["value"])
            else:
                node[last] = op["value"]
        elif op["op"] == "replace":
            node[last]  # must exist
            node[last] = op["value"]
        elif op["op"] == "remove":
            del node[last]
        else:
            raise ValueError(f"unsupported JSON 6902 op {op['op']!r}")
    return out


def render_lite(directory: Path) -> list[dict]:
    k = kustomization(directory)
    unsupported = set(k) - SUPPORTED_KEYS
    if unsupported:
        raise ValueError(f"{directory}: kustomize fields {sorted(unsupported)} are beyond the fallback renderer")
    resources: list[dict] = []
    for entry in k.get("resources", []):
        path = directory / entry
        resources += render_lite(path) if path.is_dir() else load_docs(path)
    for patch in k.get("patches", []):
        body = yaml.safe_load((directory / patch["path"]).read_text())
        targets = [r for r in resources if matches(r, patch["target"])]
        if not targets:
            raise ValueError(f"{directory}: patch {patch['path']} matches no resource")
        for r in targets:
            i = resources.index(r)
            resources[i] = json6902(r, body) if isinstance(body, list) else strategic_merge(r, body)
    if "namespace" in k:
        for r in resources:
            if r["kind"] not in CLUSTER_SCOPED:
                r.setdefault("metadata", {})["namespace"] = k["namespace"]
    for image in k.get("images", []):
        for r in resources:
            for c in pod_containers(r):
                name, _, tag = c["image"].partition(":")
                if name == image["name"]:
                    c["image"] = f"{image.get('newName', name)}:{image.get('newTag', tag or 'latest')}"
    return resources


def pod_containers(resource: dict) -> list[dict]:
    spec = resource.get("spec", {}).get("template", {}).get("spec", {})
    return spec.get("containers", []) + spec.get("initContainers", [])
