"""The `llm` Triton model: its wire format and its request handling.

A decoupled model: one request is one generation and gets any number of responses. Inputs, without
the batch dimension (each request is one batch item):

    PROMPT   BYTES [1]   the prompt, UTF-8: its text; or with prompt_kind "token_ids" a JSON array of
                         token ids, with "chat" a JSON array of {"role", "content"} messages, rendered
                         with the model's chat template (the model holds the tokenizer, not the gateway)
    PARAMS   BYTES [1]   JSON object: SamplingParams' fields (max_tokens, temperature, top_k, top_p,
                         seed, stop, logprobs, echo, min_tokens, ignore_eos; all optional), timeout
                         (seconds, optional) and prompt_kind ("text", the default, "token_ids", "chat")

With an "explain" object in PARAMS ({"top_n", "layers", "heads", "max_weights"}, beside the sampling
fields temperature, top_k and top_p) the request is no generation: the model's own forward pass over
the prompt answers one final {"type": "explanation", ...} event, a TextExplanation as JSON (attention
[layer][head][query][key]), off the scheduler's thread.

Output TOKEN BYTES [1]: one JSON event per response, the dicts the embedded backend yields — with
echo first {"type": "prompt", "token_ids", "tokens", "text", "logprobs"}, {"type": "token", "token_id", "text",
"logprobs"} per token, then {"type": "finish", "finish_reason",
"text", "usage", "error"} (or the one explanation event), sent with TRITONSERVER_RESPONSE_COMPLETE_FINAL. A request refused at
submission (bad parameters, a prompt longer than the context, a full waiting queue) gets one final
error response instead, with the JSON error of service/triton/wire.py.

`TextGeneration` is everything model.py does, without pb_utils: the continuous-batching Scheduler
(one per model instance) runs the generations; model.py hands each request over with a `Stream`,
its response sender. A stream that Triton reports cancelled (the client closed its gRPC stream) is
noticed at its next token (or, while it waits for a decode slot, within `watch_interval`) and
cancelled in the scheduler, which frees its slot or queue place at the next step.
"""

from __future__ import annotations

import json
import math
import os
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch

from service.engines.lm import SamplingParams
from service.engines.lm.explain import NextTokenExplanation, TextExplanation, explain_text
from service.engines.lm.weights import DEFAULT_MODEL_NAME
from service.errors import InvalidArgument
from service.openmp import release_pool, releasing_pool
from service.serving.scheduler import (Chat, Event, FinishEvent, GenerationRequest, Prompt, RequestHandle, Scheduler,
                                       event_dict)
from service.triton.wire import text_tensor, text_value

SAMPLING_FIELDS = tuple(f.name for f in fields(SamplingParams))
EXPLAIN_SAMPLING_FIELDS = ("temperature", "top_k", "top_p")  # what the next-token candidates depend on


class Stream(Protocol):
    """One request's responses: model.py implements it with the request's response sender."""

    def send(self, event: dict, final: bool) -> None: ...

    def fail(self, error: BaseException) -> None:
        """The request's one and final response: an error."""
        ...

    def is_cancelled(self) -> bool: ...


# ----- requests and events ---------------------------------------------------------------------


@dataclass(frozen=True)
class ExplanationRequest:
    prompt: Prompt
    params: SamplingParams
    options: dict  # explain_text's top_n, layers, heads and max_weights


def parse_inputs(prompt: np.ndarray | None, params: np.ndarray | None) -> GenerationRequest | ExplanationRequest:
    """A generation, or an explanation with "explain" in PARAMS; InvalidArgument naming the field otherwise."""
    values = params_object(params)
    if "explain" not in values:
        return generation_request(prompt_text(prompt), values)
    options = values.pop("explain")
    if not isinstance(options, dict) or set(options) != {"top_n", "layers", "heads", "max_weights"}:
        raise InvalidArgument('explain must be an object of "top_n", "layers", "heads" and "max_weights"',
                              field="explain")
    kind = values.pop("prompt_kind", "text")
    unknown = sorted(set(values) - set(EXPLAIN_SAMPLING_FIELDS))
    if unknown:
        raise InvalidArgument(f"unknown explanation parameter {unknown[0]!r}", field=unknown[0])
    return ExplanationRequest(prompt_of(kind, prompt_text(prompt)), SamplingParams(**values), options)


def prompt_text(prompt: np.ndarray | None) -> str:
    if prompt is None:
        raise InvalidArgument("prompt is required", field="prompt")
    text = prompt.reshape(-1)[0] if prompt.size == 1 else None
    if not isinstance(text, (bytes, str)):
        raise InvalidArgument("prompt must be one string", field="prompt")
    return text.decode("utf-8", "surrogatepass") if isinstance(text, bytes) else text


