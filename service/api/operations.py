"""One function per public operation: pydantic request in, pydantic response out, one backend call.

REST routes and gRPC handlers are thin adapters around these, so both transports validate, answer and
fail in exactly the same way.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import itertools
import time
import uuid
from collections import Counter
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass

import numpy as np

from service import metrics
from service.api import schemas
from service.backends.base import Backend
from service.banks.registry import BankInfo, DynamicsOptions, Fidelity, check_bank_name
from service.engines.lm.sampling import SamplingParams
from service.engines.memory import KINDS
from service.engines.memory.base import MAX_DIM
from service.errors import InvalidArgument, NotFound, TooLarge, TooManyRequests, Unavailable
from service.serving.scheduler import Chat, Prompt

RETRIEVE_STEPS = metrics.RETRIEVE_STEPS.labels("associative_memory")  # looked up once: labels() costs more than observe()
OPENAI_FINISH = {"stop": "stop", "length": "length", "deadline": "length", "cancelled": "stop"}


@dataclass(frozen=True)
class Limits:
    """Per-request limits beyond the schema's hard bounds (each a setting; see service/config.py)."""

    max_vectors: int = 10_000
    max_dim: int = MAX_DIM
    max_new_tokens: int = 2048
    max_streams_per_tenant: int = 8
    max_prompt_chars: int = 32_768  # checked before tokenising, which is slow on long prompts
    max_choices: int = 16  # generations one completions request may start: prompts × n
    max_explain_states: int = 10_000  # explained retrieval: queries × (steps + 1)
    max_attention_weights: int = 4_000_000  # /v1/explain: layers × heads × tokens²


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
        name = qualified(tenant, bank)
        return visible(await self.backend.bank_info(name, self._writes.version(name)))

    async def fidelity(self, tenant: str | None, bank: str, sample_size: int, noise: float) -> Fidelity:
        return await self.backend.bank_fidelity(qualified(tenant, bank), sample_size, noise)

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
        if request.explain:
            frames, attention, hopfield = await self.backend.explain_image(
                np.asarray(request.image, dtype=np.float32), np.asarray(request.mask, dtype=bool), request.steps)
            return schemas.CompleteImageResponse.explained(request.model, frames, attention, hopfield)
        image, trace = await self.backend.complete_image(
            np.asarray(request.image, dtype=np.float32), np.asarray(request.mask, dtype=bool), request.steps)
        return schemas.CompleteImageResponse(model=request.model, image=image.tolist(), energy_trace=trace.tolist())

    async def models(self) -> schemas.ModelList:
        return schemas.ModelList(data=[schemas.ModelCard(**card) for card in await self.backend.models()])

    # --- text generation -------------------------------------------------------------------

    async def start_generation(self, tenant: str | None, request: schemas.GenerateRequest) -> GenerationStream:
        """Submit now (so a full queue or a too-long prompt fails before any byte is sent) and return
        the metered event stream; closing it early cancels the sequence."""
        self._check_prompt_chars(len(request.prompt), "prompt")
        params = SamplingParams(max_tokens=request.max_tokens, temperature=request.temperature, top_k=request.top_k,
                                top_p=request.top_p, seed=request.seed, stop=request.stop_strings(),
                                logprobs=request.logprobs or 0)
        [stream] = await self._start_generations(tenant, [request.prompt], [params], request.timeout)
        return stream

    async def _start_generations(self, tenant: str | None, prompts: list[Prompt], params: list[SamplingParams],
                                 timeout: float | None = None) -> list[GenerationStream]:
        """prompts[i] with params[i], all submitted at once so the scheduler batches them; either all
        start or none does."""
        if any(p.max_tokens > self.limits.max_new_tokens for p in params):
            raise InvalidArgument(f"max_tokens exceeds this service's limit of {self.limits.max_new_tokens}",
                                  field="max_tokens")
        # On an open service every caller is the one tenant None: there the scheduler's bounded queue
        # alone admits, as in vLLM or TGI, instead of a per-caller cap on the whole service.
        if tenant is not None and self._streams[tenant] + len(prompts) > self.limits.max_streams_per_tenant:
            metrics.REJECTIONS.labels(reason="tenant_streams").inc()
            raise TooManyRequests(f"{self._streams[tenant]} generations already in progress for this caller, "
                                  f"{len(prompts)} more asked (limit {self.limits.max_streams_per_tenant})",
                                  retry_after=1.0)
        started = await asyncio.gather(*(self._start_one(tenant, prompt, p, timeout)
                                         for prompt, p in zip(prompts, params)), return_exceptions=True)
        failures = [outcome for outcome in started if isinstance(outcome, BaseException)]
        if failures:
            for outcome in started:
                if isinstance(outcome, GenerationStream):
                    await outcome.aclose()
            raise failures[0]
        return started

    async def _start_one(self, tenant: str | None, prompt: Prompt, params: SamplingParams,
                         timeout: float | None) -> GenerationStream:
        self._streams[tenant] += 1
        release = functools.partial(self._streams.subtract, [tenant])
        try:
            events = self._metered(await self.backend.generate(prompt, params, timeout))
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
                elif event["type"] == "finish":
                    if event["finish_reason"] == "error":
                        raise Unavailable(f"generation failed: {event['error']}")
                    metrics.GENERATION_DURATION.labels("llm", event["finish_reason"]).observe(now - started)
                    metrics.PROMPT_TOKENS.labels("llm").inc(event["usage"]["prompt_tokens"])
                    metrics.GENERATED_TOKENS.labels("llm").inc(event["usage"]["completion_tokens"])
                yield event

    async def generate(self, tenant: str | None, request: schemas.GenerateRequest) -> schemas.GenerateResponse:
        done = await collect(await self.start_generation(tenant, request))
        return schemas.GenerateResponse(text=done.text, tokens=done.tokens, finish_reason=done.finish_reason,
                                        usage=done.usage, logprobs=done.logprobs or None)

    async def stream_generate(self, tenant: str | None, request: schemas.GenerateRequest) -> AsyncIterator[dict]:
        """The /v1/generate chunks (started: refusals are raised here)."""
        events = await self.start_generation(tenant, request)

        async def chunks() -> AsyncIterator[dict]:
            async with contextlib.aclosing(events):
                async for event in events:
                    yield self.generate_chunk(event)
        return chunks()

    @staticmethod
    def generate_chunk(event: dict) -> dict:
        """One SSE event of /v1/generate."""
        if event["type"] == "token":
            chunk = {"text": event["text"], "token_id": event["token_id"]}
            if event["logprobs"] is not None:
                chunk["logprobs"] = event["logprobs"]
            return chunk
        return {"text": event["text"], "finish_reason": event["finish_reason"], "usage": event["usage"]}

    async def explain_text(self, request: schemas.ExplainTextRequest) -> schemas.ExplainTextResponse:
        self._check_prompt_chars(len(request.prompt), "prompt")
        params = SamplingParams(temperature=request.temperature, top_k=request.top_k, top_p=request.top_p)
        model, explained = await self.backend.explain_text(request.prompt, params, request.top_n, request.layers,
                                                           request.heads, self.limits.max_attention_weights)
        return schemas.ExplainTextResponse.of(model, explained)

    async def check_lm(self, name: str) -> None:
        served = [m["id"] for m in await self.backend.models() if m["task"] == "text-generation"]
        if name not in served:
            raise NotFound(f"model '{name}' is not served; text models: {', '.join(served) or 'none'}", field="model")

    # OpenAI completions and chat completions: one generation per choice, choice i of a prompt with seed + i

    async def _start_choices(self, tenant: str | None, request: schemas.OpenAIFields, prompts: list[Prompt],
                             max_tokens: int, logprobs: int | None, echo: bool = False) -> list[GenerationStream]:
        await self.check_lm(request.model)
        choices = len(prompts) * request.n
        if choices > self.limits.max_choices:
            raise InvalidArgument(f"{len(prompts)} prompts × n {request.n} = {choices} choices exceed this service's "
                                  f"limit of {self.limits.max_choices} per request", field="n")
        # The engine reports at least one alternative; the answer keeps the `logprobs` asked for.
        engine_logprobs = 0 if logprobs is None else max(logprobs, 1)
        params = [SamplingParams(max_tokens=max_tokens, temperature=request.temperature, top_p=request.top_p,
                                 seed=None if request.seed is None else (request.seed + i) % 2**63,
                                 stop=request.stop_strings(), logprobs=engine_logprobs, echo=echo,
                                 min_tokens=request.min_tokens, ignore_eos=request.ignore_eos)
                  for _ in prompts for i in range(request.n)]
        return await self._start_generations(tenant, [p for p in prompts for _ in range(request.n)], params)

    async def _completion_choices(self, tenant: str | None, request: schemas.CompletionsRequest
                                  ) -> list[GenerationStream]:
        prompts = request.prompts()
        for prompt in prompts:
            if isinstance(prompt, str):
                self._check_prompt_chars(len(prompt), "prompt")
        return await self._start_choices(tenant, request, prompts, request.max_tokens, request.logprobs,
                                         echo=request.echo)

    async def completions(self, tenant: str | None, request: schemas.CompletionsRequest) -> dict:
        """OpenAI text_completion object."""
        done = await collect_all(await self._completion_choices(tenant, request))
        view = CompletionView(request)
        return completion_object(request.model, [view.choice(i, d) for i, d in enumerate(done)],
                                 usage=total_usage([d.usage for d in done], request.n))

    async def stream_completions(self, tenant: str | None, request: schemas.CompletionsRequest
                                 ) -> AsyncIterator[dict]:
        """The text_completion chunks (started: refusals are raised here)."""
        streams = await self._completion_choices(tenant, request)
        return CompletionView(request).chunks(streams)

    async def _chat_choices(self, tenant: str | None, request: schemas.ChatCompletionsRequest
                            ) -> list[GenerationStream]:
        messages = tuple({"role": m.role, "content": m.text()} for m in request.messages)
        self._check_prompt_chars(sum(len(m["content"]) for m in messages), "messages")
        max_tokens = request.max_completion_tokens or request.max_tokens or self.limits.max_new_tokens
        logprobs = (request.top_logprobs or 0) if request.logprobs else None
        try:
            return await self._start_choices(tenant, request, [Chat(messages)], max_tokens, logprobs)
        except InvalidArgument as exc:  # the prompt is the rendered messages: name what the client sent
            if exc.field == "prompt":
                raise InvalidArgument(exc.message, field="messages") from exc
            raise

    async def chat_completions(self, tenant: str | None, request: schemas.ChatCompletionsRequest) -> dict:
        """OpenAI chat.completion object."""
        done = await collect_all(await self._chat_choices(tenant, request))
        return ChatView(request).completion(done)

    async def stream_chat_completions(self, tenant: str | None, request: schemas.ChatCompletionsRequest
                                      ) -> AsyncIterator[dict]:
        """The chat.completion.chunk objects (started: refusals are raised here)."""
        return ChatView(request).chunks(await self._chat_choices(tenant, request))

    def _check_prompt_chars(self, characters: int, field: str) -> None:
        if characters > self.limits.max_prompt_chars:
            raise TooLarge(f"{field} has {characters} characters, this service's limit is "
                           f"{self.limits.max_prompt_chars}", field=field)

    async def _run(self, bank: str, request: schemas.DynamicsRequest, clamp: np.ndarray | None
                   ) -> schemas.RetrieveResponse:
        self._check_vector_count(request.queries, "queries")
        options = DynamicsOptions(request.steps, request.step_size, request.tolerance, request.trace, request.explain)
        min_version = max(request.min_version or 0, self._writes.version(bank))
        if request.explain:
            await self._check_explained_states(bank, len(request.queries), request.steps)
        results = await self.backend.run_memory(bank, np.asarray(request.queries, dtype=np.float32), clamp, options,
                                                min_version)
        for count in results.steps.tolist():
            RETRIEVE_STEPS.observe(count)
        return schemas.RetrieveResponse.from_results(results, request.encoding_format)

    async def _check_explained_states(self, bank: str, queries: int, steps: int | None) -> None:
        """An explanation lists every step's state: bounded by queries × (steps + 1), with the kind's
        default step count when the request gives none."""
        if steps is None:
            steps = KINDS[(await self.backend.bank_info(bank)).kind].default_steps
        states = queries * (steps + 1)
        if states > self.limits.max_explain_states:
            raise TooLarge(f"explain lists queries × (steps + 1) = {states} states, over this service's limit of "
                           f"{self.limits.max_explain_states}: send fewer queries or fewer steps", field="explain")

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


