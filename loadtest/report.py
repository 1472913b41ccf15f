"""Benchmark report: gathers loadtest/results/*.json into one report.json and draws the plots.

    python loadtest/report.py            # after the bench_*.py scripts (`make bench` runs them all)

Plots (PNG, loadtest/results/): retrieve throughput vs concurrency per backend and transport,
batching on vs off (retrieve and image completion), DrDAM vs exact latency and memory as the number of
stored patterns grows, decode tokens/s vs concurrent streams, replication lag and replicas.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"


def load(name: str) -> dict | None:
    path = RESULTS / f"{name}.json"
    return json.loads(path.read_text()) if path.exists() else None


def save(fig, name: str) -> str:
    """Lay out `fig`, write it to RESULTS/`name` and free it; returns `name`."""
    fig.tight_layout()
    fig.savefig(RESULTS / name, dpi=120)
    plt.close(fig)
    return name


def plot_retrieve(data: dict) -> list[str]:
    written = []
    for bank in sorted({c["bank"] for c in data["cells"]}):
        fig, ax = plt.subplots(figsize=(6, 4))
        for (backend, transport, batching) in sorted({(c["backend"], c["transport"], c["batching"])
                                                      for c in data["cells"] if c["bank"] == bank}):
            cells = sorted((c for c in data["cells"] if (c["bank"], c["backend"], c["transport"], c["batching"])
                            == (bank, backend, transport, batching)), key=lambda c: c["clients"])
            ax.plot([c["clients"] for c in cells], [c["throughput_rps"] for c in cells], marker="o",
                    label=f"{backend} {transport} batching {batching}")
        raw = {int(k.split("/")[1]): v["throughput_qps"] for k, v in data.get("raw_engine", {}).items()
               if k.startswith(f"{bank}/")}
        if raw:
            ax.plot(sorted(raw), [raw[k] for k in sorted(raw)], "k--", label="raw engine (same batches)")
        ax.set(xscale="log", xlabel="concurrent clients", ylabel="requests / s", title=f"retrieve, {bank} bank")
        ax.legend(fontsize=7)
        written.append(save(fig, f"retrieve_{bank}.png"))
    return written


def plot_retrieve_wrk(data: dict) -> list[str]:
    """REST requests/s under wrk over the engine's own rate at the same batch size, per bank and backend:
    the engine called from a worker thread as the server calls it, and from a fresh process's first thread."""
    fig, ax = plt.subplots(figsize=(8, 4))
    labels = [f"{c['bank']}\n{c['backend']}\n{c['encoding_format']}" for c in data["cells"]]
    width = 0.4
    bars = ax.bar([i - width / 2 for i in range(len(labels))], [c["rest_over_engine"] for c in data["cells"]],
                  width, label="engine in a worker thread (as served)")
    ax.bar([i + width / 2 for i in range(len(labels))], [c["rest_over_engine_main_thread"] for c in data["cells"]],
           width, label="engine in a fresh process's first thread")
    ax.bar_label(bars, [f"{c['rps']:.0f}/s" for c in data["cells"]], fontsize=7)
    ax.set_xticks(range(len(labels)), labels, fontsize=7)
    highest = max(max(c["rest_over_engine"], c["rest_over_engine_main_thread"]) for c in data["cells"])
    ax.set_ylim(0, highest * 1.3)  # room for the legend above the bars
    ax.legend(fontsize=7, loc="upper center", ncols=2)
    ax.set(ylabel="REST req/s ÷ engine q/s (same batch)", title=f"retrieve under wrk, {data['connections']} connections")
    return [save(fig, "retrieve_wrk.png")]


def plot_complete(data: dict) -> list[str]:
    fig, ax = plt.subplots(figsize=(6, 4))
    for batching in ("on", "off"):
        cells = sorted((c for c in data["cells"] if c["batching"] == batching), key=lambda c: c["clients"])
        ax.plot([c["clients"] for c in cells], [c["throughput_rps"] for c in cells], marker="o",
                label=f"batching {batching}")
    ax.set(xscale="log", xlabel="concurrent clients", ylabel="images / s", title="Energy Transformer completion")
    ax.legend()
    return [save(fig, "complete.png")]