def params_object(params: np.ndarray | None) -> dict:
    try:
        values = json.loads(text_value(params)) if params is not None else {}
    except ValueError:
        values = None
    if not isinstance(values, dict):
        raise InvalidArgument("PARAMS must be a JSON object", field="params")
    return values


def generation_request(text: str, values: dict) -> GenerationRequest:
    timeout = values.pop("timeout", None)
    kind = values.pop("prompt_kind", "text")
    unknown = sorted(set(values) - set(SAMPLING_FIELDS))
    if unknown:
        raise InvalidArgument(f"unknown generation parameter {unknown[0]!r}", field=unknown[0])
    if "stop" in values and not isinstance(values["stop"], (list, tuple)):
        raise InvalidArgument("stop must be a list of strings", field="stop")
    sampling = SamplingParams(**values)  # validates, naming the field
    if timeout is not None and (not isinstance(timeout, (int, float)) or not math.isfinite(timeout) or timeout <= 0):
        raise InvalidArgument("timeout must be a positive number of seconds", field="timeout")
    return GenerationRequest(prompt_of(kind, text), sampling, None if timeout is None else time.monotonic() + timeout)


def prompt_of(kind: Any, text: str) -> Prompt:
    if kind == "text":
        return text
    if kind not in ("token_ids", "chat"):
        raise InvalidArgument('prompt_kind must be "text", "token_ids" or "chat"', field="prompt_kind")
    try:
        value = json.loads(text)
    except ValueError:
        value = None
    if kind == "token_ids":
        if not isinstance(value, list) or not all(isinstance(i, int) and not isinstance(i, bool) for i in value):
            raise InvalidArgument("prompt must be a JSON array of token ids", field="prompt")
        return value
    if not isinstance(value, list) or not value or not all(
            isinstance(m, dict) and set(m) == {"role", "content"} and all(isinstance(v, str) for v in m.values())
            for m in value):
        raise InvalidArgument('prompt must be a JSON array of {"role", "content"} string messages', field="prompt")
    return Chat(tuple(value))


# ----- the model's request handling ------------------------------------------------------------


class _Generation:
    def __init__(self, stream: Stream):
        self.stream = stream
        self.handle: RequestHandle | None = None
        self.started = False  # it has had an event
        self.cancelled = False


