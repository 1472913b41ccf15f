"""The `associative_memory` Triton model: its wire format and its request handling.

One request is one bank operation, a batch item of size 1 (so Triton's `max_batch_size` counts
requests). Inputs (names and types in service/triton/spec.py):

    OP       BYTES [1]        create | list | info | delete | store | delete_pattern | run | partial | fidelity
    BANK     BYTES [1]        bank name ("" for list)
    ARGS     BYTES [1]        JSON object: create {kind, dim, params}, info {min_version}, store {ids}, delete_pattern {id},
                              run {steps, step_size, tolerance, trace, explain, min_version},
                              partial {shard, shards, min_version}, fidelity {sample_size, noise}
    VECTORS  FP32  [N, D]     store: patterns; run: queries; partial: states (optional, ragged)
    CLAMP    BOOL  [N, D]     run: True = known entry, clamped; absent for a plain retrieve (optional, ragged)

A fidelity answers RESULT, the JSON of the registry's Fidelity report.
A run answers the columns of `MemoryResults`, one row per query: STATES FP32 [N, D], ENERGY FP32 [N],
STEPS INT64 [N], CONVERGED BOOL [N], NEAREST BYTES [N] (the id, "" when the kind keeps no patterns),
SIMILARITY FP32 [N], TRACE FP32 [N, S+1] (NaN-padded; [N, 0] without trace), and with explain per step
STEP_STATES FP32 [N, S+1, D], TOP_IDS BYTES [N, S+1, n] ("" past a row's steps) and TOP_WEIGHTS FP32
[N, S+1, n] (all three [N, 0, 0] without explain). Every other op answers
RESULT BYTES [1], JSON: bank info, a list of them, {ids, count, version}, {version} or {}.
A partial (one shard's share of one dynamics step of a sharded bank, service/engines/memory/shards.py)
answers MAX_LOGIT FP64 [N], TOTAL FP64 [N], WEIGHTED FP64 [N, D], BEST FP64 [N], NEAREST BYTES [N]
(the id achieving BEST, "" for an empty shard) and RESULT {count, max_norm}.
A failed request carries a JSON error {code, field, message} with the service error's code, which
`error_from_message` turns back into the same exception class on the client side (service/triton/wire.py).

`AssociativeMemory.execute` is everything model.py's execute does, without pb_utils, so it is tested
in-process. Like the embedded backend, it checks every run request alone, then makes one engine call
per (bank, dynamics options) for all checked rows; partials likewise, one per (bank, shard).
"""

from __future__ import annotations

import json
from typing import Any

import numpy as np
import torch

from service.banks.registry import BankInfo, BankRegistry, DynamicsOptions, MemoryResults
from service.engines.memory.base import Nearest
from service.engines.memory.shards import Partial
from service.errors import InvalidArgument
from service.triton.wire import json_tensor, text_tensor, text_value

OPS = ("create", "list", "info", "delete", "store", "delete_pattern", "run", "partial", "fidelity")
READ_OPS = ("list", "info", "run", "partial", "fidelity")
VERSIONED_OPS = ("info", "run", "partial")  # reads that may ask for a bank version: ARGS min_version
RUN_OUTPUTS = ("STATES", "ENERGY", "STEPS", "CONVERGED", "NEAREST", "SIMILARITY", "TRACE", "STEP_STATES", "TOP_IDS",
               "TOP_WEIGHTS")
PARTIAL_OUTPUTS = ("MAX_LOGIT", "TOTAL", "WEIGHTED", "BEST", "NEAREST", "RESULT")
NO_VECTORS = np.zeros((0, 0), dtype=np.float32)

Outputs = dict[str, np.ndarray]


# ----- the gateway's side ---------------------------------------------------------------------


def request_arrays(op: str, bank: str = "", args: dict | None = None, *, vectors: np.ndarray | None = None,
                   clamp: np.ndarray | None = None) -> dict[str, np.ndarray]:
    """The inputs of one request, batch dimension included, as the model reads them."""
    arrays = {"OP": text_tensor(op), "BANK": text_tensor(bank), "ARGS": text_tensor(json.dumps(args or {}))}
    if vectors is not None:
        arrays["VECTORS"] = _matrix(vectors, np.float32)[np.newaxis]
    if clamp is not None:
        arrays["CLAMP"] = _matrix(clamp, np.bool_)[np.newaxis]
    return arrays


