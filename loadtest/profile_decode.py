"""Where a decode step's time goes: torch.profiler over decode steps of the default model.

For each --dtypes entry and batch size (1 and 16 sequences, ~100 positions of context each): the
median wall time of a step without the profiler, then one profiled run of --steps steps, its CPU
time split into the weight matrix products (the oneDNN / int8 / int4 kernels: the part that reads
the weights), the attention products and softmax, and everything else (norms, RoPE, casts, cache
writes, views: per-op dispatch on tensors of a few hundred values), with the top operators. The
profiler adds ~1 us per op, so its totals exceed the plain step time.

Results: loadtest/results/decode_profile.json.

    python loadtest/profile_decode.py [--dtypes fp32,int8,int4] [--threads 2] [--steps 10]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from service.cli import set_openmp_wait  # noqa: E402 - imports no torch

set_openmp_wait()  # as `amserve` does, before torch loads

import torch
from torch.profiler import ProfilerActivity, profile


from service.engines.lm import default_gguf_path, load_model

WEIGHT_KERNELS = ("mkldnn::_linear_pointwise", "aten::_weight_int8pack_mm", "aten::_weight_int4pack_mm_for_cpu",
                  "aten::addmm", "aten::mm")
ATTENTION = ("aten::bmm", "aten::_softmax", "aten::baddbmm")
PROMPT = "Write a short story about a lighthouse keeper who finds a message in a bottle. " * 3


def profile_dtype(dtype: str, steps: int) -> dict:
    model, tokenizer = load_model(default_gguf_path(), dtype=dtype)
    model.setup_cache(16, 1024)
    prompt = torch.tensor(tokenizer.encode(PROMPT))
    out = {}
    for batch in (1, 16):
        slots = list(range(batch))
        model.prefill_many([prompt] * batch, slots)
        position = [len(prompt)]
        token = torch.full((batch,), 5)

        def step(token=token, slots=slots, position=position, batch=batch) -> None:
            model.decode(token, slots, [position[0]] * batch)
            position[0] += 1

        for _ in range(3):
            step()
        times = []
        for _ in range(20):
            start = time.perf_counter()
            step()
            times.append(time.perf_counter() - start)
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            for _ in range(steps):
                step()
        events = prof.key_averages()
        total = sum(e.self_cpu_time_total for e in events) / steps / 1e3  # ms per step
        share = {
            "weight_products_ms": sum(e.self_cpu_time_total for e in events if e.key in WEIGHT_KERNELS) / steps / 1e3,
            "attention_ms": sum(e.self_cpu_time_total for e in events if e.key in ATTENTION) / steps / 1e3,
        }
        share["other_ms"] = total - share["weight_products_ms"] - share["attention_ms"]
        top = sorted(events, key=lambda e: e.self_cpu_time_total, reverse=True)[:12]
        out[f"batch{batch}"] = {
            "step_ms_median_unprofiled": 1e3 * statistics.median(times),
            "profiled_step_ms": total, **share,
            "ops_per_step": sum(e.count for e in events) / steps,
            "top_ops": [{"op": e.key, "ms_per_step": e.self_cpu_time_total / steps / 1e3,
                         "calls_per_step": e.count / steps} for e in top],
        }
        print(f"{dtype} batch {batch}: step {out[f'batch{batch}']['step_ms_median_unprofiled']:.1f} ms; profiled "
              f"{total:.1f} ms = weight products {share['weight_products_ms']:.1f} + attention "
              f"{share['attention_ms']:.1f} + other {share['other_ms']:.1f} "
              f"({out[f'batch{batch}']['ops_per_step']:.0f} ops)", flush=True)
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dtypes", default="fp32,int8,int4")
    parser.add_argument("--threads", type=int, default=min(2, os.cpu_count() or 1))
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--out", type=Path, default=ROOT / "loadtest/results/decode_profile.json")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    load = [os.getloadavg()]
    results = {"what": "one decode step of the default model, per dtype and batch size, under torch.profiler",
               "threads": args.threads, "torch": torch.__version__, "dtypes": {}}
    for dtype in args.dtypes.split(","):
        results["dtypes"][dtype] = profile_dtype(dtype, args.steps)
        load.append(os.getloadavg())
    results["load_average"] = {"samples": load, "median_1min": statistics.median(x[0] for x in load)}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2))
    print(f"load average (1 min) median {results['load_average']['median_1min']:.2f}; wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