class TextGeneration:
    def __init__(self, scheduler: Scheduler, name: str = DEFAULT_MODEL_NAME, *, watch_interval: float = 0.1):
        self.scheduler = scheduler
        self.name = name
        self._lock = threading.Lock()
        self._waiting: set[_Generation] = set()  # submitted, no event yet
        self._watch_interval = watch_interval
        self._closing = threading.Event()
        self._watcher = threading.Thread(target=self._watch, name="llm-cancellations", daemon=True)
        self._watcher.start()
        # Explanations read the scheduler's weights (no KV cache) in a thread of their own, as the
        # embedded backend's do: generations neither wait for them nor see them.
        self._explainer = ThreadPoolExecutor(1, thread_name_prefix="llm-explain")

    @classmethod
    def load(cls, directory: str | Path, device: str, parameters: dict[str, str]) -> TextGeneration:
        """The HF directory `amserve export` converts the model into, with the config's parameters;
        AMSERVE_DTYPE / AMSERVE_KV_DTYPE (set by `amserve serve` for the Triton it starts) override
        the exported dtypes."""
        from service.engines.lm.weights import load_model

        model, tokenizer = load_model(directory, device,
                                      dtype=os.environ.get("AMSERVE_DTYPE") or parameters["dtype"],
                                      kv_dtype=os.environ.get("AMSERVE_KV_DTYPE") or parameters["kv_dtype"])
        scheduler = Scheduler(model, tokenizer, max_batch_size=int(parameters["max_running_sequences"]),
                              max_waiting=int(parameters["max_waiting_sequences"]),
                              max_context=int(parameters["max_context"]))
        release_pool()  # this thread's OpenMP workers: the scheduler's thread decodes (service/openmp.py)
        return cls(scheduler, parameters.get("served_model_name") or DEFAULT_MODEL_NAME)

    def start(self, inputs: dict[str, np.ndarray | None], stream: Stream) -> None:
        """Submit one request; its events go to `stream` from the scheduler's thread. A refusal is
        the stream's one (error) response."""
        generation = _Generation(stream)
        try:
            request = parse_inputs(inputs.get("PROMPT"), inputs.get("PARAMS"))
            if isinstance(request, ExplanationRequest):
                self._explainer.submit(releasing_pool(self._explain), request, stream)
                return
            handle = self.scheduler.submit(request, lambda event: self._on_event(generation, event))
        except Exception as exc:  # every refusal, bugs included, is this request's answer alone
            stream.fail(exc)
            return
        with self._lock:
            generation.handle = handle
            if not generation.started:
                self._waiting.add(generation)
            cancelled = generation.cancelled  # noticed by the scheduler's thread before submit returned
        if cancelled:
            self.scheduler.cancel(handle)

    def _explain(self, request: ExplanationRequest, stream: Stream) -> None:
        try:
            token_ids = self.scheduler.prompt_ids(request.prompt)
            explained = explain_text(self.scheduler.model, self.scheduler.tokenizer, token_ids, request.params,
                                     **request.options)
        except Exception as exc:  # noqa: BLE001 - the request's one answer
            stream.fail(exc)
            return
        stream.send(explanation_event(self.name, explained), final=True)

    def _on_event(self, generation: _Generation, event: Event) -> None:
        with self._lock:
            generation.started = True
            self._waiting.discard(generation)
        if isinstance(event, FinishEvent):
            # Sent even to a cancelled stream: the final flag is what releases the request in Triton.
            generation.stream.send(event_dict(event, self.scheduler.tokenizer), final=True)
        elif generation.cancelled or generation.stream.is_cancelled():
            self._cancel(generation)
        else:
            generation.stream.send(event_dict(event, self.scheduler.tokenizer), final=False)

    def _cancel(self, generation: _Generation) -> None:
        with self._lock:
            generation.cancelled = True
            handle = generation.handle
        if handle is not None:
            self.scheduler.cancel(handle)

    def _watch(self) -> None:
        """A request waiting for a decode slot has no event at which to notice its cancellation: look
        at those every `watch_interval` seconds, so a cancelled one leaves the queue instead of taking
        a slot later."""
        while not self._closing.wait(self._watch_interval):
            with self._lock:
                waiting = [g for g in self._waiting if not g.cancelled]
            for generation in waiting:
                if generation.stream.is_cancelled():
                    self._cancel(generation)

    def close(self) -> None:
        """Stop the scheduler; unfinished generations end with finish_reason "cancelled"."""
        self._closing.set()
        self._watcher.join()
        self._explainer.shutdown(cancel_futures=True)
        self.scheduler.close()


# ----- the gateway's side ---------------------------------------------------------------------


def request_arrays(prompt: Prompt, params: SamplingParams, timeout: float | None) -> dict[str, np.ndarray]:
    """The inputs of one request, batch dimension included, as the model reads them."""
    values: dict[str, Any] = asdict(params)
    values["stop"] = list(params.stop)
    if timeout is not None:
        values["timeout"] = timeout
    if isinstance(prompt, Chat):
        values["prompt_kind"], prompt = "chat", json.dumps(list(prompt.messages))
    elif not isinstance(prompt, str):
        values["prompt_kind"], prompt = "token_ids", json.dumps(list(prompt))
    return {"PROMPT": text_tensor(prompt), "PARAMS": text_tensor(json.dumps(values))}


def explain_arrays(prompt: str, params: SamplingParams, top_n: int, layers: list[int] | None,
                   heads: list[int] | None, max_weights: int) -> dict[str, np.ndarray]:
    """The inputs of one explanation request, batch dimension included."""
    values = {name: getattr(params, name) for name in EXPLAIN_SAMPLING_FIELDS}
    values["explain"] = {"top_n": top_n, "layers": layers, "heads": heads, "max_weights": max_weights}
    return {"PROMPT": text_tensor(prompt), "PARAMS": text_tensor(json.dumps(values))}


def explanation_event(model: str, explained: TextExplanation) -> dict:
    return {"type": "explanation", "model": model, "token_ids": explained.token_ids, "tokens": explained.tokens,
            "layers": explained.layers, "heads": explained.heads, "attention": explained.attention.tolist(),
            "next_token": asdict(explained.next_token)}


def decode_explanation(event: dict) -> tuple[str, TextExplanation]:
    """The served model's name and its explanation."""
    return event["model"], TextExplanation(token_ids=event["token_ids"], tokens=event["tokens"], layers=event["layers"],
                           heads=event["heads"], attention=torch.tensor(event["attention"], dtype=torch.float32),
                           next_token=NextTokenExplanation(**event["next_token"]))


def decode_event(token: np.ndarray) -> dict:
    """A TOKEN output (batch dimension included) back to the event dict."""
    return json.loads(token.reshape(-1)[0])
