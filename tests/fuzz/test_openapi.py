"""Schemathesis against the service's own OpenAPI document, bounded (fixed seed, tests/fuzz/schemathesis.toml):
every check but positive_data_acceptance, in every phase, the stateful one following the document's links."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

from service.api.auth import create_key
from tests.harness import ServerProcess
from tests.helpers import metric_value

CONFIG = Path(__file__).with_name("schemathesis.toml")
LIMITS = ["--max-new-tokens", "8", "--max-context", "256", "--max-vectors-per-request", "64",
          "--max-running-sequences", "4", "--max-body-bytes", "1000000", "--max-dim", "64"]


@pytest.fixture(scope="module")
def fuzzed_server(tmp_path_factory):
    """A service with an API key, so that schemathesis' ignored_auth check sees 401 for a missing or wrong one."""
    root = tmp_path_factory.mktemp("fuzz")
    key = create_key(root / "keys.json", "fuzzer")
    with ServerProcess(root / "data", extra_args=[*LIMITS, "--api-keys-file", str(root / "keys.json")]) as proc:
        # Banks the generated requests can hit, so bank operations get past 404.
        for name, kind in (("fuzz", "modern"), ("0", "classical")):
            httpx.put(f"{proc.url}/v1/banks/{name}", json={"kind": kind, "dim": 4},
                      headers={"Authorization": f"Bearer {key}"}).raise_for_status()
        yield proc, key


def test_the_service_answers_as_its_openapi_document_says(fuzzed_server, tmp_path):
    server, key = fuzzed_server
    cli = Path(sys.executable).with_name("schemathesis")
    result = subprocess.run([str(cli), "--config-file", str(CONFIG), "run", "--no-color",
                             "--header", f"Authorization: Bearer {key}", f"{server.url}/openapi.json"],
                            check=False, capture_output=True, text=True, timeout=900, cwd=tmp_path)
    summary = result.stdout[-4000:]
    assert result.returncode == 0, result.stdout[-20000:]
    for phase in ("Coverage", "Fuzzing", "Stateful"):
        assert re.search(rf"✅ {phase}", summary), summary
    generated = re.search(r"(\d+) generated", summary)
    assert generated and int(generated.group(1)) >= 2000, summary  # the run really exercised the API
    # The stateful phase followed the links: banks it created answered their bank's operations.
    metrics = httpx.get(f"{server.url}/metrics").text
    created = metric_value(metrics, "amserve_requests_total", route="/v1/banks/{bank}", status="201")
    assert created and created > 2, summary  # more than the fixture's two
    assert metric_value(metrics, "amserve_requests_total", route="/v1/banks/{bank}", status="204"), summary
    assert metric_value(metrics, "amserve_requests_total", route="/v1/banks", status="401"), summary  # ignored_auth
    assert httpx.get(f"{server.url}/healthz/ready").status_code == 200
