"""Locust load profile for amserve: REST and gRPC users with a realistic mix of operations.

Run it through `loadtest/run_locust.py` (starts a local server, bounds the run, checks thresholds), or
by hand against any deployment:

    locust -f loadtest/locustfile.py --headless -u 20 -r 5 --run-time 2m \
           --host http://127.0.0.1:8000 --grpc-target 127.0.0.1:8001

Mix per user (task weights): many retrieves, fewer bank completions and stores, a few Energy
Transformer image completions, few generations (JSON and SSE). Every user owns one bank, created in
on_start (409 / ALREADY_EXISTS means it is there already) and seeded with a few patterns so that
retrieve never meets an empty bank. Patterns are a deterministic function of (bank, id), so storing an
id again is an idempotent no-op, a re-run reuses the same banks, and a user stops growing its bank past
`--max-patterns`.

Tags select parts of the mix: `memory` (banks), `image` (Energy Transformer), `generate` (LM); e.g.
`--exclude-tags generate` against a deployment without an LM.

This file is only ever loaded by Locust (which monkey-patches the process with gevent): the service
and the test suite never import it.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import math
import os
import random
import sys
import time
from pathlib import Path

import grpc
import grpc.experimental.gevent as grpc_gevent
from locust import HttpUser, User, events, tag, task

# gRPC's own polling must yield to gevent, or one blocking call stalls every user in this process.
# Must run after gevent's monkey-patching (done by importing locust) and before any channel exists.
grpc_gevent.init_gevent()

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from service.api.pb import amserve_pb2 as pb  # noqa: E402
from service.api.pb import amserve_pb2_grpc as pb_grpc  # noqa: E402

PROMPTS = [
    "The capital of France is",
    "Write one sentence about the sea.",
    "List three prime numbers:",
    "Associative memories store patterns so that",
    "Q: What is 2 + 2?\nA:",
]
SEED_PATTERNS = 8      # stored by on_start, so retrieve/complete always have something to find
STORE_BATCH = 4        # patterns per store request
IMAGE_SIDE = 8

# Names under which requests appear in Locust's statistics (and so in the CSV / HTML report).
BANK_ROUTE = "/v1/banks/{bank}"
STORE_ROUTE = "/v1/banks/{bank}/store"
RETRIEVE_ROUTE = "/v1/banks/{bank}/retrieve"
COMPLETE_ROUTE = "/v1/banks/{bank}/complete"
IMAGE_ROUTE = "/v1/complete"
GENERATE_ROUTE = "/v1/generate"
GENERATE_SSE = "/v1/generate (stream)"
GENERATE_TTFT = "/v1/generate (stream) first token"


@events.init_command_line_parser.add_listener
def _add_options(parser) -> None:
    group = parser.add_argument_group("amserve")
    group.add_argument("--grpc-target", default=os.environ.get("AMSERVE_GRPC_TARGET", "127.0.0.1:8001"),
                       help="gRPC host:port of the gateway (default 127.0.0.1:8001)")
    group.add_argument("--api-key", default=os.environ.get("AMSERVE_API_KEY", ""),
                       help="sent as 'Authorization: Bearer <key>' when set (env AMSERVE_API_KEY)")
    group.add_argument("--bank-prefix", default="lt", help="banks are named <prefix>-<transport>-<kind>-d<dim>-<n>")
    group.add_argument("--bank-kind", default="modern", choices=["modern", "rbf", "drdam"],
                       help="kind of the users' banks (real-valued kinds)")
    group.add_argument("--dim", type=int, default=32, help="pattern dimension")
    group.add_argument("--max-patterns", type=int, default=2000, help="patterns per user bank before stores repeat")
    group.add_argument("--max-tokens", type=int, default=8, help="tokens per generation request")
    group.add_argument("--think-min-ms", type=float, default=50.0, help="shortest pause between tasks")
    group.add_argument("--think-max-ms", type=float, default=500.0, help="longest pause between tasks")
    group.add_argument("--request-timeout", type=float, default=60.0, help="seconds before a call is a failure")
    group.add_argument("--cover-all", action="store_true",
                       help="each user runs every (tag-selected) task once in on_start, then the weighted mix: "
                            "short runs then report every request type")


# --------------------------------------------------------------------------------------------- data

def pattern(bank: str, pattern_id: str, dim: int) -> list[float]:
    """Unit-norm Gaussian vector, a pure function of (bank, id): storing it twice is a no-op."""
    seed = int.from_bytes(hashlib.blake2b(f"{bank}/{pattern_id}".encode(), digest_size=8).digest(), "big")
    rng = random.Random(seed)
    v = [rng.gauss(0.0, 1.0) for _ in range(dim)]
    norm = math.sqrt(sum(x * x for x in v)) or 1.0
    return [x / norm for x in v]


def noisy(v: list[float], rng: random.Random, sigma: float = 0.1) -> list[float]:
    return [x + rng.gauss(0.0, sigma) for x in v]


def half_mask(dim: int) -> list[bool]:
    """First half known (clamped), second half to complete."""
    return [i < dim // 2 for i in range(dim)]


def _load_images() -> list[list[list[float]]]:
    """A few 8×8 digits in [0,1] (scikit-learn's bundled set), or seeded random images without it."""
    try:
        from sklearn.datasets import load_digits

        return [(img / 16.0).tolist() for img in load_digits().images[:32]]
    except Exception:  # noqa: BLE001 - any failure: synthetic images do as well for load
        rng = random.Random(0)
        return [[[round(rng.random() * 16) / 16 for _ in range(IMAGE_SIDE)] for _ in range(IMAGE_SIDE)]
                for _ in range(32)]


IMAGES = _load_images()
MASKS = [  # true = missing pixel: bottom half, right half, top-left quarter
    [[r >= IMAGE_SIDE // 2 for _ in range(IMAGE_SIDE)] for r in range(IMAGE_SIDE)],
    [[c >= IMAGE_SIDE // 2 for c in range(IMAGE_SIDE)] for _ in range(IMAGE_SIDE)],
    [[r < IMAGE_SIDE // 2 and c < IMAGE_SIDE // 2 for c in range(IMAGE_SIDE)] for r in range(IMAGE_SIDE)],
]

_user_numbers = itertools.count()


class BankState:
    """The patterns one user has stored in its bank."""

    def __init__(self, name: str, dim: int, limit: int):
        self.name, self.dim, self.limit = name, dim, limit
        self.count = 0  # ids p0 .. p{count-1} are stored
        self.rng = random.Random(name)

    def next_batch(self, size: int) -> tuple[list[str], list[list[float]]]:
        if self.count + size <= self.limit:
            ids = [f"p{self.count + i}" for i in range(size)]
        else:  # full: store existing ids again (idempotent), keeping the bank's size bounded
            start = self.rng.randrange(0, max(1, self.limit - size))
            ids = [f"p{start + i}" for i in range(size)]
        return ids, [pattern(self.name, i, self.dim) for i in ids]

    def stored(self, ids: list[str]) -> None:
        self.count = max(self.count, max(int(i[1:]) for i in ids) + 1)

    def some_stored(self) -> list[float]:
        return pattern(self.name, f"p{self.rng.randrange(self.count)}", self.dim)


def _cover_all(user) -> None:
    """Every task of the user's (tag-filtered) task list once, in declaration order."""
    if user.environment.parsed_options and user.environment.parsed_options.cover_all:
        for run_task in dict.fromkeys(user.tasks):
            run_task(user)


class App(User):
    """What the REST and gRPC users share: a think time between tasks, the run's options, a bank of
    their own, created at start with SEED_PATTERNS in it, and the store task. Each transport
    connects, creates the bank and stores in its own way."""

    abstract = True
    transport: str

    def wait_time(self) -> float:
        options = self.environment.parsed_options
        lo, hi = (options.think_min_ms, options.think_max_ms) if options else (50.0, 500.0)
        return random.uniform(lo, max(lo, hi)) / 1000.0

    def on_start(self) -> None:
        o = self.options = self.environment.parsed_options
        self.timeout = o.request_timeout
        self.bank = BankState(f"{o.bank_prefix}-{self.transport}-{o.bank_kind}-d{o.dim}-{next(_user_numbers)}",
                              o.dim, o.max_patterns)
        self._connect()
        self._create_bank()
        self._store(SEED_PATTERNS)
        _cover_all(self)

    @tag("memory")
    @task(10)
    def retrieve(self) -> None:
        """From a noisy copy of a stored pattern."""
        if not self.bank.count:
            return self._store(SEED_PATTERNS)
        self._retrieve(noisy(self.bank.some_stored(), self.bank.rng))

    @tag("memory")
    @task(3)
    def complete(self) -> None:
        """A stored pattern whose second half is unknown (zeros)."""
        if not self.bank.count:
            return self._store(SEED_PATTERNS)
        mask = half_mask(self.bank.dim)
        self._complete([x if known else 0.0 for x, known in zip(self.bank.some_stored(), mask)], mask)

    @tag("memory")
    @task(2)
    def store(self) -> None:
        self._store(STORE_BATCH)


# --------------------------------------------------------------------------------------------- REST

class RestUser(App, HttpUser):
    """An app talking JSON over HTTP."""

    weight = 3
    transport = "rest"

    def _connect(self) -> None:
        if self.options.api_key:
            self.client.headers["Authorization"] = f"Bearer {self.options.api_key}"

    def _create_bank(self) -> None:
        o = self.options
        with self.client.put(f"/v1/banks/{self.bank.name}", json={"kind": o.bank_kind, "dim": o.dim},
                             name=BANK_ROUTE, catch_response=True, timeout=self.timeout) as r:
            if r.status_code in (201, 409):
                r.success()
            else:
                r.failure(f"create bank: {r.status_code} {r.text[:200]}")

    def _store(self, size: int) -> None:
        ids, patterns = self.bank.next_batch(size)
        with self.client.post(f"/v1/banks/{self.bank.name}/store", json={"ids": ids, "patterns": patterns},
                              name=STORE_ROUTE, catch_response=True, timeout=self.timeout) as r:
            if r.status_code == 200 and r.json().get("ids") == ids:
                self.bank.stored(ids)
                r.success()
            else:
                r.failure(f"store: {r.status_code} {r.text[:200]}")

    def _post(self, path: str, body: dict, route: str, what: str, expected: str, holds) -> None:
        """POST `body`; a failure unless the answer is 200 and `holds(answer body)`."""
        with self.client.post(path, json=body, name=route, catch_response=True, timeout=self.timeout) as r:
            if r.status_code != 200:
                r.failure(f"{what}: {r.status_code} {r.text[:200]}")
            elif not holds(r.json()):
                r.failure(f"{what}: expected {expected}")

    def _retrieve(self, query: list[float]) -> None:
        self._post(f"/v1/banks/{self.bank.name}/retrieve", {"queries": [query], "steps": 10},
                   RETRIEVE_ROUTE, "retrieve", "one result", lambda answer: len(answer.get("results", [])) == 1)

    def _complete(self, query: list[float], mask: list[bool]) -> None:
        self._post(f"/v1/banks/{self.bank.name}/complete", {"queries": [query], "mask": [mask], "steps": 10},
                   COMPLETE_ROUTE, "complete", "one result", lambda answer: len(answer.get("results", [])) == 1)

    @tag("image")
    @task(2)
    def complete_image(self) -> None:
        image, mask = random.choice(IMAGES), random.choice(MASKS)
        self._post(IMAGE_ROUTE, {"model": "energy-transformer", "image": image, "mask": mask}, IMAGE_ROUTE,
                   "complete image", "an 8×8 image", lambda answer: len(answer.get("image", [])) == IMAGE_SIDE)

    def _generation(self, stream: bool) -> dict:
        return {"prompt": random.choice(PROMPTS), "max_tokens": self.options.max_tokens, "temperature": 0.7,
                "top_p": 0.95, "seed": random.randrange(2**31), "stream": stream}

    @tag("generate")
    @task(1)
    def generate(self) -> None:
        with self.client.post(GENERATE_ROUTE, json=self._generation(False), name=GENERATE_ROUTE,
                              catch_response=True, timeout=self.timeout) as r:
            if r.status_code != 200:
                r.failure(f"generate: {r.status_code} {r.text[:200]}")
            elif not r.json().get("finish_reason"):
                r.failure("generate: no finish_reason")

    @tag("generate")
    @task(1)
    def generate_stream(self) -> None:
        """SSE: the request's time is the whole stream (not just the headers); the time to the first
        token is reported as its own entry."""
        started = time.perf_counter()
        first_token_ms = None
        with self.client.post(GENERATE_ROUTE, json=self._generation(True), name=GENERATE_SSE, stream=True,
                              catch_response=True, timeout=self.timeout) as r:
            if r.status_code != 200:
                r.failure(f"generate stream: {r.status_code} {r.text[:200]}")
                return
            finish, done, size = None, False, 0
            try:
                for line in r.iter_lines(decode_unicode=True):
                    size += len(line) + 1
                    if not line or not line.startswith("data: "):
                        continue
                    data = line[len("data: "):]
                    if data == "[DONE]":
                        done = True
                        break
                    event = json.loads(data)
                    if first_token_ms is None and "token_id" in event:
                        first_token_ms = (time.perf_counter() - started) * 1000
                    finish = event.get("finish_reason") or finish
            except Exception as exc:  # noqa: BLE001 - a broken stream is a failed request
                r.failure(f"generate stream broke: {exc!r}")
                return
            r.request_meta["response_time"] = (time.perf_counter() - started) * 1000
            r.request_meta["response_length"] = size
            if not (done and finish):
                r.failure(f"generate stream: done={done} finish_reason={finish!r}")
                return
        if first_token_ms is not None:
            self.environment.events.request.fire(request_type="SSE", name=GENERATE_TTFT,
                                                 response_time=first_token_ms, response_length=0,
                                                 exception=None, context={})


# --------------------------------------------------------------------------------------------- gRPC

class GrpcUser(App, User):
    """An app using the gRPC API (amserve.v1.Amserve) through a gevent-friendly channel."""

    weight = 1
    transport = "grpc"

    def _connect(self) -> None:
        o = self.options
        self.metadata = [("authorization", f"Bearer {o.api_key}")] if o.api_key else []
        self.channel = grpc.insecure_channel(o.grpc_target)
        self.stub = pb_grpc.AmserveStub(self.channel)

    def _create_bank(self) -> None:
        o = self.options
        self._call("CreateBank", self.stub.CreateBank,
                   pb.CreateBankRequest(bank=self.bank.name, kind=o.bank_kind, dim=o.dim),
                   ok_codes=(grpc.StatusCode.ALREADY_EXISTS,))

    def on_stop(self) -> None:
        self.channel.close()

    def _fire(self, name: str, started: float, length: int, exception: Exception | None) -> None:
        self.environment.events.request.fire(request_type="grpc", name=name,
                                             response_time=(time.perf_counter() - started) * 1000,
                                             response_length=length, exception=exception, context={})

    def _call(self, name: str, method, request, ok_codes=()):
        """One unary call, reported to Locust; returns the reply or None."""
        started = time.perf_counter()
        try:
            reply = method(request, metadata=self.metadata, timeout=self.timeout)
        except grpc.RpcError as exc:
            if exc.code() in ok_codes:
                self._fire(name, started, 0, None)
            else:
                self._fire(name, started, 0, exc)
            return None
        self._fire(name, started, reply.ByteSize(), None)
        return reply

    def _store(self, size: int) -> None:
        ids, patterns = self.bank.next_batch(size)
        reply = self._call("Store", self.stub.Store, pb.StoreRequest(
            bank=self.bank.name, ids=ids, patterns=[pb.Vector(values=p) for p in patterns]))
        if reply is not None:
            self.bank.stored(ids)

    def _retrieve(self, query: list[float]) -> None:
        self._call("Retrieve", self.stub.Retrieve,
                   pb.RetrieveRequest(bank=self.bank.name, queries=[pb.Vector(values=query)], steps=10))

    def _complete(self, query: list[float], mask: list[bool]) -> None:
        self._call("Complete", self.stub.Complete, pb.CompleteRequest(
            bank=self.bank.name, queries=[pb.Vector(values=query)], mask=[pb.Mask(values=mask)], steps=10))

    @tag("image")
    @task(2)
    def complete_image(self) -> None:
        image, mask = random.choice(IMAGES), random.choice(MASKS)
        self._call("CompleteImage", self.stub.CompleteImage, pb.CompleteImageRequest(
            model="energy-transformer", image=[pb.Vector(values=row) for row in image],
            mask=[pb.Mask(values=row) for row in mask]))

    @tag("generate")
    @task(1)
    def generate(self) -> None:
        """Server-streaming: timed to the last chunk, which must carry the finish reason."""
        started = time.perf_counter()
        request = pb.GenerateRequest(prompt=random.choice(PROMPTS), max_tokens=self.options.max_tokens,
                                     temperature=0.7, top_p=0.95, seed=random.randrange(2**31))
        size, finish = 0, ""
        try:
            for chunk in self.stub.Generate(request, metadata=self.metadata, timeout=self.timeout):
                size += chunk.ByteSize()
                finish = chunk.finish_reason or finish
        except grpc.RpcError as exc:
            return self._fire("Generate", started, size, exc)
        self._fire("Generate", started, size, None if finish else RuntimeError("stream ended without finish_reason"))