def _matrix(values: np.ndarray, dtype: type) -> np.ndarray:
    """A 2-D array of `dtype` for the wire. What the model's checks would reject for its rank or (for
    the mask) its type goes as a 0×0 array, which those same checks reject with the same message."""
    array = np.asarray(values)
    if array.ndim != 2 or (dtype is np.bool_ and array.dtype != np.bool_):
        return np.zeros((0, 0), dtype=dtype)
    return np.ascontiguousarray(array, dtype=dtype)


def output_names(op: str) -> tuple[str, ...]:
    return {"run": RUN_OUTPUTS, "partial": PARTIAL_OUTPUTS}.get(op, ("RESULT",))


def encode_results(results: MemoryResults) -> Outputs:
    trace = results.trace if results.trace is not None else np.zeros((len(results), 0), dtype=np.float32)
    unexplained = np.zeros((len(results), 0, 0), dtype=np.float32)
    explained = results.step_states is not None
    return {"STATES": results.states, "ENERGY": results.energy, "STEPS": results.steps,
            "CONVERGED": results.converged, "SIMILARITY": results.similarity, "TRACE": trace,
            "NEAREST": np.array([(pid or "").encode() for pid in results.nearest], dtype=np.object_),
            "STEP_STATES": results.step_states if explained else unexplained,
            "TOP_IDS": (np.vectorize(lambda pid: (pid or "").encode(), otypes=[np.object_])(results.top_ids)
                        if explained else unexplained.astype(np.object_)),
            "TOP_WEIGHTS": results.top_weights if explained else unexplained}


def decode_results(outputs: dict[str, np.ndarray]) -> MemoryResults:
    """A run's outputs, without the batch dimension, back to the columns the registry returned."""
    trace, step_states = outputs["TRACE"], outputs["STEP_STATES"]
    explained = step_states.shape[1] > 0
    return MemoryResults(states=outputs["STATES"], energy=outputs["ENERGY"], steps=outputs["STEPS"],
                         converged=outputs["CONVERGED"], similarity=outputs["SIMILARITY"],
                         nearest=[pid.decode() or None for pid in outputs["NEAREST"]],
                         trace=trace if trace.shape[1] else None,
                         step_states=step_states if explained else None,
                         top_ids=(np.vectorize(lambda pid: pid.decode() or None, otypes=[np.object_])(outputs["TOP_IDS"])
                                  if explained else None),
                         top_weights=outputs["TOP_WEIGHTS"] if explained else None)


def encode_partial(partial: Partial, ids: list[str | None]) -> Outputs:
    return {"MAX_LOGIT": partial.max_logit.numpy(), "TOTAL": partial.total.numpy(),
            "WEIGHTED": partial.weighted.numpy(), "BEST": partial.nearest.best.numpy(),
            "NEAREST": np.array([(pid or "").encode() for pid in ids], dtype=np.object_),
            "RESULT": json_tensor({"count": partial.count, "max_norm": partial.max_norm})}


def decode_partial(outputs: dict[str, np.ndarray], shard: int, labels: list[str | None]) -> Partial:
    """A partial's outputs, without the batch dimension; its nearest ids are appended to `labels`, and
    the partial's rows point into that list (the merge picks rows, the caller reads ids)."""
    result = json.loads(outputs["RESULT"][0])
    best = torch.from_numpy(outputs["BEST"])
    rows = torch.arange(len(labels), len(labels) + len(best))
    labels.extend(pid.decode() or None for pid in outputs["NEAREST"])
    return Partial(max_logit=torch.from_numpy(outputs["MAX_LOGIT"]), total=torch.from_numpy(outputs["TOTAL"]),
                   weighted=torch.from_numpy(outputs["WEIGHTED"]),
                   nearest=Nearest(best, torch.full_like(rows, shard), rows),
                   count=result["count"], max_norm=result["max_norm"])


def bank_info(payload: dict) -> BankInfo:
    return BankInfo.model_validate(payload)


# ----- the model's request handling ------------------------------------------------------------