def plot_drdam(data: dict) -> list[str]:
    rows = data["rows"]
    counts = [r["patterns"] for r in rows]
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    for kind in ("rbf", "drdam"):
        left.plot(counts, [r[kind]["latency_ms"] for r in rows], marker="o", label=kind)
        right.plot(counts, [r[kind]["bytes"] / 2**20 for r in rows], marker="o", label=kind)
    left.set(xscale="log", yscale="log", xlabel="stored patterns", ylabel="ms per query (median)",
             title=f"retrieve latency, D={data['dim']}, {data['steps']} steps")
    right.set(xscale="log", yscale="log", xlabel="stored patterns", ylabel="MiB", title="serving memory")
    left.legend()
    right.legend()
    return [save(fig, "drdam_scaling.png")]


def plot_generate(data: dict) -> list[str]:
    """Decode tokens/s at 1 stream and at N concurrent streams, ours vs HF, per thread setting."""
    fig, ax = plt.subplots(figsize=(6, 4))
    for run in data["runs"]:
        streams = [1, run["concurrent"]["streams"]]
        ours = [run["single_stream"]["ours_scheduler"]["decode_tok_s_median"],
                run["concurrent"]["ours"]["aggregate_tok_s_median"]]
        hf = [run["single_stream"]["hf_generate"]["decode_tok_s_median"],
              run["concurrent"]["hf_static"]["aggregate_tok_s_median"]]
        ax.plot(streams, ours, marker="o", label=f"amserve scheduler, {run['threads']} thread(s)")
        ax.plot(streams, hf, marker="s", linestyle="--", label=f"HF generate, {run['threads']} thread(s)")
    ax.set(xscale="log", xlabel="concurrent streams", ylabel="generated tokens / s",
           title="decode throughput (HF: static batch)")
    ax.legend(fontsize=7)
    return [save(fig, "generate_streams.png")]


def plot_replication(data: dict) -> list[str]:
    """Replication lag, retrieve throughput with 1 vs 2 replicas, and latency around a replica kill."""
    fig, (lag, throughput, kill) = plt.subplots(1, 3, figsize=(13, 4))
    for offset, (rate, run) in enumerate(data["lag"].items()):
        lag.bar([offset * 3, offset * 3 + 1], [run["lag"]["p50_ms"], run["lag"]["p99_ms"]],
                label=f"offered {rate}, achieved {run['achieved_rate']:.0f}/s")
    lag.set_xticks([0, 1, 3, 4], ["p50", "p99", "p50", "p99"])
    lag.set(ylabel="ms", title="store → visible on the other replica")
    lag.legend(fontsize=7)
    throughput.bar(["1 replica", "2 replicas"], [data["throughput"]["one_replica"]["rps"],
                                                 data["throughput"]["two_replicas"]["rps"]])
    throughput.set(ylabel="retrieves / s (wrk)", title="retrieve throughput, same machine")
    phases = list(data["replica_kill"])
    kill.bar(phases, [data["replica_kill"][p]["p99_ms"] or 0 for p in phases])
    kill.set(ylabel="p99 ms", title="Triton replica SIGKILLed: errors " +
             ", ".join(str(data["replica_kill"][p]["errors"]) for p in phases))
    kill.tick_params(axis="x", labelsize=7)
    return [save(fig, "replication.png")]


def main() -> int:
    report: dict = {"plots": []}
    for name, plot in (("retrieve", plot_retrieve), ("retrieve_wrk", plot_retrieve_wrk), ("complete", plot_complete),
                       ("drdam_scaling", plot_drdam), ("generate", plot_generate), ("overload", None),
                       ("replication", plot_replication)):
        data = load(name)
        if data is None:
            print(f"no {name}.json: run loadtest/bench_{name}.py first", file=sys.stderr)
            continue
        report[name] = data
        if plot is not None:
            report["plots"] += plot(data)
    (RESULTS / "report.json").write_text(json.dumps(report, indent=2))
    print(f"wrote {RESULTS / 'report.json'} and {', '.join(report['plots'])}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
