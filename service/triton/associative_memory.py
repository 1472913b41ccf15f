"""The `associative_memory` Triton model: its wire format and its request handling.

One request is one bank operation, a batch item of size 1 (so Triton's `max_batch_size` counts
requests). Inputs:

    OP       BYTES [1]        create | list | info | delete | store | delete_pattern | run
    BANK     BYTES [1]        bank name ("" for list)
    ARGS     BYTES [1]        JSON object: create {kind, dim, params}, store {ids}, delete_pattern {id},
                              run {steps, step_size, tolerance, trace}
    VECTORS  FP32  [N, D]     store: patterns; run: queries (optional, ragged)
    CLAMP    BOOL  [N, D]     run: True = known entry, clamped; absent for a plain retrieve (optional, ragged)

Outputs: STATES FP32 [N, D] (run: final states; otherwise 0×0) and RESULT BYTES [1], JSON: bank info,
a list of them, {ids, count}, {} or, for run, one {energy, steps, converged, nearest, trace} per row.
A failed request carries a JSON error {code, field, message} with the service error's code, which
`error_from_message` turns back into the same exception class on the client side (service/triton/wire.py).

`AssociativeMemory.execute` is everything model.py's execute does, without pb_utils, so it is tested
in-process. Like the embedded backend, it checks every run request alone, then makes one engine call
per (bank, dynamics options) for all checked rows.
"""

from __future__ import annotations

import json
from dataclasses import asdict
from typing import Any

import numpy as np

from service.banks.registry import BankInfo, BankRegistry, DynamicsOptions, MemoryResult
from service.errors import InvalidArgument
from service.triton.wire import json_tensor, text_value

MODEL_NAME = "associative_memory"
OPS = ("create", "list", "info", "delete", "store", "delete_pattern", "run")
INPUT_NAMES = ("OP", "BANK", "ARGS", "VECTORS", "CLAMP")
NO_STATES = np.zeros((0, 0), dtype=np.float32)

Outputs = dict[str, np.ndarray]


# ----- results, both directions ----------------------------------------------------------------


def encode_results(results: list[MemoryResult]) -> Outputs:
    rest = [{k: v for k, v in asdict(r).items() if k != "state"} for r in results]
    return {"STATES": np.asarray([r.state for r in results], dtype=np.float32), "RESULT": json_tensor(rest)}


def decode_results(states: np.ndarray, result: Any) -> list[MemoryResult]:
    """float32 states back to Python floats: the same values the embedded backend's tolist() gives."""
    return [MemoryResult(state=row.tolist(), **fields) for row, fields in zip(states, result)]


def bank_info(payload: dict) -> BankInfo:
    return BankInfo(**payload)


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
                vectors = NO_STATES if inputs["VECTORS"] is None else inputs["VECTORS"]
                if op == "run":
                    options = _options(args)
                    part = self.registry.check_queries(bank, vectors, inputs["CLAMP"])
                    key = (bank, options.steps, options.step_size, options.tolerance, options.trace)
                    groups.setdefault(key, []).append((index, part))
                    continue
                self._run_groups(groups, answers)
                answers[index] = self._single(op, bank, args, vectors)
            except Exception as exc:  # every failure, bugs included, is this request's answer alone
                answers[index] = exc
        self._run_groups(groups, answers)
        return answers

    def _run_groups(self, groups: dict[tuple, list[tuple[int, Any]]], answers: list) -> None:
        for (bank, *options), members in groups.items():
            try:
                split = self.registry.run_batch(bank, [part for _, part in members], DynamicsOptions(*options))
                for (index, _), results in zip(members, split):
                    answers[index] = encode_results(results)
            except Exception as exc:  # as in the embedded backend, a failed batch fails all its requests
                for index, _ in members:
                    answers[index] = exc
        groups.clear()

    def _single(self, op: str, bank: str, args: dict, vectors: np.ndarray) -> Outputs:
        registry = self.registry
        if op == "create":
            result = asdict(registry.create(bank, args.get("kind"), args.get("dim"), args.get("params")))
        elif op == "list":
            result = [asdict(info) for info in registry.list()]
        elif op == "info":
            result = asdict(registry.info(bank))
        elif op == "delete":
            registry.delete(bank)
            result = {}
        elif op == "store":
            ids, count = registry.store_patterns(bank, vectors, args.get("ids"))
            result = {"ids": ids, "count": count}
        elif op == "delete_pattern":
            registry.delete_pattern(bank, args.get("id"))
            result = {}
        else:
            raise InvalidArgument(f"unknown op {op!r}; expected one of {', '.join(OPS)}", field="op")
        return {"STATES": NO_STATES, "RESULT": json_tensor(result)}


def _options(args: dict) -> DynamicsOptions:
    try:
        return DynamicsOptions(**args)
    except TypeError as exc:
        raise InvalidArgument(f"run ARGS: {exc}") from exc
