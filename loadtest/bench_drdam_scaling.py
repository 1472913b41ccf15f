"""DrDAM vs exact memory as the number of stored patterns grows (1k → 1M): retrieve latency of one
query (batch 1) and serving memory (engine.nbytes), the engines called in-process.
Writes loadtest/results/drdam_scaling.json.

    python loadtest/bench_drdam_scaling.py [--counts 1000,10000,100000,1000000] [--dim 64] [--features 4096]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from loadtest.common import write_results  # noqa: E402
from service.engines.memory import make_engine, normalize_params  # noqa: E402


def latency_ms(engine, query: torch.Tensor, steps: int, repeats: int) -> float:
    engine.run(query, steps=steps)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        engine.run(query, steps=steps)
        times.append(time.perf_counter() - start)
    return 1e3 * statistics.median(times)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--counts", default="1000,10000,100000,1000000")
    parser.add_argument("--dim", type=int, default=64)
    parser.add_argument("--features", type=int, default=4096)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--out", type=Path, default=ROOT / "loadtest/results/drdam_scaling.json")
    args = parser.parse_args()
    generator = torch.Generator().manual_seed(0)
    rows = []
    for count in [int(c) for c in args.counts.split(",")]:
        patterns = torch.randn(count, args.dim, generator=generator)
        patterns /= patterns.norm(dim=1, keepdim=True)
        query = (patterns[:1] + 0.1 * torch.randn(1, args.dim, generator=generator))
        row = {"patterns": count}
        for kind, params in (("rbf", {"beta": 4.0}),
                             ("drdam", {"beta": 4.0, "features": args.features, "seed": 1, "keep_patterns": False})):
            engine = make_engine(kind, args.dim, normalize_params(kind, args.dim, params))
            for start in range(0, count, 100_000):
                engine.add(patterns[start:start + 100_000])
            row[kind] = {"latency_ms": latency_ms(engine, query, args.steps, args.repeats), "bytes": engine.nbytes()}
            del engine
        rows.append(row)
        print(f"K={count:8}  rbf {row['rbf']['latency_ms']:8.2f} ms {row['rbf']['bytes'] / 2**20:8.1f} MiB   "
              f"drdam {row['drdam']['latency_ms']:8.2f} ms {row['drdam']['bytes'] / 2**20:8.1f} MiB", flush=True)
    result = {"dim": args.dim, "features": args.features, "steps": args.steps, "rows": rows,
              "load_average": os.getloadavg(), "torch_threads": torch.get_num_threads()}
    write_results(args.out, result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
