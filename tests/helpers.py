"""What many tests need: backends driven from a synchronous test, errors compared across backends,
bounded waits, Prometheus text read as samples, and the processes a test run leaves behind."""

from __future__ import annotations

import asyncio
import re
import time
import urllib.request
from collections.abc import Awaitable, Callable
from pathlib import Path

from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.samples import Sample

from service.errors import ServiceError


def run_scenario(scenario: Callable[..., Awaitable], *backends):
    """Start `backends`, await `scenario(*backends)` and close them again, in one event loop."""
    async def main():
        for backend in backends:
            await backend.start()
        try:
            return await scenario(*backends)
        finally:
            for backend in backends:
                await backend.close()
    return asyncio.run(main())


async def outcome(call: Awaitable):
    """A call's result, or its error as (class, field, message) so two backends' errors compare equal."""
    try:
        return await call
    except ServiceError as exc:
        return type(exc), exc.field, exc.message


def wait_until(predicate: Callable[[], bool], timeout: float, interval: float = 0.1) -> bool:
    """Poll `predicate` until it holds (True) or `timeout` seconds have passed (False)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(interval)
    return predicate()


# ----- Prometheus text ------------------------------------------------------------------------


def metric_samples(text: str, name: str, **labels: str) -> list[Sample]:
    """The samples called `name` (a series such as `x_bucket` or `x_sum` included) whose labels
    include `labels`."""
    found = []
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            # The parser calls a counter's sample `<name>_total` also where the exporter wrote `<name>`.
            names = {sample.name, sample.name.removesuffix("_total")} if family.type == "counter" else {sample.name}
            if name in names and labels.items() <= sample.labels.items():
                found.append(sample)
    return found


def metric_value(text: str, name: str, **labels: str) -> float | None:
    """The value of the one sample `name` with `labels`; None when there is none."""
    found = metric_samples(text, name, **labels)
    assert len(found) <= 1, f"{len(found)} samples of {name} match {labels}; name more labels"
    return found[0].value if found else None


def inference_counts(metrics_url: str, model: str) -> tuple[float, float]:
    """(nv_inference_count, nv_inference_exec_count) of `model` from Triton's metrics port."""
    with urllib.request.urlopen(metrics_url, timeout=10) as answer:
        text = answer.read().decode()
    counts = tuple(metric_value(text, metric, model=model, version="1")
                   for metric in ("nv_inference_count", "nv_inference_exec_count"))
    assert None not in counts, f"the inference counts of {model} are missing from Triton's metrics"
    return counts


def settled_inference_counts(metrics_url: str, model: str, at_least: float = 0.0) -> tuple[float, float]:
    """Triton counts an execution once model.py's execute has returned, which may be just after its
    responses arrived: read until the count has reached `at_least` and stays put (5 s at most)."""
    last = None
    for _ in range(100):
        now = inference_counts(metrics_url, model)
        if now == last and now[0] >= at_least:
            return now
        last = now
        time.sleep(0.05)
    return last


# ----- processes ------------------------------------------------------------------------------


def running(pid: int) -> bool:
    """True while `pid` is a live process (a zombie awaiting its reaper counts as gone)."""
    try:
        stat = (Path("/proc") / str(pid) / "stat").read_text()
    except FileNotFoundError:
        return False
    return stat.rpartition(")")[2].split()[0] != "Z"


def command_line(pid: int) -> str:
    return (Path("/proc") / str(pid) / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace").strip()


def live_pids() -> list[int]:
    return [int(entry.name) for entry in Path("/proc").iterdir() if entry.name.isdigit()]


def processes_with_environment(variable: str, value: str) -> dict[int, str]:
    """{pid: command line} of the live processes whose environment sets `variable` to `value`."""
    marker = f"{variable}={value}".encode()
    found = {}
    for pid in live_pids():
        try:
            if marker in (Path("/proc") / str(pid) / "environ").read_bytes().split(b"\0"):
                found[pid] = command_line(pid)
        except OSError:
            continue  # exited while we looked, or not ours to read (a zombie's environment reads empty)
    return found


def processes_matching(pattern: re.Pattern) -> dict[int, str]:
    """{pid: command line} of the live processes whose command line `pattern` finds."""
    found = {}
    for pid in live_pids():
        try:
            if pattern.search(command := command_line(pid)):
                found[pid] = command
        except OSError:
            continue  # exited while we looked
    return found
