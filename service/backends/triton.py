"""Models run inside Triton; this backend talks to it over gRPC (tritonclient aio).

Every operation is one inference request to the `associative_memory` model (the format is in
service/triton/associative_memory.py); Triton's dynamic batcher groups concurrent requests and the
model runs one batched dynamics per bank. The model's errors come back as the same service error
classes the embedded backend raises, so the API answers identically over either backend.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from dataclasses import asdict
from typing import TYPE_CHECKING, Any

import grpc
import numpy as np
from tritonclient.grpc import MAX_GRPC_MESSAGE_SIZE, InferInput, InferRequestedOutput
from tritonclient.grpc import aio as triton_aio
from tritonclient.utils import InferenceServerException

from service.engines.memory import KINDS
from service.engines.memory.registry import BankInfo, DynamicsOptions, MemoryResult
from service.errors import Overloaded, ServiceError, Unavailable
from service.triton.associative_memory import MODEL_NAME, bank_info, decode_results, error_from_message
from service.triton.launcher import TritonServer

if TYPE_CHECKING:
    from service.engines.lm.sampling import SamplingParams

QUEUE_FULL = "Exceeds maximum queue size"
# Statuses meaning "Triton (or the model) cannot answer now" rather than "this request is wrong".
UNAVAILABLE_STATUSES = {str(code) for code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED,
                                               grpc.StatusCode.CANCELLED, grpc.StatusCode.NOT_FOUND)}
# A channel whose server went away retries with exponential backoff (up to 2 minutes by default);
# capping it at 1 s lets the backend notice a restarted Triton within a second.
CHANNEL_ARGS = [
    ("grpc.max_send_message_length", MAX_GRPC_MESSAGE_SIZE),
    ("grpc.max_receive_message_length", MAX_GRPC_MESSAGE_SIZE),
    ("grpc.initial_reconnect_backoff_ms", 100),
    ("grpc.min_reconnect_backoff_ms", 100),
    ("grpc.max_reconnect_backoff_ms", 1000),
]


def service_error(exc: InferenceServerException) -> ServiceError:
    """The service error a failed Triton call stands for."""
    message = exc.message() or ""
    decoded = error_from_message(message)
    if decoded is not None:
        return decoded
    if QUEUE_FULL in message:
        return Overloaded(f"the {MODEL_NAME} queue in Triton is full")
    if exc.status() in UNAVAILABLE_STATUSES or "is not ready" in message:
        return Unavailable(f"Triton cannot serve {MODEL_NAME} now: {message}")
    return ServiceError(f"Triton failed: {message}")


class TritonBackend:
    name = "triton"

    def __init__(self, url: str | None = None, *, server: TritonServer | None = None,
                 ready_timeout: float = 1.0, request_timeout: float | None = None):
        """Talks to the Triton at gRPC `url` (host:port). Without a url, start() launches `server`
        (by default TritonServer("model_repository") on its default ports) and close() stops it."""
        if url is None and server is None:
            server = TritonServer("model_repository")
        self.server = server if url is None else None
        self.url = url if url is not None else server.url
        self.ready_timeout = ready_timeout
        self.request_timeout = request_timeout
        self._client: triton_aio.InferenceServerClient | None = None

    async def start(self) -> None:
        if self.server is not None:
            self.server.launch()  # on the loop's thread: Triton's parent-death signal follows that thread
            await asyncio.to_thread(self.server.wait_ready)
        # The channel connects lazily and reconnects by itself, so Triton may come and go.
        self._client = triton_aio.InferenceServerClient(self.url, channel_args=CHANNEL_ARGS)

    async def close(self) -> None:
        if self._client is not None:
            await self._client.close()
            self._client = None
        if self.server is not None:
            await asyncio.to_thread(self.server.stop)

    async def ready(self) -> bool:
        """Triton's server and model readiness, within `ready_timeout`; False when Triton is away."""
        if self._client is None:
            return False
        try:
            async with asyncio.timeout(self.ready_timeout):
                return (await self._client.is_server_ready(client_timeout=self.ready_timeout)
                        and await self._client.is_model_ready(MODEL_NAME, client_timeout=self.ready_timeout))
        except (InferenceServerException, TimeoutError):
            return False

    async def models(self) -> list[dict]:
        return [{"id": "associative-memory", "task": "retrieve", "ready": await self.ready(),
                 "details": {"kinds": sorted(KINDS)}}]

    async def complete_image(self, image: np.ndarray, missing: np.ndarray, steps: int | None
                             ) -> tuple[np.ndarray, list[float]]:
        raise Unavailable("the Triton backend serves associative memories only; image completion runs "
                          "on the embedded backend")

    async def generate(self, prompt: str, params: SamplingParams, deadline: float | None) -> AsyncIterator[dict]:
        raise Unavailable("the Triton backend serves associative memories only; text generation runs "
                          "on the embedded backend")

    # ----- operations ---------------------------------------------------------------------------

    async def create_bank(self, name: str, kind: str, dim: int, params: dict) -> BankInfo:
        result, _ = await self._call("create", name, {"kind": kind, "dim": dim, "params": params})
        return bank_info(result)

    async def list_banks(self) -> list[BankInfo]:
        result, _ = await self._call("list")
        return [bank_info(info) for info in result]

    async def bank_info(self, name: str) -> BankInfo:
        result, _ = await self._call("info", name)
        return bank_info(result)

    async def delete_bank(self, name: str) -> None:
        await self._call("delete", name)

    async def store(self, name: str, patterns: np.ndarray, ids: list[str] | None) -> tuple[list[str], int]:
        result, _ = await self._call("store", name, {"ids": ids}, vectors=patterns)
        return result["ids"], result["count"]

    async def delete_pattern(self, name: str, pattern_id: str) -> None:
        await self._call("delete_pattern", name, {"id": pattern_id})

    async def run_memory(self, name: str, queries: np.ndarray, clamp: np.ndarray | None,
                         options: DynamicsOptions) -> list[MemoryResult]:
        result, states = await self._call("run", name, asdict(options), vectors=queries, clamp=clamp)
        return decode_results(states, result)

    # ----- the wire -----------------------------------------------------------------------------

    async def _call(self, op: str, bank: str = "", args: dict | None = None, *,
                    vectors: np.ndarray | None = None, clamp: np.ndarray | None = None) -> tuple[Any, np.ndarray]:
        if self._client is None:
            raise Unavailable("the Triton backend is not started")
        inputs = [_text_input("OP", op), _text_input("BANK", bank), _text_input("ARGS", json.dumps(args or {}))]
        if vectors is not None:
            inputs.append(_tensor_input("VECTORS", _matrix(vectors, np.float32), "FP32"))
        if clamp is not None:
            inputs.append(_tensor_input("CLAMP", _matrix(clamp, np.bool_), "BOOL"))
        outputs = [InferRequestedOutput("RESULT"), InferRequestedOutput("STATES")]
        try:
            answer = await self._client.infer(MODEL_NAME, inputs, outputs=outputs, client_timeout=self.request_timeout)
        except InferenceServerException as exc:
            raise service_error(exc) from None
        return json.loads(answer.as_numpy("RESULT")[0, 0]), answer.as_numpy("STATES")[0]


def _matrix(values: np.ndarray, dtype: type) -> np.ndarray:
    """A 2-D array of `dtype` for the wire. What the model's checks would reject for its rank or (for
    the mask) its type goes as a 0×0 array, which those same checks reject with the same message."""
    array = np.asarray(values)
    if array.ndim != 2 or (dtype is np.bool_ and array.dtype != np.bool_):
        return np.zeros((0, 0), dtype=dtype)
    return np.ascontiguousarray(array, dtype=dtype)


def _text_input(name: str, text: str) -> InferInput:
    tensor = InferInput(name, [1, 1], "BYTES")
    tensor.set_data_from_numpy(np.array([[text.encode("utf-8")]], dtype=np.object_))
    return tensor


def _tensor_input(name: str, array: np.ndarray, datatype: str) -> InferInput:
    tensor = InferInput(name, [1, *array.shape], datatype)
    tensor.set_data_from_numpy(array[np.newaxis])
    return tensor
