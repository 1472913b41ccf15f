"""What the benchmarks share besides load generation: the gateway's batch sizes read from /metrics,
and the results file."""

from __future__ import annotations

import json
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
