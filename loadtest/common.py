"""What the benchmarks share besides load generation: the gateway's batch sizes read from /metrics,
and the results file."""

from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path

from tests.helpers import metric_value


def batch_rows(metrics_text: str, model: str) -> tuple[float, float]:
    """(sum, count) of amserve_batch_rows for `model`: rows per engine call, summed, and the calls;
    (0, 0) before the first call."""
    return tuple(metric_value(metrics_text, f"amserve_batch_rows_{series}", model=model) or 0.0
                 for series in ("sum", "count"))


def write_results(path: Path, results: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(results, indent=2))
    print(f"wrote {path}", flush=True)


# ----- wrk: a compiled load generator, so that the client does not measure itself -------------------

WRK_SCRIPT = """wrk.method = "POST"
wrk.headers["Content-Type"] = "application/json"
wrk.body = '{body}'
"""


def wrk(url: str, connections: int, seconds: float, script: Path) -> subprocess.Popen:
    return subprocess.Popen(["wrk", "-t1", f"-c{connections}", f"-d{round(seconds)}s", "--latency", "-s", str(script), url],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def wrk_result(process: subprocess.Popen) -> dict:
    out, _ = process.communicate(timeout=120)
    found = re.search(r"Requests/sec:\s+([\d.]+)", out)
    if found is None:
        raise RuntimeError(f"wrk failed:\n{out}")
    rps = float(found.group(1))
    p50 = re.search(r"50%\s+([\d.]+)(us|ms|s)", out)
    scale = {"us": 1e-3, "ms": 1.0, "s": 1e3}
    errors = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    return {"rps": rps, "p50_ms": float(p50.group(1)) * scale[p50.group(2)] if p50 else None,
            "non_2xx": int(errors.group(1)) if errors else 0}
