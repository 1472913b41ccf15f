"""The `associative_memory` model's request handling in-process (no Triton): grouping into batched
engine calls, per-request failures, and the error encoding the gateway decodes."""

from __future__ import annotations

import json

import numpy as np
import pytest
from tritonclient.utils import InferenceServerException

from service.backends.triton import service_error
from service.banks.registry import BankRegistry, DynamicsOptions, MemoryResults
from service.banks.store import SQLiteStore, open_store
from service.errors import (
    AlreadyExists,
    Conflict,
    InvalidArgument,
    NotFound,
    Overloaded,
    ServiceError,
    TooLarge,
    TooManyRequests,
    Unavailable,
)
from service.triton.associative_memory import RUN_OUTPUTS, AssociativeMemory, decode_results
from service.triton.wire import error_from_message, error_message

DIM = 16


def text(value: str) -> np.ndarray:
    return np.array([value.encode()], dtype=np.object_)


def request(op: str, bank: str = "", args: dict | None = None, vectors=None, clamp=None) -> dict:
    return {"OP": text(op), "BANK": text(bank), "ARGS": text(json.dumps(args or {})),
            "VECTORS": vectors, "CLAMP": clamp}


def run_request(bank: str, queries: np.ndarray, clamp=None, **options) -> dict:
    args = {"steps": None, "step_size": None, "tolerance": None, "trace": False, **options}
    return request("run", bank, args, queries, clamp)


def run_alone(registry: BankRegistry, bank: str, queries, clamp=None, options=DynamicsOptions()):
    """The same request checked and run on its own, as the embedded backend does."""
    return registry.run_batch(bank, [registry.check_queries(bank, queries, clamp)], options)[0]


def results(answer: dict) -> MemoryResults:
    return decode_results({name: answer[name] for name in RUN_OUTPUTS})


