"""Schemathesis against the service's own OpenAPI spec (bounded): no input may cause a server error."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

from tests.harness import ServerProcess

LIMITS = ["--max-new-tokens", "8", "--max-context", "256", "--max-vectors-per-request", "64",
          "--max-running-sequences", "4", "--max-body-bytes", "1000000"]


@pytest.fixture(scope="module")
def fuzzed_server(tmp_path_factory):
    with ServerProcess(tmp_path_factory.mktemp("fuzz"), extra_args=LIMITS) as proc:
        # Banks the generated requests can hit, so bank operations get past 404.
        for name, kind in (("fuzz", "modern"), ("0", "classical")):
            httpx.put(f"{proc.url}/v1/banks/{name}", json={"kind": kind, "dim": 4}).raise_for_status()
        yield proc


def test_no_generated_request_causes_a_server_error(fuzzed_server, tmp_path):
    cli = Path(sys.executable).with_name("schemathesis")
    result = subprocess.run(
        [str(cli), "run", f"{fuzzed_server.url}/openapi.json", "--checks", "not_a_server_error",
         "--max-examples", "30", "--seed", "7", "--request-timeout", "60",
         "--phases", "examples,coverage,fuzzing"],
        capture_output=True, text=True, timeout=600, cwd=tmp_path)
    summary = result.stdout[-4000:]
    assert result.returncode == 0, summary
    generated = re.search(r"(\d+) generated", summary)
    assert generated and int(generated.group(1)) >= 200, summary  # the run really exercised the API
    assert httpx.get(f"{fuzzed_server.url}/healthz/ready").status_code == 200