class AssociativeMemory:
    """Answers a batch of requests, each given as its inputs without the batch dimension."""

    def __init__(self, registry: BankRegistry):
        self.registry = registry

    def execute(self, requests: list[dict[str, np.ndarray | None]]) -> list[Outputs | Exception]:
        """One answer per request, in order: its outputs, or the exception it failed with (a
        ServiceError, or any other exception for a bug, which model.py logs).

        Runs wait in groups until a request of another op arrives, so each request sees the
        effects of those that came before it.
        """
        answers: list[Outputs | Exception | None] = [None] * len(requests)
        groups: dict[tuple, list[tuple[int, Any]]] = {}
        for index, inputs in enumerate(requests):
            try:
                op, bank = text_value(inputs["OP"]), text_value(inputs["BANK"])
                args = json.loads(text_value(inputs["ARGS"]))
                if not isinstance(args, dict):
                    raise InvalidArgument("ARGS must be a JSON object")
                vectors = NO_VECTORS if inputs["VECTORS"] is None else inputs["VECTORS"]
                if op in VERSIONED_OPS:
                    min_version = args.pop("min_version", 0)
                    if isinstance(min_version, bool) or not isinstance(min_version, int) or min_version < 0:
                        raise InvalidArgument("min_version must be an integer >= 0", field="min_version")
                    # Catch up from the store now (a bank created since the last sync is adopted); a
                    # replica still behind min_version answers 503.
                    self.registry.at_version(bank, min_version)
                if op in ("run", "partial"):
                    key = ("run", bank, _options(args)) if op == "run" else ("partial", bank, *_shard(args))
                    queries, clamp = self.registry.check_queries(bank, vectors, inputs["CLAMP"] if op == "run" else None)
                    groups.setdefault(key, []).append((index, (queries, clamp) if op == "run" else queries))
                    continue
                self._run_groups(groups, answers)
                answers[index] = self._single(op, bank, args, vectors)
            except Exception as exc:  # every failure, bugs included, is this request's answer alone
                answers[index] = exc
        self._run_groups(groups, answers)
        return answers

    def _run_groups(self, groups: dict[tuple, list[tuple[int, Any]]], answers: list) -> None:
        for (op, bank, *key), members in groups.items():
            try:
                parts = [part for _, part in members]
                if op == "run":
                    encoded = [encode_results(results) for results in self.registry.run_batch(bank, parts, *key)]
                else:
                    encoded = [encode_partial(*answer) for answer in self.registry.partial_batch(bank, *key, parts)]
                for (index, _), outputs in zip(members, encoded):
                    answers[index] = outputs
            except Exception as exc:  # as in the embedded backend, a failed batch fails all its requests
                for index, _ in members:
                    answers[index] = exc
        groups.clear()

    def _single(self, op: str, bank: str, args: dict, vectors: np.ndarray) -> Outputs:
        registry = self.registry
        if op == "create":
            result = registry.create(bank, args.get("kind"), args.get("dim"), args.get("params")).model_dump()
        elif op == "list":
            result = [info.model_dump() for info in registry.list()]
        elif op == "info":
            result = registry.info(bank).model_dump()
        elif op == "delete":
            registry.delete(bank)
            result = {}
        elif op == "store":
            ids, count, version = registry.store_patterns(bank, vectors, args.get("ids"))
            result = {"ids": ids, "count": count, "version": version}
        elif op == "delete_pattern":
            result = {"version": registry.delete_pattern(bank, args.get("id"))}
        elif op == "fidelity":
            result = registry.fidelity(bank, args.get("sample_size"), args.get("noise")).model_dump()
        else:
            raise InvalidArgument(f"unknown op {op!r}; expected one of {', '.join(OPS)}", field="op")
        return {"RESULT": json_tensor(result)}


def _shard(args: dict) -> tuple[int, int]:
    """A partial's (shard, shards)."""
    shard, shards = args.get("shard"), args.get("shards")
    for name, value in (("shard", shard), ("shards", shards)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise InvalidArgument(f"partial ARGS: {name} must be an integer >= 0", field=name)
    return shard, shards


def _options(args: dict) -> DynamicsOptions:
    try:
        return DynamicsOptions(**args)
    except TypeError as exc:
        raise InvalidArgument(f"run ARGS: {exc}") from exc