@dataclass
class Generation:
    """A whole generation, from its event stream."""

    prompt: dict | None  # the prompt event (echo)
    text: str
    tokens: list[int]
    logprobs: list[dict]  # per token, when asked for
    finish_reason: str
    usage: dict


async def collect(events: AsyncIterator[dict]) -> Generation:
    prompt, text, tokens, logprobs, finish = None, [], [], [], None
    async with contextlib.aclosing(events):
        async for event in events:
            if event["type"] == "prompt":
                prompt = event
                continue
            text.append(event["text"])
            if event["type"] == "token":
                tokens.append(event["token_id"])
                if event["logprobs"] is not None:
                    logprobs.append(event["logprobs"])
            else:
                finish = event
    return Generation(prompt, "".join(text), tokens, logprobs, finish["finish_reason"], finish["usage"])


async def collect_all(streams: list[GenerationStream]) -> list[Generation]:
    """Every stream to its end, concurrently; all are closed if one fails (or the caller is cancelled)."""
    try:
        return list(await asyncio.gather(*map(collect, streams)))
    finally:
        for stream in streams:
            await stream.aclose()


async def interleaved(streams: list[GenerationStream]) -> AsyncIterator[tuple[int, dict]]:
    """The events of several streams as they come, each with its stream's index; closing this closes them."""
    pending = {asyncio.ensure_future(anext(stream)): index for index, stream in enumerate(streams)}
    try:
        while pending:
            done, _ = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
            for task in sorted(done, key=pending.__getitem__):
                index = pending.pop(task)
                try:
                    event = task.result()
                except StopAsyncIteration:
                    continue
                yield index, event
                pending[asyncio.ensure_future(anext(streams[index]))] = index
    finally:
        for task in pending:
            task.cancel()
        for stream in streams:
            await stream.aclose()


