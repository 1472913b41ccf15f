"""The layout's promises, read from the source: the engines are model math only, and imports point down
(api → backends → banks/serving → engines)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

SERVICE = Path(__file__).resolve().parents[2] / "service"
# What model math must not touch: storage, threads, event loops, the web, the wire.
NOT_IN_ENGINES = {"sqlite3", "threading", "asyncio", "concurrent", "queue", "grpc", "fastapi", "starlette",
                  "uvicorn", "tritonclient", "httpx", "psycopg"}
# Each layer and the packages of the service it must not import.
BELOW = {
    "engines": {"api", "backends", "banks", "serving", "triton", "server", "cli"},
    "banks": {"api", "backends", "triton", "server", "cli"},
    "serving": {"api", "backends", "banks", "triton", "server", "cli"},
    "backends": {"api", "server", "cli"},
}


def imported_modules(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module)
    return names


def sources(package: str) -> list[Path]:
    found = sorted((SERVICE / package).rglob("*.py"))
    assert found, f"no sources under service/{package}"
    return found


@pytest.mark.parametrize("path", sources("engines"), ids=lambda p: str(p.relative_to(SERVICE)))
def test_engines_import_no_io_threads_or_web(path):
    tops = {name.split(".")[0] for name in imported_modules(path)}
    assert not tops & NOT_IN_ENGINES, f"{path.name} imports {sorted(tops & NOT_IN_ENGINES)}"


@pytest.mark.parametrize("layer", sorted(BELOW))
def test_imports_point_down(layer):
    upward = {(path.name, name) for path in sources(layer) for name in imported_modules(path)
              if name.startswith("service.") and name.split(".")[1] in BELOW[layer]}
    assert not upward, f"service/{layer} imports from above it: {sorted(upward)}"
