"""CI smoke of the load test: loadtest/run_locust.py starts a real server, Locust drives every request
type over REST and gRPC for a few seconds, and the stats CSV must show each of them with no failure.

Locust runs in its own process (it monkey-patches with gevent); this module never imports it.
"""

from __future__ import annotations

import csv
import importlib.util
import json
import subprocess
import sys

import pytest

from tests.harness import ROOT

pytestmark = pytest.mark.slow

# (Type, Name) rows that loadtest/locustfile.py reports, one per request type.
EXPECTED = {
    ("PUT", "/v1/banks/{bank}"),
    ("POST", "/v1/banks/{bank}/store"),
    ("POST", "/v1/banks/{bank}/retrieve"),
    ("POST", "/v1/banks/{bank}/complete"),
    ("POST", "/v1/complete"),
    ("POST", "/v1/generate"),
    ("POST", "/v1/generate (stream)"),
    ("SSE", "/v1/generate (stream) first token"),
    ("grpc", "CreateBank"),
    ("grpc", "Store"),
    ("grpc", "Retrieve"),
    ("grpc", "Complete"),
    ("grpc", "CompleteImage"),
    ("grpc", "Generate"),
}


@pytest.mark.skipif(importlib.util.find_spec("locust") is None, reason="locust is not installed")
def test_locust_smoke_covers_every_request_type_without_failures(tmp_path):
    cmd = [sys.executable, str(ROOT / "loadtest" / "run_locust.py"), "--backend", "embedded",
           "--users", "4", "--spawn-rate", "4", "--run-time", "15s", "--stop-timeout", "15", "--cover-all",
           "--think-min-ms", "20", "--think-max-ms", "200", "--max-tokens", "4",
           "--max-fail-ratio", "0", "--max-p95-ms", "20000", "--max-p99-ms", "30000",
           "--results-dir", str(tmp_path), "--name", "smoke", "--server-timeout", "120"]
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=240)
    logs = done.stdout + done.stderr
    for extra in ("smoke_failures.csv", "smoke_server.log"):
        if (tmp_path / extra).exists():
            logs += f"\n--- {extra}\n" + (tmp_path / extra).read_text()[-3000:]
    assert done.returncode == 0, logs[-8000:]

    with open(tmp_path / "smoke_stats.csv", newline="") as f:
        rows = {(r["Type"], r["Name"]): r for r in csv.DictReader(f)}
    missing = EXPECTED - rows.keys()
    assert not missing, f"no stats for {sorted(missing)}:\n{logs[-4000:]}"
    for key in EXPECTED:
        assert int(rows[key]["Request Count"]) >= 1, key
        assert int(rows[key]["Failure Count"]) == 0, (key, (tmp_path / "smoke_failures.csv").read_text())
    aggregated = rows[("", "Aggregated")]
    assert int(aggregated["Failure Count"]) == 0
    assert int(aggregated["Request Count"]) >= len(EXPECTED)
    # Retrieves dominate the mix (weight 10 of 19 per user).
    retrieves = int(rows[("POST", "/v1/banks/{bank}/retrieve")]["Request Count"])
    generations = int(rows[("POST", "/v1/generate")]["Request Count"])
    assert retrieves > generations

    summary = json.loads((tmp_path / "smoke_summary.json").read_text())
    assert summary["passed"] and summary["problems"] == []
    assert (tmp_path / "smoke.html").stat().st_size > 1000
