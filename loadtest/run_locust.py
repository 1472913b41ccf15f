"""Bounded Locust run against a local amserve, with pass/fail thresholds.

Starts `amserve serve --backend embedded|triton` as a child process on free loopback ports (or uses
`--url`/`--grpc-target` of a running gateway), runs Locust headless as a subprocess for `--run-time`,
writes `<results-dir>/<name>_stats.csv` (+ _failures, _exceptions, _stats_history) and `<name>.html`,
then reads the stats and exits 1 when the failure ratio, p95 or p99 of any request type (and of the
aggregate) exceed the thresholds. Also writes `<name>_summary.json` with the verdict.

    python loadtest/run_locust.py --backend embedded --users 8 --spawn-rate 4 --run-time 60s \
        --max-fail-ratio 0.01 --max-p95-ms 500 --max-p99-ms 2000

Exit codes: 0 within thresholds, 1 a threshold exceeded (or no request made), 2 Locust or the server
failed to run.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
LOCUSTFILE = Path(__file__).resolve().parent / "locustfile.py"
DEFAULT_RESULTS = Path(__file__).resolve().parent / "results" / "locust"


def parse_duration(text: str) -> float:
    """Locust's --run-time syntax (`30s`, `2m`, `1h30m`, or plain seconds) in seconds."""
    text = text.strip()
    if re.fullmatch(r"\d+(\.\d+)?", text):
        return float(text)
    parts = re.findall(r"(\d+)\s*([hms])", text)
    if not parts or "".join(n + u for n, u in parts) != re.sub(r"\s", "", text):
        raise argparse.ArgumentTypeError(f"bad duration {text!r} (e.g. 30s, 2m, 1h30m)")
    return float(sum(int(n) * {"h": 3600, "m": 60, "s": 1}[u] for n, u in parts))


@dataclass
class Row:
    """One line of Locust's _stats.csv."""

    type: str
    name: str
    requests: int
    failures: int
    p50_ms: float
    p95_ms: float
    p99_ms: float
    rps: float

    @property
    def fail_ratio(self) -> float:
        return self.failures / self.requests if self.requests else 0.0


def _number(value: str) -> float:
    return float(value) if value not in ("", "N/A") else math.nan


def read_stats(path: Path) -> list[Row]:
    """Rows of a Locust `_stats.csv`, the `Aggregated` line included (type "")."""
    with open(path, newline="") as f:
        return [Row(type=r["Type"], name=r["Name"], requests=int(r["Request Count"]),
                    failures=int(r["Failure Count"]), p50_ms=_number(r["50%"]), p95_ms=_number(r["95%"]),
                    p99_ms=_number(r["99%"]), rps=_number(r["Requests/s"]))
                for r in csv.DictReader(f)]


def check(rows: list[Row], *, max_fail_ratio: float, max_p95_ms: float | None,
          max_p99_ms: float | None) -> list[str]:
    """Threshold violations, one message each; empty when the run passes."""
    aggregated = [r for r in rows if r.name == "Aggregated"]
    if not aggregated or aggregated[0].requests == 0:
        return ["no request was made"]
    problems = []
    for r in rows:
        label = "Aggregated" if r.name == "Aggregated" else f"{r.type} {r.name}"
        if r.fail_ratio > max_fail_ratio:
            problems.append(f"{label}: failure ratio {r.fail_ratio:.4f} > {max_fail_ratio} "
                            f"({r.failures}/{r.requests})")
        if max_p95_ms is not None and r.p95_ms > max_p95_ms:
            problems.append(f"{label}: p95 {r.p95_ms:.0f} ms > {max_p95_ms:g} ms")
        if max_p99_ms is not None and r.p99_ms > max_p99_ms:
            problems.append(f"{label}: p99 {r.p99_ms:.0f} ms > {max_p99_ms:g} ms")
    return problems


def table(rows: list[Row]) -> str:
    lines = [f"{'type':<6} {'name':<42} {'reqs':>7} {'fails':>6} {'p50 ms':>8} {'p95 ms':>8} {'p99 ms':>8} {'req/s':>7}"]
    for r in rows:
        lines.append(f"{r.type:<6} {r.name[:42]:<42} {r.requests:>7} {r.failures:>6} {r.p50_ms:>8.0f} "
                     f"{r.p95_ms:>8.0f} {r.p99_ms:>8.0f} {r.rps:>7.1f}")
    return "\n".join(lines)


def locust_command(args: argparse.Namespace, url: str, grpc_target: str, prefix: Path) -> list[str]:
    cmd = [sys.executable, "-m", "locust", "-f", str(LOCUSTFILE), "--headless",
           "--users", str(args.users), "--spawn-rate", str(args.spawn_rate), "--run-time", args.run_time,
           "--stop-timeout", str(args.stop_timeout), "--host", url, "--grpc-target", grpc_target,
           "--csv", str(prefix), "--html", f"{prefix}.html", "--only-summary",
           "--loglevel", "WARNING", "--exit-code-on-error", "0",
           "--max-tokens", str(args.max_tokens), "--think-min-ms", str(args.think_min_ms),
           "--think-max-ms", str(args.think_max_ms), "--bank-prefix", args.bank_prefix]
    if args.cover_all:
        cmd.append("--cover-all")
    if args.tags:
        cmd += ["--tags", *args.tags]
    if args.exclude_tags:
        cmd += ["--exclude-tags", *args.exclude_tags]
    return cmd + list(args.user_classes)


