"""`Client` and `AsyncClient`: every operation of amserve over REST or gRPC, numpy in and out."""

from __future__ import annotations

import asyncio
import itertools
import random
import time
from collections.abc import AsyncIterator, Iterator
from typing import Any

from amserve_client._grpc import AsyncGrpc, GrpcCalls, SyncGrpc
from amserve_client._rest import AsyncRest, RestCalls, SyncRest
from amserve_client.errors import RETRYABLE, AmserveError
from amserve_client.types import matrix

DEFAULT_URL = {"rest": "http://127.0.0.1:8000", "grpc": "127.0.0.1:8001"}
# The service bounds what it sends (--max-body-bytes); gRPC's default 4 MiB would cut large answers.
GRPC_OPTIONS = [("grpc.max_receive_message_length", -1), ("grpc.max_send_message_length", -1)]


class RetryPolicy:
    """Tries an idempotent call again when the service did not do it (Overloaded, Unavailable), after
    the Retry-After it asked for or else an exponential backoff, at most `retries` times. Each wait has
    a random part, so that the callers a full queue turned away do not all come back at once."""

    def __init__(self, retries: int, backoff: float = 0.25, max_backoff: float = 4.0):
        self.retries, self.backoff, self.max_backoff = retries, backoff, max_backoff

    def delay(self, call: Any, error: AmserveError, attempt: int) -> float | None:
        """Seconds to wait before trying `call` again after `error` on attempt `attempt` (from 0); None: give up."""
        if not call.idempotent or attempt >= self.retries or not isinstance(error, RETRYABLE):
            return None
        if error.retry_after is not None:
            return error.retry_after + random.uniform(0, self.backoff)
        return random.uniform(0, min(self.backoff * 2**attempt, self.max_backoff))


def connection(url: str | None, api_key: str | None, transport: str, timeout: float, encoding_format: str,
               http_client: Any, rest: type, grpc: type) -> tuple[RestCalls | GrpcCalls, Any]:
    """The requests builder and the sender for `transport` (`rest` and `grpc`: the sender classes)."""
    if encoding_format not in ("base64", "float"):
        raise ValueError(f"encoding_format must be 'base64' or 'float', not {encoding_format!r}")
    if transport == "rest":
        url = url or DEFAULT_URL["rest"]
        if not url.startswith(("http://", "https://")):
            raise ValueError(f"a REST url starts with http:// or https://, not {url!r}")
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        return RestCalls(encoding_format), rest(url, headers, timeout, http_client)
    if transport == "grpc":
        if http_client is not None:
            raise ValueError("http_client is for the REST transport")
        metadata = (("authorization", f"Bearer {api_key}"),) if api_key else ()
        return GrpcCalls(), grpc(url or DEFAULT_URL["grpc"], metadata, timeout, GRPC_OPTIONS)
    raise ValueError(f"transport must be 'rest' or 'grpc', not {transport!r}")


class _Operations:
    """Every operation, written once for both clients: their `_send` and `_stream` make it blocking
    (Client) or awaitable (AsyncClient)."""

    _calls: RestCalls | GrpcCalls

    def create_bank(self, name: str, kind: str, dim: int, params: dict | None = None):
        """Creates bank `name` of `kind` (classical, dense, modern, rbf, drdam) for `dim`-dim vectors → Bank.
        Conflict if it exists."""
        return self._send(self._calls.create_bank(name, kind, dim, params or {}))

    def list_banks(self):
        """→ list[Bank]"""
        return self._send(self._calls.list_banks())

    def get_bank(self, name: str):
        """→ Bank (kind, dim, params, count, bytes, version, checksum); NotFound if there is none."""
        return self._send(self._calls.get_bank(name))

    def delete_bank(self, name: str):
        return self._send(self._calls.delete_bank(name))

    def store(self, bank: str, patterns: Any, ids: list[str] | None = None):
        """Stores `patterns` (N×D, or one vector) → Stored(ids, count, version). With `ids` a retry stores
        nothing twice, so only then is the call retried."""
        return self._send(self._calls.store(bank, matrix(patterns), ids))

    def delete_pattern(self, bank: str, pattern_id: str):
        """→ the bank's version after the deletion."""
        return self._send(self._calls.delete_pattern(bank, pattern_id))

    def retrieve(self, bank: str, queries: Any, *, steps: int | None = None, step_size: float | None = None,
                 tolerance: float | None = None, trace: bool = False, min_version: int | None = None,
                 explain: bool = False):
        """Runs the bank's dynamics from each query (N×D, or one vector) → list[MemoryResult], one per query.
        With `explain`, each result's `explanation`: every step's state, energy and top memories."""
        options = dynamics(steps, step_size, tolerance, trace, min_version, explain)
        return self._send(self._calls.retrieve(bank, matrix(queries), options))

    def complete(self, bank: str, queries: Any, mask: Any, *, steps: int | None = None,
                 step_size: float | None = None, tolerance: float | None = None, trace: bool = False,
                 min_version: int | None = None, explain: bool = False):
        """As retrieve, with the entries where `mask` is true (known) clamped → list[MemoryResult]."""
        options = dynamics(steps, step_size, tolerance, trace, min_version, explain)
        return self._send(self._calls.complete(bank, matrix(queries), matrix(mask, bool), options))

    def complete_image(self, image: Any, mask: Any, *, steps: int | None = None, model: str = "energy-transformer",
                       explain: bool = False):
        """Fills the pixels of `image` (H×W in [0, 1]) where `mask` is true (missing) → ImageCompletion;
        with `explain` its `frames`: the image after every step, the energy split in its two parts."""
        return self._send(self._calls.complete_image(model, matrix(image), matrix(mask, bool), steps, explain))

    def fidelity(self, bank: str, *, sample_size: int | None = None, noise: float | None = None):
        """A drdam bank's random features against the exact rbf energy on a sample of its own patterns and
        noisy copies → Fidelity; Conflict when the bank does not keep its patterns."""
        options = {name: value for name, value in (("sample_size", sample_size), ("noise", noise)) if value is not None}
        return self._send(self._calls.fidelity(bank, options))

    def explain_text(self, prompt: str, *, temperature: float | None = None, top_k: int | None = None,
                     top_p: float | None = None, top_n: int | None = None, layers: list[int] | None = None,
                     heads: list[int] | None = None):
        """The text model's own forward pass over `prompt` → TextExplanation: its tokens, the attention of
        the `layers` and `heads` asked for (default all) and the next-token candidates under the sampling
        options. Options left None take the service's defaults."""
        options = {name: value for name, value in (
            ("temperature", temperature), ("top_k", top_k), ("top_p", top_p), ("top_n", top_n),
            ("layers", None if layers is None else list(layers)), ("heads", None if heads is None else list(heads)))
            if value is not None}
        return self._send(self._calls.explain_text(prompt, options))

    def models(self):
        """The served models and memory kinds → list[Model]."""
        return self._send(self._calls.models())

    def generate(self, prompt: str, *, stream: bool = False, max_tokens: int | None = None,
                 temperature: float | None = None, top_k: int | None = None, top_p: float | None = None,
                 seed: int | None = None, stop: str | list[str] | None = None, logprobs: int | None = None,
                 timeout: float | None = None):
        """Generates text → Generation; with `stream=True` an iterator of Chunk (async iterator on
        AsyncClient), one per token and then the finish, started already: a refused request raises here.
        Options left None take the service's defaults."""
        params = {name: value for name, value in (
            ("max_tokens", max_tokens), ("temperature", temperature), ("top_k", top_k), ("top_p", top_p),
            ("seed", seed), ("stop", stop), ("logprobs", logprobs), ("timeout", timeout)) if value is not None}
        call = self._calls.generate(prompt, params, stream)
        return self._stream(call) if stream else self._send(call)


