"""What the benchmarks share besides load generation: the generation prompts, a log line with the load
average, the gateway's batch sizes read from /metrics, and the results file."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

from tests.helpers import metric_value

# The text-generation benchmarks' prompts: one for a single stream, 16 different ones for concurrent streams.
SINGLE_PROMPT = "Write a short story about a lighthouse keeper who finds a message in a bottle."
QUESTIONS = [
    "What is the capital of France?",
    "Explain photosynthesis to a ten-year-old.",
    "Write a haiku about autumn leaves.",
    "How do vaccines train the immune system?",
    "Give me three tips for learning a new language quickly.",
    "Why is the sky blue?",
    "Summarise the plot of Romeo and Juliet in a few sentences.",
    "What are the main differences between Python lists and tuples, and when should I use each?",
    "Describe a sunrise over the mountains.",
    "How does a refrigerator keep food cold?",
    "Suggest a name for a bakery that specialises in sourdough bread and explain the choice.",
    "What is the Pythagorean theorem?",
    "List some healthy breakfast ideas.",
    "Write a limerick about a cat who loves to code late at night.",
    "How do airplanes stay in the air?",
    "Tell me a fun fact about octopuses.",
]


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')} load {os.getloadavg()[0]:.2f}] {message}", file=sys.stderr, flush=True)


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
