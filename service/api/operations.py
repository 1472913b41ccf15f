"""One function per public operation: pydantic request in, pydantic response out, one backend call.

REST routes and gRPC handlers are thin adapters around these, so both transports validate, answer and
fail in exactly the same way.
"""

from __future__ import annotations

import contextlib
import functools
import time
import uuid
from collections import Counter
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass

import numpy as np

from service import metrics
from service.api import schemas
from service.backends.base import Backend
from service.banks.registry import BankInfo, DynamicsOptions, check_bank_name
from service.engines.lm.sampling import SamplingParams
from service.engines.memory.base import MAX_DIM
from service.errors import InvalidArgument, NotFound, TooLarge, TooManyRequests, Unavailable

OPENAI_FINISH = {"stop": "stop", "length": "length", "deadline": "length", "cancelled": "stop"}


@dataclass(frozen=True)
class Limits:
    """Per-request limits beyond the schema's hard bounds (each a setting; see service/config.py)."""

    max_vectors: int = 10_000
    max_dim: int = MAX_DIM
    max_new_tokens: int = 2048
    max_streams_per_tenant: int = 8
    max_prompt_chars: int = 32_768  # checked before tokenising, which is slow on long prompts


class Operations:
    def __init__(self, backend: Backend, limits: Limits = Limits()):
        self.backend = backend
        self.limits = limits
        self._streams: Counter[str | None] = Counter()  # generations in progress per tenant
        self._writes = RecentWrites()

    async def create_bank(self, tenant: str | None, bank: str, request: schemas.CreateBank) -> BankInfo:
        if request.dim > self.limits.max_dim:
            raise InvalidArgument(f"dim {request.dim} exceeds this service's limit of {self.limits.max_dim}", field="dim")
        info = await self.backend.create_bank(qualified(tenant, bank), request.kind, request.dim, request.params)
        return visible(info)

    async def list_banks(self, tenant: str | None) -> schemas.BankList:
        prefix = "" if tenant is None else f"{tenant}/"
        mine = [b for b in await self.backend.list_banks() if b.name.startswith(prefix) and "/" not in b.name[len(prefix):]]
        return schemas.BankList(banks=[visible(b) for b in mine])

    async def get_bank(self, tenant: str | None, bank: str) -> BankInfo:
        return visible(await self.backend.bank_info(qualified(tenant, bank)))

    async def delete_bank(self, tenant: str | None, bank: str) -> None:
        name = qualified(tenant, bank)
        await self.backend.delete_bank(name)
        self._writes.forget(name)  # a bank created again under this name starts again from version 0

    async def store(self, tenant: str | None, bank: str, request: schemas.StoreRequest) -> schemas.StoreResponse:
        name = qualified(tenant, bank)
        self._check_vector_count(request.patterns, "patterns")
        ids, count, version = await self.backend.store(name, np.asarray(request.patterns, dtype=np.float32),
                                                       request.ids)
        self._writes.remember(name, version)
        return schemas.StoreResponse(ids=ids, count=count, version=version)

    async def delete_pattern(self, tenant: str | None, bank: str, pattern_id: str) -> schemas.DeletePatternResponse:
        name = qualified(tenant, bank)
        version = await self.backend.delete_pattern(name, pattern_id)
        self._writes.remember(name, version)
        return schemas.DeletePatternResponse(version=version)

    async def retrieve(self, tenant: str | None, bank: str, request: schemas.RetrieveRequest
                       ) -> schemas.RetrieveResponse:
        return await self._run(qualified(tenant, bank), request, None)

    async def complete(self, tenant: str | None, bank: str, request: schemas.CompleteRequest
                       ) -> schemas.RetrieveResponse:
        return await self._run(qualified(tenant, bank), request, np.asarray(request.mask, dtype=bool))

    async def complete_image(self, request: schemas.CompleteImageRequest) -> schemas.CompleteImageResponse:
        image, trace = await self.backend.complete_image(
            np.asarray(request.image, dtype=np.float32), np.asarray(request.mask, dtype=bool), request.steps)
        return schemas.CompleteImageResponse(model=request.model, image=image.tolist(), energy_trace=trace.tolist())

    async def models(self) -> schemas.ModelList:
        return schemas.ModelList(data=[schemas.ModelCard(**card) for card in await self.backend.models()])

    # --- text generation -------------------------------------------------------------------

    async def start_generation(self, tenant: str | None,
                               request: schemas.GenerateRequest | schemas.CompletionsRequest) -> AsyncIterator[dict]:
        """Submit now (so a full queue or a too-long prompt fails before any byte is sent) and return
        the metered event stream; closing it early cancels the sequence."""
        if len(request.prompt) > self.limits.max_prompt_chars:
            raise TooLarge(f"prompt has {len(request.prompt)} characters, this service's limit is "
                           f"{self.limits.max_prompt_chars}", field="prompt")
        if request.max_tokens > self.limits.max_new_tokens:
            raise InvalidArgument(f"max_tokens exceeds this service's limit of {self.limits.max_new_tokens}",
                                  field="max_tokens")
        # On an open service every caller is the one tenant None: there the scheduler's bounded queue
        # alone admits, as in vLLM or TGI, instead of a per-caller cap on the whole service.
        if tenant is not None and self._streams[tenant] >= self.limits.max_streams_per_tenant:
            metrics.REJECTIONS.labels(reason="tenant_streams").inc()
            raise TooManyRequests(f"{self._streams[tenant]} generations already in progress for this caller "
                                  f"(limit {self.limits.max_streams_per_tenant})", retry_after=1.0)
        params = SamplingParams(max_tokens=request.max_tokens, temperature=request.temperature,
                                top_k=getattr(request, "top_k", 0), top_p=request.top_p, seed=request.seed,
                                stop=request.stop_strings(), logprobs=request.logprobs or 0)
        self._streams[tenant] += 1
        release = functools.partial(self._streams.subtract, [tenant])
        try:
            events = self._metered(await self.backend.generate(request.prompt, params, getattr(request, "timeout", None)))
            # Wait for the first event: its failure is still an error response, and a started stream
            # is cancelled by the event loop's async-generator finaliser even if nobody closes it.
            first = await anext(events)
        except BaseException:
            release()
            raise
        return GenerationStream(first, events, release)

    async def _metered(self, events: AsyncIterator[dict]) -> AsyncIterator[dict]:
        started = last = time.perf_counter()
        first = True
        async with contextlib.aclosing(events):
            async for event in events:
                now = time.perf_counter()
                if event["type"] == "token":
                    (metrics.TIME_TO_FIRST_TOKEN if first else metrics.INTER_TOKEN_LATENCY).labels("llm").observe(
                        now - last)
                    first, last = False, now
                else:
                    if event["finish_reason"] == "error":
                        raise Unavailable(f"generation failed: {event['error']}")
                    metrics.GENERATION_DURATION.labels("llm", event["finish_reason"]).observe(now - started)
                    metrics.PROMPT_TOKENS.labels("llm").inc(event["usage"]["prompt_tokens"])
                    metrics.GENERATED_TOKENS.labels("llm").inc(event["usage"]["completion_tokens"])
                yield event

    async def generate(self, tenant: str | None, request: schemas.GenerateRequest) -> schemas.GenerateResponse:
        return await collect(await self.start_generation(tenant, request))

    @staticmethod
    def generate_chunk(event: dict) -> dict:
        """One SSE event of /v1/generate."""
        if event["type"] == "token":
            chunk = {"text": event["text"], "token_id": event["token_id"]}
            if event["logprobs"] is not None:
                chunk["logprobs"] = event["logprobs"]
            return chunk
        return {"text": event["text"], "finish_reason": event["finish_reason"], "usage": event["usage"]}

    async def check_lm(self, name: str) -> None:
        served = [m["id"] for m in await self.backend.models() if m["task"] == "text-generation"]
        if name not in served:
            raise NotFound(f"model '{name}' is not served; text models: {', '.join(served) or 'none'}", field="model")

    async def completions(self, tenant: str | None, request: schemas.CompletionsRequest) -> dict:
        """OpenAI text_completion object."""
        response = await collect(await self.start_generation(tenant, request))
        return completion_object(request.model, choice={
            "text": response.text, "index": 0, "finish_reason": OPENAI_FINISH.get(response.finish_reason, "stop"),
            "logprobs": openai_logprobs(response.logprobs)}, usage=response.usage.model_dump())

    @staticmethod
    def completion_chunk(model: str, completion_id: str, event: dict) -> dict:
        """One streamed text_completion chunk."""
        if event["type"] == "token":
            logprobs = openai_logprobs([schemas.TokenLogprob(**event["logprobs"])]) if event["logprobs"] else None
            choice = {"text": event["text"], "index": 0, "finish_reason": None, "logprobs": logprobs}
            return completion_object(model, choice, completion_id=completion_id)
        choice = {"text": event["text"], "index": 0, "logprobs": None,
                  "finish_reason": OPENAI_FINISH.get(event["finish_reason"], "stop")}
        return completion_object(model, choice, completion_id=completion_id, usage=event["usage"])

    async def _run(self, bank: str, request: schemas.DynamicsRequest, clamp: np.ndarray | None
                   ) -> schemas.RetrieveResponse:
        self._check_vector_count(request.queries, "queries")
        options = DynamicsOptions(request.steps, request.step_size, request.tolerance, request.trace)
        min_version = max(request.min_version or 0, self._writes.version(bank))
        results = await self.backend.run_memory(bank, np.asarray(request.queries, dtype=np.float32), clamp, options,
                                                min_version)
        steps = metrics.RETRIEVE_STEPS.labels("associative_memory")
        for count in results.steps.tolist():
            steps.observe(count)
        return schemas.RetrieveResponse.from_results(results, request.encoding_format)

    def _check_vector_count(self, vectors: list, field: str) -> None:
        if len(vectors) > self.limits.max_vectors:
            raise InvalidArgument(f"{field}: {len(vectors)} vectors exceed the limit of {self.limits.max_vectors} "
                                  "per request", field=field)