class CountingRegistry(BankRegistry):
    """Records the (bank, rows per request) of every batched engine call."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.batches: list[tuple[str, list[int]]] = []

    def run_batch(self, name, parts, options):
        self.batches.append((name, [len(queries) for queries, _ in parts]))
        return super().run_batch(name, parts, options)


@pytest.fixture()
def patterns() -> np.ndarray:
    return np.sign(np.random.default_rng(7).standard_normal((5, DIM))).astype(np.float32)


@pytest.fixture()
def registry(tmp_path, patterns) -> CountingRegistry:
    registry = CountingRegistry(SQLiteStore(tmp_path))
    for bank in ("a", "b"):
        registry.create(bank, "modern", DIM, {"beta": 4.0})
        registry.store_patterns(bank, patterns, [f"p{i}" for i in range(len(patterns))])
    return registry


def test_runs_share_one_engine_call_per_bank_and_options(registry, patterns):
    model = AssociativeMemory(registry)
    mask = np.zeros((1, DIM), dtype=bool)
    mask[0, :4] = True
    requests = [
        run_request("a", patterns[:2]),
        run_request("b", patterns[2:3]),
        run_request("a", patterns[3:4], clamp=mask),  # a completion joins the retrieves of its bank
        run_request("a", patterns[4:5], steps=1),  # other options: its own call
        run_request("a", patterns[:3]),
    ]
    answers = model.execute(requests)

    assert sorted(registry.batches) == [("a", [1]), ("a", [2, 1, 3]), ("b", [1])]
    for req, answer in zip(requests, answers):
        assert isinstance(answer, dict), answer
        got = results(answer)
        alone = run_alone(registry, req["BANK"][0].decode(), req["VECTORS"], req["CLAMP"],
                          DynamicsOptions(**json.loads(req["ARGS"][0])))
        assert got.nearest == alone.nearest
        np.testing.assert_allclose(got.states, alone.states, rtol=1e-5, atol=1e-6)
    completed = results(answers[2])
    np.testing.assert_array_equal(completed.states[0, :4], patterns[3, :4])  # clamped entries kept


def test_a_bad_request_fails_alone(registry, patterns):
    model = AssociativeMemory(registry)
    answers = model.execute([
        run_request("a", patterns[:1]),
        run_request("a", patterns[:1, :3]),  # wrong dimension
        run_request("missing", patterns[:1]),
        run_request("a", patterns[:1], clamp=np.ones((2, DIM), dtype=bool)),  # mask shape ≠ queries
        run_request("a", patterns[1:2]),
        request("teleport", "a"),
    ])
    assert isinstance(answers[0], dict) and isinstance(answers[4], dict)
    assert isinstance(answers[1], InvalidArgument) and answers[1].field == "queries"
    assert isinstance(answers[2], NotFound) and answers[2].field == "bank"
    assert isinstance(answers[3], InvalidArgument) and answers[3].field == "mask"
    assert isinstance(answers[5], InvalidArgument) and answers[5].field == "op"
    assert registry.batches == [("a", [1, 1])]


def test_requests_see_the_effects_of_earlier_ones_in_the_batch(registry, patterns):
    model = AssociativeMemory(registry)
    answers = model.execute([
        request("create", "c", {"kind": "modern", "dim": DIM, "params": {}}),
        request("store", "c", {"ids": ["x"]}, patterns[:1]),
        run_request("c", patterns[:1]),
        request("delete", "c"),
        run_request("c", patterns[:1]),
        request("info", "c"),
    ])
    assert json.loads(answers[0]["RESULT"][0])["name"] == "c"
    assert json.loads(answers[1]["RESULT"][0]) == {"ids": ["x"], "count": 1, "version": 1}
    assert results(answers[2]).nearest == ["x"]
    assert json.loads(answers[3]["RESULT"][0]) == {}
    assert isinstance(answers[4], NotFound) and isinstance(answers[5], NotFound)


def test_a_replica_answers_bank_info_for_writes_its_follower_has_not_applied(postgres_dsn, patterns):
    """Over a shared store, `info` adopts a bank created elsewhere since the last sync, and with
    min_version catches it up first: a gateway reads back at once the writes it just made."""
    writer = BankRegistry(open_store(postgres_dsn))
    replica = AssociativeMemory(BankRegistry(open_store(postgres_dsn)))  # no follower runs: it never syncs alone
    writer.create("late", "modern", DIM, {"beta": 4.0})
    [created] = replica.execute([request("info", "late")])
    assert json.loads(created["RESULT"][0])["count"] == 0
    _, _, version = writer.store_patterns("late", patterns, [f"p{i}" for i in range(len(patterns))])
    stale, current = replica.execute([request("info", "late"), request("info", "late", {"min_version": version})])
    assert json.loads(stale["RESULT"][0])["version"] == 0
    assert (json.loads(current["RESULT"][0])["version"], json.loads(current["RESULT"][0])["count"]) == (version, 5)


@pytest.mark.parametrize("options", [{"trace": True}, {"explain": True}])
def test_results_cross_the_wire_unchanged(registry, patterns, options):
    """The columns, sent as raw tensor bytes, decode to the exact MemoryResults the registry returned."""
    direct = run_alone(registry, "a", patterns[:3] * 0.5, options=DynamicsOptions(**options))
    [answer] = AssociativeMemory(registry).execute([run_request("a", patterns[:3] * 0.5, **options)])
    sent = {name: value if value.dtype == np.object_ else np.frombuffer(value.tobytes(), value.dtype).reshape(
        value.shape) for name, value in answer.items()}
    assert set(sent) == set(RUN_OUTPUTS)
    assert results(sent) == direct
    assert np.isnan(direct.trace).any() or direct.steps.min() == direct.steps.max()
    assert (direct.step_states is not None) == options.get("explain", False)


@pytest.mark.parametrize("error", [
    InvalidArgument("bad dim", field="dim"), NotFound("no bank", field="bank"),
    AlreadyExists("exists", field="bank"), Conflict("differs", field="ids[0]"), TooLarge("big", field="patterns"),
    Overloaded("full", retry_after=2.0), TooManyRequests("queue"), Unavailable("disk", retry_after=5.0),
    ServiceError("bug"),
])
def test_errors_round_trip(error):
    back = error_from_message(error_message(error))
    assert type(back) is type(error)
    assert (back.message, back.field) == (error.message, error.field)
    assert getattr(back, "retry_after", None) == getattr(error, "retry_after", None)


def test_unexpected_exceptions_are_internal_errors():
    back = error_from_message(error_message(ZeroDivisionError("division by zero")))
    assert type(back) is ServiceError and "ZeroDivisionError" in back.message


@pytest.mark.parametrize("message, status, expected", [
    ('{"code": "not_found", "field": "bank", "message": "bank \'x\' does not exist"}', "StatusCode.NOT_FOUND",
     NotFound),
    ("Exceeds maximum queue size", "StatusCode.UNAVAILABLE", Overloaded),
    ("failed to connect to all addresses", "StatusCode.UNAVAILABLE", Unavailable),
    ("Request for unknown model: 'associative_memory' is not found", "StatusCode.NOT_FOUND", Unavailable),
    ("Deadline Exceeded", "StatusCode.DEADLINE_EXCEEDED", Unavailable),
    ("unexpected shape for input 'OP'", "StatusCode.INVALID_ARGUMENT", ServiceError),
])
def test_triton_failures_map_to_service_errors(message, status, expected):
    error = service_error(InferenceServerException(msg=message, status=status))
    assert type(error) is expected
    if expected is NotFound:
        assert error.field == "bank" and error.message == "bank 'x' does not exist"
