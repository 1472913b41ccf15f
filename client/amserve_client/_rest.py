"""REST: each operation as a request and a reader of its answer, and the two ways of sending them
(httpx.Client, httpx.AsyncClient)."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote, urlencode

import httpx
import numpy as np

from amserve_client.errors import from_http, http_errors
from amserve_client.types import (Bank, Chunk, ExplainedStep, Fidelity, Generation, ImageCompletion, ImageFrame,
                                  MemoryResult, Model, Nearest, NextTokenCandidate, PromptToken, Stored,
                                  TextExplanation, TokenLogprob, TopMemory, Usage, to_base64, vector)

VERSION_HEADER = "Amserve-Bank-Version"


@dataclass(frozen=True)
class RestCall:
    method: str
    path: str
    body: dict | None
    idempotent: bool
    parse: Callable[[httpx.Response], Any]


class RestCalls:
    """The requests of every operation; vectors go as base64 or JSON numbers (`encoding_format`)."""

    def __init__(self, encoding_format: str):
        self.encoding_format = encoding_format

    def create_bank(self, name: str, kind: str, dim: int, params: dict) -> RestCall:
        return RestCall("PUT", bank_path(name), {"kind": kind, "dim": dim, "params": params}, False,
                        lambda r: Bank.from_fields(r.json()))

    def list_banks(self) -> RestCall:
        return RestCall("GET", "/v1/banks", None, True, lambda r: [Bank.from_fields(b) for b in r.json()["banks"]])

    def get_bank(self, name: str) -> RestCall:
        return RestCall("GET", bank_path(name), None, True, lambda r: Bank.from_fields(r.json()))

    def delete_bank(self, name: str) -> RestCall:
        return RestCall("DELETE", bank_path(name), None, False, lambda r: None)

    def store(self, bank: str, patterns: np.ndarray, ids: list[str] | None) -> RestCall:
        body = {**self._vectors("patterns", patterns), **({} if ids is None else {"ids": ids})}
        return RestCall("POST", bank_path(bank, "store"), body, ids is not None,
                        lambda r: Stored(**r.json()))

    def delete_pattern(self, bank: str, pattern_id: str) -> RestCall:
        return RestCall("DELETE", bank_path(bank, "patterns", pattern_id), None, False,
                        lambda r: int(r.headers[VERSION_HEADER]))

    def retrieve(self, bank: str, queries: np.ndarray, options: dict) -> RestCall:
        return RestCall("POST", bank_path(bank, "retrieve"), {**self._vectors("queries", queries), **options}, True,
                        memory_results)

    def complete(self, bank: str, queries: np.ndarray, mask: np.ndarray, options: dict) -> RestCall:
        body = {**self._vectors("queries", queries), "mask": mask.tolist(), **options}
        return RestCall("POST", bank_path(bank, "complete"), body, True, memory_results)

    def complete_image(self, model: str, image: np.ndarray, mask: np.ndarray, steps: int | None,
                       explain: bool = False) -> RestCall:
        body = {"model": model, "image": image.tolist(), "mask": mask.tolist(),
                **({} if steps is None else {"steps": steps}), **({"explain": True} if explain else {})}
        return RestCall("POST", "/v1/complete", body, True, image_completion)

    def fidelity(self, bank: str, options: dict) -> RestCall:
        query = f"?{urlencode(options)}" if options else ""
        return RestCall("GET", bank_path(bank, "fidelity") + query, None, True,
                        lambda r: Fidelity.from_fields(r.json()))

    def explain_text(self, prompt: str, options: dict) -> RestCall:
        return RestCall("POST", "/v1/explain", {"prompt": prompt, **options}, True, text_explanation)

    def models(self) -> RestCall:
        return RestCall("GET", "/v1/models", None, True, lambda r: [
            Model(id=m["id"], task=m["task"], ready=m["ready"], details=m["details"]) for m in r.json()["data"]])

    def generate(self, prompt: str, params: dict, stream: bool = False) -> RestCall:
        body = {"prompt": prompt, **params, **({"stream": True} if stream else {})}
        return RestCall("POST", "/v1/generate", body, False, generation)

    def _vectors(self, name: str, rows: np.ndarray) -> dict:
        if self.encoding_format == "base64":
            return {name: [to_base64(row) for row in rows], "encoding_format": "base64"}
        return {name: rows.tolist()}


def bank_path(*parts: str) -> str:
    return "/v1/banks/" + "/".join(quote(part, safe="") for part in parts)


def memory_results(response: httpx.Response) -> list[MemoryResult]:
    return [MemoryResult(state=vector(r["state"]), energy=r["energy"], steps=r["steps"], converged=r["converged"],
                         nearest=Nearest(**r["nearest"]) if r.get("nearest") else None,
                         trace=None if r.get("trace") is None else np.asarray(r["trace"], dtype=np.float64),
                         explanation=None if r.get("explanation") is None else [
                             ExplainedStep(state=vector(step["state"]), energy=step["energy"],
                                           top_memories=[TopMemory(**m) for m in step["top_memories"]])
                             for step in r["explanation"]])
            for r in response.json()["results"]]


def image_completion(response: httpx.Response) -> ImageCompletion:
    body = response.json()
    frames = body.get("frames")
    return ImageCompletion(model=body["model"], image=np.asarray(body["image"], dtype=np.float32),
                           energy_trace=np.asarray(body["energy_trace"], dtype=np.float64),
                           frames=None if frames is None else [
                               ImageFrame(image=np.asarray(f["image"], dtype=np.float32), energy=f["energy"],
                                          attention_energy=f["attention_energy"], hopfield_energy=f["hopfield_energy"])
                               for f in frames])


def text_explanation(response: httpx.Response) -> TextExplanation:
    body = response.json()
    tokens = [PromptToken(text=t["text"], id=t["id"]) for t in body["tokens"]]
    shape = (len(body["layers"]), len(body["heads"]), len(tokens), len(tokens))
    return TextExplanation(model=body["model"], tokens=tokens, layers=body["layers"], heads=body["heads"],
                           attention=np.asarray(body["attention"], dtype=np.float32).reshape(shape),
                           candidates=[NextTokenCandidate(**c) for c in body["next_token"]["candidates"]],
                           distribution=np.asarray(body["next_token"]["distribution"], dtype=np.float64))


def generation(response: httpx.Response) -> Generation:
    body = response.json()
    logprobs = body.get("logprobs")
    return Generation(text=body["text"], tokens=body["tokens"], finish_reason=body["finish_reason"],
                      usage=Usage(**body["usage"]),
                      logprobs=None if logprobs is None else [TokenLogprob.from_fields(e) for e in logprobs])


def chunk(event: dict) -> Chunk:
    """One Server-Sent Event of /v1/generate."""
    usage, logprobs = event.get("usage"), event.get("logprobs")
    return Chunk(text=event["text"], token_id=event.get("token_id"),
                 logprobs=None if logprobs is None else TokenLogprob.from_fields(logprobs),
                 finish_reason=event.get("finish_reason"), usage=None if usage is None else Usage(**usage))


def sse_event(line: str) -> dict | None:
    """The JSON of a `data:` line; None for anything else (blank separators, comments) and for [DONE]."""
    if not line.startswith("data:"):
        return None
    data = line[len("data:"):].strip()
    return None if data == "[DONE]" else json.loads(data)


class SyncRest:
    def __init__(self, url: str, headers: dict, timeout: float, http: httpx.Client | None):
        self.url, self.headers, self.timeout = url.rstrip("/"), headers, timeout
        self.owned = http is None
        self.http = http or httpx.Client()

    def send(self, call: RestCall) -> Any:
        with http_errors():
            response = self.http.request(call.method, self.url + call.path, json=call.body, headers=self.headers,
                                         timeout=self.timeout)
        if response.is_error:
            raise from_http(response)
        return call.parse(response)

    def stream(self, call: RestCall) -> Iterator[Chunk]:
        with http_errors(), self.http.stream(call.method, self.url + call.path, json=call.body,
                                             headers=self.headers, timeout=self.timeout) as response:
            if response.is_error:
                response.read()
                raise from_http(response)
            for line in response.iter_lines():
                if (event := sse_event(line)) is not None:
                    yield chunk(event)

    def close(self) -> None:
        if self.owned:
            self.http.close()


class AsyncRest:
    def __init__(self, url: str, headers: dict, timeout: float, http: httpx.AsyncClient | None):
        self.url, self.headers, self.timeout = url.rstrip("/"), headers, timeout
        self.owned = http is None
        self.http = http or httpx.AsyncClient()

    async def send(self, call: RestCall) -> Any:
        with http_errors():
            response = await self.http.request(call.method, self.url + call.path, json=call.body,
                                               headers=self.headers, timeout=self.timeout)
        if response.is_error:
            raise from_http(response)
        return call.parse(response)

    async def stream(self, call: RestCall) -> AsyncIterator[Chunk]:
        with http_errors():
            async with self.http.stream(call.method, self.url + call.path, json=call.body, headers=self.headers,
                                        timeout=self.timeout) as response:
                if response.is_error:
                    await response.aread()
                    raise from_http(response)
                async for line in response.aiter_lines():
                    if (event := sse_event(line)) is not None:
                        yield chunk(event)

    async def close(self) -> None:
        if self.owned:
            await self.http.aclose()