class RecentWrites:
    """The bank versions this gateway's own writes produced in the last `window` seconds: a read of
    the same bank (the same tenant's, as names are qualified) then asks for at least that version, so
    a client reads its writes through this gateway without passing min_version itself."""

    def __init__(self, window: float = 10.0, max_banks: int = 10_000):
        self.window = window
        self.max_banks = max_banks
        self._latest: dict[str, tuple[int, float]] = {}  # bank → (version, when written)

    def remember(self, bank: str, version: int) -> None:
        now = time.monotonic()
        if len(self._latest) >= self.max_banks:  # bounded: forget what is past the window
            self._latest = {b: entry for b, entry in self._latest.items() if now - entry[1] < self.window}
        previous = self._latest.get(bank, (0, 0.0))[0]
        self._latest[bank] = (max(version, previous), now)

    def forget(self, bank: str) -> None:
        self._latest.pop(bank, None)

    def version(self, bank: str) -> int:
        version, when = self._latest.get(bank, (0, 0.0))
        return version if time.monotonic() - when < self.window else 0


class GenerationStream:
    """A started generation's events; gives its per-tenant stream slot back exactly once — when the
    events run out, when closed, or when dropped unread."""

    def __init__(self, first: dict, events: AsyncIterator[dict], release: Callable[[], None]):
        self._first: dict | None = first
        self._events = events
        self._release: Callable[[], None] | None = release

    def __aiter__(self) -> "GenerationStream":
        return self

    async def __anext__(self) -> dict:
        if self._first is not None:
            event, self._first = self._first, None
            return event
        try:
            return await anext(self._events)
        except BaseException:
            self._done()
            raise

    async def aclose(self) -> None:
        self._done()
        await self._events.aclose()

    def _done(self) -> None:
        if self._release is not None:
            self._release, release = None, self._release
            release()

    def __del__(self) -> None:
        self._done()


