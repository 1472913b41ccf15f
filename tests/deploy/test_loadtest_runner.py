"""loadtest/run_locust.py's verdict: reading Locust's stats CSV and applying the thresholds."""

from __future__ import annotations

import importlib.util
import math
import sys

import pytest

from tests.harness import ROOT

spec = importlib.util.spec_from_file_location("loadtest_run_locust", ROOT / "loadtest" / "run_locust.py")
run_locust = importlib.util.module_from_spec(spec)
sys.modules[spec.name] = run_locust  # dataclasses look their module up there
spec.loader.exec_module(run_locust)  # the runner never imports locust: it starts it as a subprocess

HEADER = ("Type,Name,Request Count,Failure Count,Median Response Time,Average Response Time,Min Response Time,"
          "Max Response Time,Average Content Size,Requests/s,Failures/s,50%,66%,75%,80%,90%,95%,98%,99%,99.9%,"
          "99.99%,100%")


def stats_csv(tmp_path, *rows: tuple[str, str, int, int, float, float]) -> list:
    """rows: (type, name, requests, failures, p95, p99) → parsed rows of a Locust-shaped CSV."""
    lines = [HEADER]
    for type_, name, requests, failures, p95, p99 in rows:
        lines.append(f"{type_},{name},{requests},{failures},5,6,1,{p99},100,2.5,0,5,6,7,8,9,{p95},{p99},{p99},"
                     f"{p99},{p99},{p99}")
    path = tmp_path / "x_stats.csv"
    path.write_text("\n".join(lines) + "\n")
    return run_locust.read_stats(path)


def test_reads_locust_columns(tmp_path):
    rows = stats_csv(tmp_path, ("POST", "/v1/generate", 10, 1, 120, 300), ("", "Aggregated", 10, 1, 120, 300))
    assert rows[0].type == "POST" and rows[0].name == "/v1/generate"
    assert (rows[0].requests, rows[0].failures, rows[0].p95_ms, rows[0].p99_ms) == (10, 1, 120, 300)
    assert rows[0].fail_ratio == pytest.approx(0.1)
    assert rows[1].name == "Aggregated"


def test_passes_within_thresholds(tmp_path):
    rows = stats_csv(tmp_path, ("grpc", "Retrieve", 100, 0, 40, 90), ("", "Aggregated", 100, 0, 40, 90))
    assert run_locust.check(rows, max_fail_ratio=0.0, max_p95_ms=50, max_p99_ms=100) == []


@pytest.mark.parametrize(("limits", "expected"), [
    ({"max_fail_ratio": 0.01, "max_p95_ms": None, "max_p99_ms": None}, "failure ratio"),
    ({"max_fail_ratio": 1.0, "max_p95_ms": 100, "max_p99_ms": None}, "p95"),
    ({"max_fail_ratio": 1.0, "max_p95_ms": None, "max_p99_ms": 200}, "p99"),
])
def test_each_threshold_fails_the_run(tmp_path, limits, expected):
    rows = stats_csv(tmp_path, ("POST", "/v1/complete", 50, 5, 150, 400), ("grpc", "Retrieve", 100, 0, 10, 20),
                     ("", "Aggregated", 150, 5, 140, 390))
    problems = run_locust.check(rows, **limits)
    assert problems and all(expected in p for p in problems)
    assert any("/v1/complete" in p for p in problems)
    assert not any("Retrieve" in p for p in problems)


def test_a_run_without_requests_fails(tmp_path):
    rows = stats_csv(tmp_path, ("", "Aggregated", 0, 0, 0, 0))
    assert run_locust.check(rows, max_fail_ratio=1.0, max_p95_ms=None, max_p99_ms=None) == ["no request was made"]


@pytest.mark.parametrize(("text", "seconds"), [("30", 30), ("45s", 45), ("2m", 120), ("1h30m", 5400), ("1m 5s", 65)])
def test_durations(text, seconds):
    assert run_locust.parse_duration(text) == seconds


@pytest.mark.parametrize("text", ["", "5x", "m", "1.5m"])
def test_bad_durations(text):
    with pytest.raises(Exception):
        run_locust.parse_duration(text)


def test_locust_command_is_bounded_and_writes_reports(tmp_path):
    args = run_locust.parser().parse_args(["--users", "3", "--spawn-rate", "2", "--run-time", "20s",
                                           "--exclude-tags", "generate", "--cover-all"])
    cmd = run_locust.locust_command(args, "http://127.0.0.1:1", "127.0.0.1:2", tmp_path / "r")
    joined = " ".join(cmd)
    assert "--headless" in cmd and "--run-time 20s" in joined and "--users 3" in joined
    assert f"--csv {tmp_path / 'r'}" in joined and f"--html {tmp_path / 'r'}.html" in joined
    assert "--host http://127.0.0.1:1" in joined and "--grpc-target 127.0.0.1:2" in joined
    assert "--exclude-tags generate" in joined and "--cover-all" in cmd
    assert not math.isnan(run_locust.parse_duration(args.run_time))
