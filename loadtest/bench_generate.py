"""Text generation speed of our decoder-LM engine against HF transformers and this machine's limits.

Everything runs in one process on the same weights: the default model (SmolLM2-135M-Instruct GGUF,
converted once to an HF directory), fp32, greedy decoding, every stream producing exactly
--tokens new tokens (ours ignore end-of-sequence, HF gets min_new_tokens = max_new_tokens).

  (a) one stream: our model driven directly (prefill + decode loop), the same with dense weights
      (PyTorch's default F.linear, no oneDNN packing), ours through the Scheduler, and HF
      `LlamaForCausalLM.generate` at batch 1. Decode tokens/s exclude the prefill (reported apart);
      the headline rate is that of the median step over all steps (a shared machine preempts a few
      steps, which would move a mean), the run's mean rate is reported beside it.
  (b) --streams requests with different prompts arriving every --interval-ms through our Scheduler
      (continuous batching): aggregate generated tokens/s, first submit to last token, and
      time-to-first-token p50/p99; against HF `generate` on a static batch of the same prompts
      (left padding + attention mask).
  (c) the machine's limits, measured in between: memory bandwidth (copy into a preallocated
      buffer, clone, read) -> batch-1 ceiling = bandwidth / weight bytes; GEMM rate over the
      model's own weight matrices with 1 and --streams rows (MKL through F.linear, and oneDNN
      prepacked as our model runs them) and on large squares -> ceilings = rows / GEMM-only step
      time (the best of the two libraries), and peak / (2 x params).

Repeats are interleaved (order reversed every other repeat); figures are medians; load average
and torch threads are recorded. Results go to loadtest/results/generate.json. About 2 minutes per
repeat and thread count on 2 cores.

    python loadtest/bench_generate.py [--tokens 128] [--streams 16] [--repeats 2] [--threads 1,2]
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import os
import platform
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from loadtest.common import QUESTIONS, SINGLE_PROMPT, log, write_results  # noqa: E402
from service.engines.lm import SamplingParams, Transformer, convert_gguf, default_gguf_path, load_model  # noqa: E402
from service.serving.scheduler import FinishEvent, GenerationRequest, Scheduler, TokenEvent  # noqa: E402
from service.engines.lm.model import Linear  # noqa: E402

TARGETS = {"single_stream_ours_over_hf": 2.5, "concurrent_ours_over_hf_static": 1.5,
           "concurrent_ours_over_gemm_roofline": 0.5}


def median(values: list[float]) -> float:
    return statistics.median(values)


def percentile(values: list[float], q: float) -> float:
    """Linear interpolation between closest ranks (numpy's default)."""
    ordered = sorted(values)
    k = (len(ordered) - 1) * q / 100
    low = int(k)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (k - low)


def intervals(times: list[float]) -> list[float]:
    return [b - a for a, b in zip(times, times[1:])]


def timed(fn: Callable[[], object]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def matches_until_eos(ours: list[int], hf: list[int], eos: int | None) -> bool:
    """Ours run on past end-of-sequence; HF, under min_new_tokens, picks the runner-up there.
    So the two agree up to our first end-of-sequence token."""
    prefix = ours[:ours.index(eos)] if eos in ours else ours
    return hf[:len(prefix)] == prefix


# --- the model -------------------------------------------------------------------------------


def model_directory(given: Path | None) -> Path:
    """An HF directory of the default model: the given one, the exported repository's, or a
    conversion of the packaged GGUF cached in the temp dir."""
    if given is not None:
        return given
    exported = ROOT / "model_repository/llm/1"
    if (exported / "config.json").is_file() and (exported / "model.safetensors").is_file():
        return exported
    cache = Path(tempfile.gettempdir()) / "amserve-bench" / "smollm2-135m-instruct"
    if not (cache / "config.json").is_file():
        log(f"converting {default_gguf_path().name} into {cache}")
        partial = Path(tempfile.mkdtemp(dir=cache.parent if cache.parent.exists() else None))
        convert_gguf(default_gguf_path(), partial, progress=False)
        cache.parent.mkdir(parents=True, exist_ok=True)
        partial.rename(cache)
    return cache


# --- (c) machine limits ------------------------------------------------------------------------


def measure_bandwidth(megabytes: int = 512, runs: int = 5) -> dict[str, list[float]]:
    """GB/s: copy_ into a preallocated buffer (read + write bytes), clone (also pays first-touch
    page faults of the new buffer), and a read-only pass (sum)."""
    n = megabytes * 2**20 // 4
    src, dst = torch.ones(n), torch.zeros(n)
    size = n * 4
    copy_rate = [2 * size / timed(lambda: dst.copy_(src)) / 1e9 for _ in range(runs)]
    clone_rate = [2 * size / timed(lambda: src.clone()) / 1e9 for _ in range(max(2, runs // 2))]
    read_rate = [size / timed(src.sum) / 1e9 for _ in range(runs)]
    return {"copy_GBps": copy_rate, "clone_GBps": clone_rate, "read_GBps": read_rate}


def measure_gemm(model: Transformer, rows: list[int], square: int = 2048, runs: int = 5) -> dict[str, float]:
    """A pass over every weight matrix of the model (cold in cache, as in a decode step) with each
    number of input rows, median of `runs`: seconds and GFLOP/s with dense F.linear (MKL) and with
    our packed path (oneDNN); and GFLOP/s of a large square product both ways."""
    linears = [m for m in model.modules() if isinstance(m, Linear)]
    macs = sum(m.in_features * m.out_features for m in linears)
    a, b = torch.randn(square, square), Linear(square, square, bias=False)
    b.pack()
    out = {}
    with torch.inference_mode():
        for n in rows:
            inputs = {m.in_features: torch.randn(n, m.in_features) for m in linears}
            dense = median([timed(lambda: [F.linear(inputs[m.in_features], m.weight) for m in linears])
                            for _ in range(runs)])
            packed = median([timed(lambda: [m(inputs[m.in_features]) for m in linears]) for _ in range(runs)])
            out |= {f"rows{n}_dense_step_s": dense, f"rows{n}_packed_step_s": packed,
                    f"rows{n}_dense_GFLOPs": 2 * n * macs / dense / 1e9,
                    f"rows{n}_packed_GFLOPs": 2 * n * macs / packed / 1e9}
        mkl = median([timed(lambda: a @ b.weight.T) for _ in range(3)])
        onednn = median([timed(lambda: b(a)) for _ in range(3)])
    flops = 2 * square**3
    return out | {"square_dense_GFLOPs": flops / mkl / 1e9, "square_packed_GFLOPs": flops / onednn / 1e9}


# --- (a) one stream ----------------------------------------------------------------------------


def ours_direct(model: Transformer, prompt: list[int], tokens: int) -> dict:
    """gpt-fast style loop: prefill, then one decode call per token, greedy, no end-of-sequence."""
    start = time.perf_counter()
    token = model.prefill(torch.tensor(prompt), slot=0).argmax().view(1)
    first = time.perf_counter()
    out, times = [token], [first]
    for i in range(tokens - 1):
        token = model.decode(token, [0], [len(prompt) + i]).argmax(dim=-1)
        out.append(token)
        times.append(time.perf_counter())
    return {"prefill_s": first - start, "decode_tok_s": (tokens - 1) / (times[-1] - first),
            "step_s": intervals(times), "tokens": torch.cat(out).tolist()}


class _StepClock:
    """HF logits processor that only records when each step's logits are ready."""

    def __init__(self):
        self.times: list[float] = []

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        self.times.append(time.perf_counter())
        return scores


def hf_generate(hf, prompts: list[list[int]], tokens: int, pad_id: int) -> dict:
    """HF generate on a static batch (left padding), greedy, exactly `tokens` new tokens each."""
    from transformers import LogitsProcessorList

    width = max(map(len, prompts))
    input_ids = torch.tensor([[pad_id] * (width - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    clock = _StepClock()
    start = time.perf_counter()
    with torch.inference_mode():
        out = hf.generate(input_ids=input_ids, attention_mask=mask, max_new_tokens=tokens, min_new_tokens=tokens,
                          do_sample=False, use_cache=True, pad_token_id=pad_id,
                          logits_processor=LogitsProcessorList([clock]))
    end = time.perf_counter()
    assert out.shape[1] == width + tokens and len(clock.times) == tokens
    decode_s = clock.times[-1] - clock.times[0]
    return {"prefill_s": clock.times[0] - start, "decode_tok_s": len(prompts) * (tokens - 1) / decode_s,
            "step_s": intervals(clock.times),
            "total_s": end - start, "aggregate_tok_s": len(prompts) * tokens / (end - start),
            "tokens": out[:, width:].tolist()}


# --- (a) and (b) through the scheduler ---------------------------------------------------------


def through_scheduler(scheduler: Scheduler, prompts: list[list[int]], tokens: int, interval: float) -> dict:
    """Submit the prompts `interval` seconds apart; per request: submit time, token times, tokens."""
    records = [{"submit": 0.0, "times": [], "tokens": [], "finish": None} for _ in prompts]
    remaining, lock, done = [len(prompts)], threading.Lock(), threading.Event()

    def listener(record: dict) -> Callable:
        def on_event(event) -> None:
            now = time.perf_counter()
            if isinstance(event, TokenEvent):
                record["times"].append(now)
                record["tokens"].append(event.token_id)
            elif isinstance(event, FinishEvent):
                record["finish"] = event.finish_reason
                with lock:
                    remaining[0] -= 1
                    if not remaining[0]:
                        done.set()
        return on_event

    start = time.perf_counter()
    for i, (prompt, record) in enumerate(zip(prompts, records)):
        time.sleep(max(0.0, start + i * interval - time.perf_counter()))
        record["submit"] = time.perf_counter()
        scheduler.submit(GenerationRequest(prompt, SamplingParams(temperature=0, max_tokens=tokens)), listener(record))
    if not done.wait(timeout=900):
        raise TimeoutError("generation through the scheduler did not finish")
    bad = [r["finish"] for r in records if r["finish"] != "length" or len(r["tokens"]) != tokens]
    if bad:
        raise RuntimeError(f"streams did not produce {tokens} tokens: {bad}")
    end = max(r["times"][-1] for r in records)
    ttft = [r["times"][0] - r["submit"] for r in records]
    return {"ttft_s": ttft, "wall_s": end - start, "aggregate_tok_s": len(prompts) * tokens / (end - start),
            "decode_tok_s": [(tokens - 1) / (r["times"][-1] - r["times"][0]) for r in records],
            "step_s": intervals(records[0]["times"]),  # of the first stream
            "tokens": [r["tokens"] for r in records]}


# --- one configuration (thread count) ----------------------------------------------------------


def run(model: Transformer, hf, tokenizer, args, threads: int) -> dict:
    torch.set_num_threads(threads)
    eos = tokenizer.eos_token_id

    def chat(text: str) -> list[int]:
        return tokenizer.encode(tokenizer.apply_chat_template([{"role": "user", "content": text}]))

    single = chat(SINGLE_PROMPT)
    questions = [QUESTIONS[i % len(QUESTIONS)] + (f" (variant {i // len(QUESTIONS)})" if i >= len(QUESTIONS) else "")
                 for i in range(args.streams)]
    prompts = [chat(q) for q in questions]
    context = max(map(len, [single, *prompts])) + args.tokens
    # Ours never stop at end-of-sequence here, like HF with min_new_tokens: every stream does the same work.
    no_eos = copy.copy(tokenizer)
    no_eos.eos_token_id = None
    scheduler = Scheduler(model, no_eos, max_batch_size=max(args.streams, 1), max_context=context)
    interval = args.interval_ms / 1000

    load = [os.getloadavg()]
    samples: dict[str, list] = {k: [] for k in (
        "bandwidth", "gemm", "a_ours", "a_ours_dense", "a_ours_scheduler", "a_hf", "b_ours", "b_hf")}

    def roofline():
        samples["bandwidth"].append(measure_bandwidth())
        samples["gemm"].append(measure_gemm(model, sorted({1, args.streams})))

    def dense():
        model.pack_weights(False)
        try:
            samples["a_ours_dense"].append(ours_direct(model, single, args.tokens))
        finally:
            model.pack_weights(True)

    steps = [
        ("roofline", roofline),
        ("(a) ours", lambda: samples["a_ours"].append(ours_direct(model, single, args.tokens))),
        ("(a) ours, dense weights", dense),
        ("(a) ours via scheduler", lambda: samples["a_ours_scheduler"].append(
            through_scheduler(scheduler, [single], args.tokens, 0.0))),
        ("(a) HF generate", lambda: samples["a_hf"].append(hf_generate(hf, [single], args.tokens, eos))),
        ("(b) ours via scheduler", lambda: samples["b_ours"].append(
            through_scheduler(scheduler, prompts, args.tokens, interval))),
        ("(b) HF generate static batch", lambda: samples["b_hf"].append(hf_generate(hf, prompts, args.tokens, eos))),
    ]
    try:
        ours_direct(model, single, 8)  # warm-up: first-call allocations and code paths
        through_scheduler(scheduler, prompts[:2], 4, 0.0)
        hf_generate(hf, [single], 8, eos)
        hf_generate(hf, prompts[:2], 4, eos)
        for repeat in range(args.repeats):
            for name, step in steps if repeat % 2 == 0 else steps[::-1]:
                log(f"threads={threads} repeat {repeat + 1}/{args.repeats}: {name}")
                step()
                load.append(os.getloadavg())
    finally:
        scheduler.close()
    return summarise(samples, model, args, threads, load, single, prompts, eos)


def summarise(s: dict, model: Transformer, args, threads: int, load: list, single: list[int],
              prompts: list[list[int]], eos: int | None) -> dict:
    params = sum(p.numel() for p in model.parameters())  # the tied head counted once
    weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    flops_per_token = 2 * params

    bw = {k: median([x for b in s["bandwidth"] for x in b[k]]) for k in s["bandwidth"][0]}
    gemm = {k: median([g[k] for g in s["gemm"]]) for k in s["gemm"][0]}
    step1 = min(gemm["rows1_dense_step_s"], gemm["rows1_packed_step_s"])
    step_n = min(gemm[f"rows{args.streams}_dense_step_s"], gemm[f"rows{args.streams}_packed_step_s"])
    peak = max(gemm["square_dense_GFLOPs"], gemm["square_packed_GFLOPs"]) * 1e9
    roofline = {
        "weight_bytes": weight_bytes, "params": params, "flops_per_token": flops_per_token,
        **{f"{k}_median": v for k, v in bw.items()}, **{f"gemm_{k}_median": v for k, v in gemm.items()},
        "batch1_tok_s_ceiling_copy_bw": bw["copy_GBps"] * 1e9 / weight_bytes,
        "batch1_tok_s_ceiling_read_bw": bw["read_GBps"] * 1e9 / weight_bytes,
        "batch1_tok_s_ceiling_gemm_only": 1 / step1,
        f"batch{args.streams}_tok_s_ceiling_gemm_model_shapes": args.streams / step_n,
        "tok_s_ceiling_gemm_square_peak": peak / flops_per_token,
        "samples": {"bandwidth": s["bandwidth"], "gemm": s["gemm"]},
    }

    def rates(runs: list[dict], key: str) -> list[float]:
        return [r[key] if not isinstance(r[key], list) else median(r[key]) for r in runs]

    # Per token: the run's mean rate (median over repeats), and the rate of the median step over
    # every step of every repeat, which a few preempted steps on a shared machine do not move.
    a = {name: {"decode_tok_s_median": median(rates(s[key], "decode_tok_s")),
                "decode_tok_s": rates(s[key], "decode_tok_s"),
                "median_step_ms": 1e3 * median([x for r in s[key] for x in r["step_s"]]),
                "prefill_or_ttft_s_median": median(
                    [r["prefill_s"] if "prefill_s" in r else r["ttft_s"][0] for r in s[key]])}
         for name, key in (("ours", "a_ours"), ("ours_dense_weights", "a_ours_dense"),
                           ("ours_scheduler", "a_ours_scheduler"), ("hf_generate", "a_hf"))}
    hf_tokens = s["a_hf"][0]["tokens"][0]
    a["prompt_tokens"] = len(single)
    a["greedy_tokens_match_hf_until_eos"] = all(matches_until_eos(r["tokens"], hf_tokens, eos) for r in s["a_ours"])
    a["scheduler_tokens_equal_direct"] = all(r["tokens"][0] == s["a_ours"][0]["tokens"] for r in s["a_ours_scheduler"])

    ours_ttft = [t for r in s["b_ours"] for t in r["ttft_s"]]
    interval = args.interval_ms / 1000
    last_arrival = (len(prompts) - 1) * interval
    hf_ttft_as_arrived = [last_arrival - i * interval + r["prefill_s"] for r in s["b_hf"] for i in range(len(prompts))]
    b = {
        "streams": len(prompts), "interval_ms": args.interval_ms, "prompt_tokens": [len(p) for p in prompts],
        "ours": {"aggregate_tok_s_median": median(rates(s["b_ours"], "aggregate_tok_s")),
                 "aggregate_tok_s": rates(s["b_ours"], "aggregate_tok_s"),
                 "wall_s": [r["wall_s"] for r in s["b_ours"]],
                 "per_stream_decode_tok_s_median": median([x for r in s["b_ours"] for x in r["decode_tok_s"]]),
                 "ttft_p50_s": percentile(ours_ttft, 50), "ttft_p99_s": percentile(ours_ttft, 99)},
        "hf_static": {"aggregate_tok_s_median": median(rates(s["b_hf"], "aggregate_tok_s")),
                      "aggregate_tok_s": rates(s["b_hf"], "aggregate_tok_s"),
                      "decode_only_tok_s_median": median(rates(s["b_hf"], "decode_tok_s")),
                      "total_s": [r["total_s"] for r in s["b_hf"]],
                      "prefill_s_median": median([r["prefill_s"] for r in s["b_hf"]]),
                      "ttft_as_arrived_p50_s": percentile(hf_ttft_as_arrived, 50),
                      "ttft_as_arrived_p99_s": percentile(hf_ttft_as_arrived, 99)},
    }
    b["streams_matching_hf_until_eos"] = sum(
        matches_until_eos(ours, theirs, eos) for ours, theirs in zip(s["b_ours"][0]["tokens"], s["b_hf"][0]["tokens"]))

    # Where a decode step's time goes: the matrix products alone (same weights, same rows) vs the rest.
    a["step_ms"] = a["ours"]["median_step_ms"]
    a["gemm_only_step_ms"] = 1e3 * gemm["rows1_packed_step_s"]
    b["ours"]["step_ms_from_per_stream_rate"] = 1e3 / b["ours"]["per_stream_decode_tok_s_median"]
    b["ours"]["gemm_only_step_ms"] = 1e3 * gemm[f"rows{args.streams}_packed_step_s"]
    for name in ("ours", "ours_dense_weights", "ours_scheduler", "hf_generate"):
        a[name]["tok_s_at_median_step"] = 1e3 / a[name]["median_step_ms"]
    ours_a, hf_a = a["ours"]["tok_s_at_median_step"], a["hf_generate"]["tok_s_at_median_step"]
    ours_b = b["ours"]["aggregate_tok_s_median"]
    ratios = {
        "single_stream_ours_over_hf": ours_a / hf_a,
        "single_stream_ours_over_hf_mean_rates":
            a["ours"]["decode_tok_s_median"] / a["hf_generate"]["decode_tok_s_median"],
        "single_stream_scheduler_over_hf": a["ours_scheduler"]["tok_s_at_median_step"] / hf_a,
        "single_stream_packed_over_dense": ours_a / a["ours_dense_weights"]["tok_s_at_median_step"],
        "single_stream_ours_over_copy_bw_ceiling": ours_a / roofline["batch1_tok_s_ceiling_copy_bw"],
        "single_stream_ours_over_read_bw_ceiling": ours_a / roofline["batch1_tok_s_ceiling_read_bw"],
        "single_stream_ours_over_gemm_only": ours_a / roofline["batch1_tok_s_ceiling_gemm_only"],
        "concurrent_ours_over_hf_static": ours_b / b["hf_static"]["aggregate_tok_s_median"],
        "concurrent_ours_over_gemm_roofline": ours_b / roofline[f"batch{args.streams}_tok_s_ceiling_gemm_model_shapes"],
        "concurrent_ours_over_square_peak": ours_b / roofline["tok_s_ceiling_gemm_square_peak"],
    }
    return {"threads": threads, "load_average": {"start": load[0], "end": load[-1],
                                                 "median_1min": median([x[0] for x in load]), "samples": load},
            "ratios": ratios, "single_stream": a, "concurrent": b, "roofline": roofline}


def print_summary(r: dict, streams: int) -> None:
    a, b, roof, load = r["single_stream"], r["concurrent"], r["roofline"], r["load_average"]
    ours, hf = b["ours"], b["hf_static"]
    print(f"\n== torch threads {r['threads']}, load average {load['median_1min']:.2f} "
          f"(start {load['start'][0]:.2f}, end {load['end'][0]:.2f}) ==")
    peak = max(roof["gemm_square_dense_GFLOPs_median"], roof["gemm_square_packed_GFLOPs_median"])
    print(f"machine: copy {roof['copy_GBps_median']:.1f} GB/s, read {roof['read_GBps_median']:.1f} GB/s; GEMM over "
          f"the model's weights x {streams} rows: MKL {roof[f'gemm_rows{streams}_dense_GFLOPs_median']:.0f}, oneDNN "
          f"{roof[f'gemm_rows{streams}_packed_GFLOPs_median']:.0f} GFLOP/s; square peak {peak:.0f} GFLOP/s")
    rate = {name: f"{a[name]['tok_s_at_median_step']:.1f} ({a[name]['decode_tok_s_median']:.1f})"
            for name in ("ours", "ours_dense_weights", "ours_scheduler", "hf_generate")}
    print(f"(a) decode tok/s at the median step (mean rate): ours {rate['ours']}, dense weights "
          f"{rate['ours_dense_weights']}, scheduler {rate['ours_scheduler']}, HF {rate['hf_generate']}; "
          f"ceilings: copy-bw "
          f"{roof['batch1_tok_s_ceiling_copy_bw']:.1f}, read-bw {roof['batch1_tok_s_ceiling_read_bw']:.1f}, "
          f"GEMM-only {roof['batch1_tok_s_ceiling_gemm_only']:.1f}; step {a['step_ms']:.1f} ms, of which matrix "
          f"products {a['gemm_only_step_ms']:.1f} ms; greedy tokens = HF: {a['greedy_tokens_match_hf_until_eos']}")
    print(f"(b) aggregate tok/s: ours {ours['aggregate_tok_s_median']:.1f} (TTFT p50 "
          f"{ours['ttft_p50_s'] * 1e3:.0f} ms, p99 {ours['ttft_p99_s'] * 1e3:.0f} ms), HF static "
          f"{hf['aggregate_tok_s_median']:.1f} (TTFT as arrived p50 {hf['ttft_as_arrived_p50_s'] * 1e3:.0f} ms, "
          f"p99 {hf['ttft_as_arrived_p99_s'] * 1e3:.0f} ms); GEMM ceiling "
          f"{roof[f'batch{streams}_tok_s_ceiling_gemm_model_shapes']:.0f} tok/s; step "
          f"~{ours['step_ms_from_per_stream_rate']:.0f} ms, matrix products alone {ours['gemm_only_step_ms']:.0f} ms; "
          f"streams = HF: {b['streams_matching_hf_until_eos']}/{b['streams']}")
    for name, value in r["ratios"].items():
        target = TARGETS.get(name)
        print(f"  {name:45s} {value:6.2f}" + (f"   (target >= {target})" if target else ""))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, default=128, help="new tokens per stream")
    parser.add_argument("--streams", type=int, default=16, help="concurrent streams in (b)")
    parser.add_argument("--interval-ms", type=float, default=50.0, help="arrival spacing in (b)")
    parser.add_argument("--repeats", type=int, default=2, help="interleaved repeats of everything")
    parser.add_argument("--threads", default=str(torch.get_num_threads()),
                        help="torch intra-op threads, comma-separated to compare several (e.g. 1,2)")
    parser.add_argument("--model-dir", type=Path, default=None, help="HF directory of the model (default: see above)")
    parser.add_argument("--out", type=Path, default=ROOT / "loadtest/results/generate.json")
    args = parser.parse_args()
    if args.tokens < 2 or args.streams < 1 or args.repeats < 1:
        parser.error("--tokens >= 2, --streams >= 1, --repeats >= 1")

    from transformers import LlamaForCausalLM
    import transformers

    directory = model_directory(args.model_dir)
    log(f"loading {directory}")
    model, tokenizer = load_model(directory, dtype=torch.float32)
    hf = LlamaForCausalLM.from_pretrained(directory, dtype=torch.float32).eval()
    hf.generation_config.temperature = hf.generation_config.top_p = hf.generation_config.top_k = None

    started = time.time()
    runs = [run(model, hf, tokenizer, args, int(t)) for t in args.threads.split(",")]
    results = {
        "what": "decode speed, ours vs HF transformers generate, same weights, fp32, greedy, CPU",
        "model": {"directory": str(directory), "config": dataclasses.asdict(model.config)},
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "processor": platform.processor(),
                    "torch": torch.__version__, "transformers": transformers.__version__,
                    "mkldnn": torch.backends.mkldnn.is_available()},
        "settings": {"tokens": args.tokens, "streams": args.streams, "interval_ms": args.interval_ms,
                     "repeats": args.repeats, "threads": args.threads},
        "targets": TARGETS,
        "runtime_s": time.time() - started,
        "runs": runs,
    }
    for r in runs:
        print_summary(r, args.streams)
    print(f"\nthe benchmark took {results['runtime_s']:.0f} s")
    write_results(args.out, results)
    return 0


if __name__ == "__main__":
    sys.exit(main())