async def collect(events: AsyncIterator[dict]) -> schemas.GenerateResponse:
    """A whole generation from its event stream."""
    text, tokens, logprobs, finish = [], [], [], None
    async for event in events:
        text.append(event["text"])
        if event["type"] == "token":
            tokens.append(event["token_id"])
            if event["logprobs"] is not None:
                logprobs.append(event["logprobs"])
        else:
            finish = event
    return schemas.GenerateResponse(text="".join(text), tokens=tokens, finish_reason=finish["finish_reason"],
                                    usage=finish["usage"], logprobs=logprobs or None)


def completion_object(model: str, choice: dict, *, completion_id: str | None = None, usage: dict | None = None) -> dict:
    body = {"id": completion_id or f"cmpl-{uuid.uuid4().hex}", "object": "text_completion",
            "created": int(time.time()), "model": model, "choices": [choice]}
    if usage is not None:
        body["usage"] = usage
    return body


def openai_logprobs(logprobs: list[schemas.TokenLogprob] | None) -> dict | None:
    """Our per-token alternatives in the OpenAI completions `logprobs` shape."""
    if not logprobs:
        return None
    offsets, position = [], 0
    for entry in logprobs:
        offsets.append(position)
        position += len(entry.token)
    return {"tokens": [e.token for e in logprobs], "token_logprobs": [e.logprob for e in logprobs],
            "top_logprobs": [{alt.token: alt.logprob for alt in e.top} for e in logprobs], "text_offset": offsets}


def qualified(tenant: str | None, bank: str) -> str:
    """The stored name of a tenant's bank: tenants never see, or reach, each other's banks."""
    check_bank_name(bank)
    return bank if tenant is None else f"{tenant}/{bank}"


def visible(info: BankInfo) -> BankInfo:
    """The bank as its tenant sees it: without the tenant prefix."""
    return info.model_copy(update={"name": info.name.rpartition("/")[2]})