def total_usage(usages: list[dict], n: int) -> dict:
    """Of choices in index order: each prompt counted once (its n choices share it), every choice's completion."""
    prompt = sum(u["prompt_tokens"] for u in usages[::n])
    completion = sum(u["completion_tokens"] for u in usages)
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


def openai_finish(reason: str) -> str:
    return OPENAI_FINISH.get(reason, "stop")


class CompletionView:
    """A completions request's generations as OpenAI text_completion objects and chunks."""

    def __init__(self, request: schemas.CompletionsRequest):
        self.request = request
        self.prompts = request.prompts()

    def _prompt_text(self, index: int, prompt_event: dict) -> str:
        """The prompt as given when it was text, else as the model's tokens read."""
        prompt = self.prompts[index // self.request.n]
        return prompt if isinstance(prompt, str) else prompt_event["text"]

    def _logprobs(self, tokens: list[str], entries: list[dict | None], offset: int = 0) -> dict:
        top = self.request.logprobs
        offsets = list(itertools.accumulate((len(t) for t in tokens[:-1]), initial=offset))
        return {"tokens": tokens, "token_logprobs": [None if e is None else e["logprob"] for e in entries],
                "top_logprobs": [None if e is None else {a["token"]: a["logprob"] for a in e["top"][:top]}
                                 for e in entries],
                "text_offset": offsets}

    def _echoed(self, index: int, prompt_event: dict) -> tuple[str, list[str], list[dict | None]]:
        return self._prompt_text(index, prompt_event), prompt_event["tokens"], prompt_event["logprobs"] or []

    def choice(self, index: int, done: Generation) -> dict:
        text, tokens, entries = "", [], []
        if done.prompt is not None:
            text, tokens, entries = self._echoed(index, done.prompt)
        logprobs = None
        if self.request.logprobs is not None:
            logprobs = self._logprobs([*tokens, *(e["token"] for e in done.logprobs)], [*entries, *done.logprobs])
        return {"text": text + done.text, "index": index, "logprobs": logprobs,
                "finish_reason": openai_finish(done.finish_reason)}

    async def chunks(self, streams: list[GenerationStream]) -> AsyncIterator[dict]:
        completion_id, created = f"cmpl-{uuid.uuid4().hex}", int(time.time())
        positions = [0] * len(streams)  # characters of each choice's text so far: its logprobs' offsets
        usages: dict[int, dict] = {}  # of the finished choices

        def chunk(choice: dict, usage: dict | None = None) -> dict:
            return completion_object(self.request.model, [choice], completion_id=completion_id, created=created,
                                     usage=usage)

        async with contextlib.aclosing(interleaved(streams)) as events:
            async for index, event in events:
                logprobs = None
                if event["type"] == "prompt":
                    text, tokens, entries = self._echoed(index, event)
                    if self.request.logprobs is not None:
                        logprobs = self._logprobs(tokens, entries, positions[index])
                elif event["type"] == "token":
                    text = event["text"]
                    if self.request.logprobs is not None:
                        logprobs = self._logprobs([event["logprobs"]["token"]], [event["logprobs"]], positions[index])
                else:
                    usages[index] = event["usage"]
                    yield chunk({"text": event["text"], "index": index, "logprobs": None,
                                 "finish_reason": openai_finish(event["finish_reason"])}, usage=event["usage"])
                    continue
                positions[index] += len(text)
                yield chunk({"text": text, "index": index, "logprobs": logprobs, "finish_reason": None})
        if self.request.include_usage():
            yield completion_object(self.request.model, [], completion_id=completion_id, created=created,
                                    usage=total_usage([usages[i] for i in sorted(usages)], self.request.n))


class ChatView:
    """A chat request's generations as OpenAI chat.completion objects and chunks."""

    def __init__(self, request: schemas.ChatCompletionsRequest):
        self.request = request
        self.top = request.top_logprobs or 0

    def _logprobs(self, entries: list[dict]) -> dict | None:
        if not self.request.logprobs:
            return None
        return {"content": [{"token": e["token"], "logprob": e["logprob"], "bytes": list(e["token"].encode()),
                             "top_logprobs": [{"token": a["token"], "logprob": a["logprob"],
                                               "bytes": list(a["token"].encode())} for a in e["top"][:self.top]]}
                            for e in entries]}

    def completion(self, done: list[Generation]) -> dict:
        return {"id": f"chatcmpl-{uuid.uuid4().hex}", "object": "chat.completion", "created": int(time.time()),
                "model": self.request.model,
                "choices": [{"index": i, "message": {"role": "assistant", "content": d.text},
                             "logprobs": self._logprobs(d.logprobs), "finish_reason": openai_finish(d.finish_reason)}
                            for i, d in enumerate(done)],
                "usage": total_usage([d.usage for d in done], self.request.n)}

    async def chunks(self, streams: list[GenerationStream]) -> AsyncIterator[dict]:
        chunk_id, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
        with_usage = self.request.include_usage()

        def chunk(index: int, delta: dict, finish_reason: str | None = None, logprobs: dict | None = None) -> dict:
            body = {"id": chunk_id, "object": "chat.completion.chunk", "created": created, "model": self.request.model,
                    "choices": [{"index": index, "delta": delta, "logprobs": logprobs, "finish_reason": finish_reason}]}
            return body | {"usage": None} if with_usage else body

        for index in range(len(streams)):  # OpenAI's first chunk of a choice: the role
            yield chunk(index, {"role": "assistant", "content": ""})
        usages: dict[int, dict] = {}  # of the finished choices
        async with contextlib.aclosing(interleaved(streams)) as events:
            async for index, event in events:
                if event["type"] == "token":
                    if event["text"] or self.request.logprobs:
                        yield chunk(index, {"content": event["text"]},
                                    logprobs=self._logprobs([event["logprobs"]] if event["logprobs"] else []))
                elif event["type"] == "finish":
                    usages[index] = event["usage"]
                    yield chunk(index, {"content": event["text"]} if event["text"] else {},
                                finish_reason=openai_finish(event["finish_reason"]))
        if with_usage:
            yield {"id": chunk_id, "object": "chat.completion.chunk", "created": created, "model": self.request.model,
                   "choices": [], "usage": total_usage([usages[i] for i in sorted(usages)], self.request.n)}


def completion_object(model: str, choices: list[dict], *, completion_id: str | None = None,
                      created: int | None = None, usage: dict | None = None) -> dict:
    body = {"id": completion_id or f"cmpl-{uuid.uuid4().hex}", "object": "text_completion",
            "created": created or int(time.time()), "model": model, "choices": choices}
    if usage is not None:
        body["usage"] = usage
    return body


def qualified(tenant: str | None, bank: str) -> str:
    """The stored name of a tenant's bank: tenants never see, or reach, each other's banks."""
    check_bank_name(bank)
    return bank if tenant is None else f"{tenant}/{bank}"


def visible(info: BankInfo) -> BankInfo:
    """The bank as its tenant sees it: without the tenant prefix."""
    return info.model_copy(update={"name": info.name.rpartition("/")[2]})