def dynamics(steps: int | None, step_size: float | None, tolerance: float | None, trace: bool,
             min_version: int | None, explain: bool = False) -> dict:
    """The options of retrieve and complete that were given (the others take the service's defaults)."""
    given = {"steps": steps, "step_size": step_size, "tolerance": tolerance, "min_version": min_version}
    return ({"trace": trace} | ({"explain": True} if explain else {})
            | {name: value for name, value in given.items() if value is not None})


class Client(_Operations):
    """A blocking client.

    `url`: the REST base URL (default http://127.0.0.1:8000) or the gRPC target host:port (default
    127.0.0.1:8001); `timeout`: seconds to wait for an answer (over REST, for each read of it);
    `retries`: how many times an idempotent call is tried again after Overloaded or Unavailable;
    `encoding_format`: how REST sends vectors, base64 (little-endian float32) or float (JSON numbers);
    `http_client`: an httpx.Client of your own (proxies, TLS, ...), left open by close().
    """

    def __init__(self, url: str | None = None, api_key: str | None = None, *, transport: str = "rest",
                 timeout: float = 60.0, retries: int = 3, encoding_format: str = "base64", http_client: Any = None):
        self._calls, self._transport = connection(url, api_key, transport, timeout, encoding_format, http_client,
                                                  SyncRest, SyncGrpc)
        self._retry = RetryPolicy(retries)

    def _send(self, call: Any) -> Any:
        for attempt in itertools.count():
            try:
                return self._transport.send(call)
            except AmserveError as error:
                delay = self._retry.delay(call, error, attempt)
                if delay is None:
                    raise
            time.sleep(delay)

    def _stream(self, call: Any) -> Iterator:
        chunks = self._transport.stream(call)
        first = next(chunks)  # every generation ends with a finish chunk

        def rest() -> Iterator:
            try:
                yield first
                yield from chunks
            finally:
                chunks.close()
        return rest()

    def close(self) -> None:
        self._transport.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class AsyncClient(_Operations):
    """The same operations as Client, to await (`stream = await client.generate(..., stream=True)`
    and then `async for chunk in stream`); the same arguments, http_client an httpx.AsyncClient."""

    def __init__(self, url: str | None = None, api_key: str | None = None, *, transport: str = "rest",
                 timeout: float = 60.0, retries: int = 3, encoding_format: str = "base64", http_client: Any = None):
        self._calls, self._transport = connection(url, api_key, transport, timeout, encoding_format, http_client,
                                                  AsyncRest, AsyncGrpc)
        self._retry = RetryPolicy(retries)

    async def _send(self, call: Any) -> Any:
        for attempt in itertools.count():
            try:
                return await self._transport.send(call)
            except AmserveError as error:
                delay = self._retry.delay(call, error, attempt)
                if delay is None:
                    raise
            await asyncio.sleep(delay)

    async def _stream(self, call: Any) -> AsyncIterator:
        chunks = self._transport.stream(call)
        first = await anext(chunks)

        async def rest() -> AsyncIterator:
            try:
                yield first
                async for chunk in chunks:
                    yield chunk
            finally:
                await chunks.aclose()
        return rest()

    async def close(self) -> None:
        await self._transport.close()

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()