def run(args: argparse.Namespace) -> int:
    results = Path(args.results_dir)
    results.mkdir(parents=True, exist_ok=True)
    prefix = results / args.name
    for old in results.glob(f"{args.name}_*.csv"):
        old.unlink()

    server = None
    scratch = Path(tempfile.mkdtemp(prefix="amserve-locust-"))
    try:
        if args.url:
            url, grpc_target = args.url.rstrip("/"), args.grpc_target
        else:
            sys.path.insert(0, str(ROOT))
            from tests.harness import ServerProcess

            server = ServerProcess(scratch / "data", backend=args.backend, extra_args=args.serve_arg)
            print(f"starting amserve serve --backend {args.backend} ...", flush=True)
            started = time.monotonic()
            try:
                server.start(timeout=args.server_timeout)
            except (RuntimeError, TimeoutError) as exc:
                print(f"server failed to start: {exc}", file=sys.stderr)
                return 2
            url, grpc_target = server.url, server.grpc_target
            print(f"server ready in {time.monotonic() - started:.1f}s: {url}, gRPC {grpc_target}", flush=True)

        cmd = locust_command(args, url, grpc_target, prefix)
        env = {**os.environ}
        if args.api_key:
            env["AMSERVE_API_KEY"] = args.api_key
        budget = parse_duration(args.run_time) + args.stop_timeout + 60
        print(f"locust: {args.users} users, spawn rate {args.spawn_rate}/s, run time {args.run_time}", flush=True)
        try:
            locust = subprocess.run(cmd, cwd=ROOT, env=env, timeout=budget, capture_output=True, text=True)
        except subprocess.TimeoutExpired:
            print(f"locust did not finish within {budget:.0f}s", file=sys.stderr)
            return 2
        (results / f"{args.name}_locust.log").write_text(locust.stdout + locust.stderr)
        stats_path = Path(f"{prefix}_stats.csv")
        if locust.returncode != 0 or not stats_path.exists():
            print(f"locust exited with {locust.returncode}:\n{(locust.stdout + locust.stderr)[-4000:]}",
                  file=sys.stderr)
            return 2
    finally:
        if server is not None:
            server.stop()
            if server.log_path.exists():
                shutil.copyfile(server.log_path, results / f"{args.name}_server.log")
        shutil.rmtree(scratch, ignore_errors=True)

    rows = read_stats(stats_path)
    problems = check(rows, max_fail_ratio=args.max_fail_ratio, max_p95_ms=args.max_p95_ms,
                     max_p99_ms=args.max_p99_ms)
    print(table(rows))
    summary = {
        "backend": None if args.url else args.backend, "url": url, "users": args.users,
        "spawn_rate": args.spawn_rate, "run_time": args.run_time,
        "thresholds": {"max_fail_ratio": args.max_fail_ratio, "max_p95_ms": args.max_p95_ms,
                       "max_p99_ms": args.max_p99_ms},
        "passed": not problems, "problems": problems,
        "rows": [{**asdict(r), "fail_ratio": r.fail_ratio} for r in rows],
    }
    (results / f"{args.name}_summary.json").write_text(json.dumps(summary, indent=2, default=str) + "\n")
    print(f"report: {prefix}.html, {stats_path}")
    if problems:
        print("FAILED thresholds:\n  " + "\n  ".join(problems), file=sys.stderr)
        return 1
    print("passed thresholds")
    return 0


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--backend", choices=["embedded", "triton"], default="embedded",
                   help="backend of the server this script starts (default embedded)")
    p.add_argument("--serve-arg", action="append", default=[], metavar="ARG",
                   help="extra argument for `amserve serve` (repeat: --serve-arg=--model --serve-arg=none)")
    p.add_argument("--url", help="use this running gateway (REST base URL) instead of starting one")
    p.add_argument("--grpc-target", default="127.0.0.1:8001", help="gRPC host:port with --url")
    p.add_argument("--api-key", default=os.environ.get("AMSERVE_API_KEY", ""), help="bearer key for the gateway")
    p.add_argument("--users", type=int, default=8, help="concurrent users (default 8)")
    p.add_argument("--spawn-rate", type=float, default=4, help="users started per second (default 4)")
    p.add_argument("--run-time", default="60s", help="Locust --run-time (default 60s)")
    p.add_argument("--stop-timeout", type=int, default=10, help="seconds users get to finish their task")
    p.add_argument("--max-fail-ratio", type=float, default=0.01, help="highest failures/requests (default 0.01)")
    p.add_argument("--max-p95-ms", type=float, default=None, help="highest p95 latency of any request type")
    p.add_argument("--max-p99-ms", type=float, default=None, help="highest p99 latency of any request type")
    p.add_argument("--max-tokens", type=int, default=8, help="tokens per generation request (default 8)")
    p.add_argument("--think-min-ms", type=float, default=50.0)
    p.add_argument("--think-max-ms", type=float, default=500.0)
    p.add_argument("--bank-prefix", default="lt")
    p.add_argument("--cover-all", action="store_true",
                   help="every user runs each request type once at start (short smoke runs see them all)")
    p.add_argument("--tags", nargs="*", help="only these task tags (memory, image, generate)")
    p.add_argument("--exclude-tags", nargs="*", help="leave out these task tags")
    p.add_argument("--user-classes", nargs="*", default=[], help="RestUser and/or GrpcUser (default both)")
    p.add_argument("--results-dir", default=str(DEFAULT_RESULTS), help=f"default {DEFAULT_RESULTS}")
    p.add_argument("--name", default=None, help="file name prefix of the reports (default locust_<backend>)")
    p.add_argument("--server-timeout", type=float, default=300.0, help="seconds to wait for the server to be ready")
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    parse_duration(args.run_time)
    args.name = args.name or f"locust_{'remote' if args.url else args.backend}"
    return run(args)


if __name__ == "__main__":
    sys.exit(main())
