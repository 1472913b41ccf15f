"""gRPC: each operation as a request message and a reader of its reply, and the two ways of sending
them (grpc, grpc.aio). Vectors travel as protobuf's packed float32."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass
from typing import Any

import grpc
import numpy as np
from google.protobuf import json_format, message, struct_pb2

from amserve_client._pb import amserve_pb2 as pb
from amserve_client._pb import amserve_pb2_grpc as pb_grpc
from amserve_client.errors import grpc_errors
from amserve_client.types import (Agreement, Alternative, Bank, Chunk, ExplainedStep, Fidelity, Generation,
                                  ImageCompletion, ImageFrame, MemoryResult, Model, Nearest, NextTokenCandidate,
                                  PromptToken, Shard, Stored, TextExplanation, TokenLogprob, TopMemory, Usage)


@dataclass(frozen=True)
class GrpcCall:
    rpc: str
    request: message.Message
    idempotent: bool
    parse: Callable[[Any], Any]
    streams: bool = False  # a server-streaming rpc: `parse` reads the list of its replies


class GrpcCalls:
    def create_bank(self, name: str, kind: str, dim: int, params: dict) -> GrpcCall:
        request = pb.CreateBankRequest(bank=name, kind=kind, dim=dim, params=struct(params))
        return GrpcCall("CreateBank", request, False, bank)

    def list_banks(self) -> GrpcCall:
        return GrpcCall("ListBanks", pb.ListBanksRequest(), True, lambda reply: [bank(b) for b in reply.banks])

    def get_bank(self, name: str) -> GrpcCall:
        return GrpcCall("GetBank", pb.GetBankRequest(bank=name), True, bank)

    def delete_bank(self, name: str) -> GrpcCall:
        return GrpcCall("DeleteBank", pb.DeleteBankRequest(bank=name), False, lambda reply: None)

    def store(self, bank_name: str, patterns: np.ndarray, ids: list[str] | None) -> GrpcCall:
        request = pb.StoreRequest(bank=bank_name, patterns=vectors(patterns), ids=ids or [])
        return GrpcCall("Store", request, ids is not None,
                        lambda reply: Stored(ids=list(reply.ids), count=reply.count, version=reply.version))

    def delete_pattern(self, bank_name: str, pattern_id: str) -> GrpcCall:
        return GrpcCall("DeletePattern", pb.DeletePatternRequest(bank=bank_name, id=pattern_id), False,
                        lambda reply: reply.version)

    def retrieve(self, bank_name: str, queries: np.ndarray, options: dict) -> GrpcCall:
        request = pb.RetrieveRequest(bank=bank_name, queries=vectors(queries), **options)
        return GrpcCall("Retrieve", request, True, memory_results(options.get("trace", False),
                                                                  options.get("explain", False)))

    def complete(self, bank_name: str, queries: np.ndarray, mask: np.ndarray, options: dict) -> GrpcCall:
        request = pb.CompleteRequest(bank=bank_name, queries=vectors(queries), mask=masks(mask), **options)
        return GrpcCall("Complete", request, True, memory_results(options.get("trace", False),
                                                                  options.get("explain", False)))

    def complete_image(self, model: str, image: np.ndarray, mask: np.ndarray, steps: int | None,
                       explain: bool = False) -> GrpcCall:
        request = pb.CompleteImageRequest(model=model, image=vectors(image), mask=masks(mask), steps=steps,
                                          explain=explain)
        return GrpcCall("CompleteImage", request, True, lambda reply: ImageCompletion(
            model=reply.model, image=pixels(reply.image),
            energy_trace=np.asarray(reply.energy_trace, dtype=np.float64),
            frames=[ImageFrame(image=pixels(f.image), energy=f.energy, attention_energy=f.attention_energy,
                               hopfield_energy=f.hopfield_energy) for f in reply.frames] if explain else None))

    def fidelity(self, bank_name: str, options: dict) -> GrpcCall:
        return GrpcCall("BankFidelity", pb.FidelityRequest(bank=bank_name, **options), True, fidelity)

    def explain_text(self, prompt: str, options: dict) -> GrpcCall:
        return GrpcCall("Explain", pb.ExplainRequest(prompt=prompt, **options), True, text_explanation)

    def models(self) -> GrpcCall:
        return GrpcCall("ListModels", pb.ListModelsRequest(), True, lambda reply: [
            Model(id=m.id, task=m.task, ready=m.ready, details=json_format.MessageToDict(m.details))
            for m in reply.models])

    def generate(self, prompt: str, params: dict, stream: bool = False) -> GrpcCall:
        if isinstance(params.get("stop"), str):
            params = {**params, "stop": [params["stop"]]}
        request = pb.GenerateRequest(prompt=prompt, **params)
        return GrpcCall("Generate", request, False, lambda replies: Generation.from_chunks([chunk(r) for r in replies]),
                        streams=True)


def struct(values: dict) -> struct_pb2.Struct:
    message = struct_pb2.Struct()
    message.update(values)
    return message


def vectors(rows: np.ndarray) -> list[pb.Vector]:
    return [pb.Vector(values=row) for row in rows.tolist()]


def masks(rows: np.ndarray) -> list[pb.Mask]:
    return [pb.Mask(values=row) for row in rows.tolist()]


def bank(info: pb.BankInfo) -> Bank:
    return Bank(name=info.name, kind=info.kind, dim=info.dim, params=json_format.MessageToDict(info.params),
                count=info.count, bytes=info.bytes, version=info.version, checksum=info.checksum,
                shards=[Shard(shard=s.shard, count=s.count, replicas=list(s.replicas)) for s in info.shards])


def pixels(rows) -> np.ndarray:
    return np.array([row.values for row in rows], dtype=np.float32)


def memory_results(traced: bool, explained: bool = False) -> Callable[[pb.RetrieveResponse], list[MemoryResult]]:
    def parse(reply: pb.RetrieveResponse) -> list[MemoryResult]:
        return [MemoryResult(state=np.asarray(r.state, dtype=np.float32), energy=r.energy, steps=r.steps,
                             converged=r.converged,
                             nearest=Nearest(id=r.nearest.id, similarity=r.nearest.similarity)
                             if r.HasField("nearest") else None,
                             # explain implies the trace, as REST answers it
                             trace=np.asarray(r.trace, dtype=np.float64) if traced or explained else None,
                             explanation=[ExplainedStep(state=np.asarray(step.state, dtype=np.float32),
                                                        energy=step.energy,
                                                        top_memories=[TopMemory(id=m.id, weight=m.weight)
                                                                      for m in step.top_memories])
                                          for step in r.explanation] if explained else None)
                for r in reply.results]
    return parse


def agreement(message: pb.Agreement) -> Agreement:
    return Agreement(mean_abs_energy_error=message.mean_abs_energy_error,
                     max_abs_energy_error=message.max_abs_energy_error,
                     mean_gradient_cosine=message.mean_gradient_cosine, min_gradient_cosine=message.min_gradient_cosine)


def fidelity(reply: pb.Fidelity) -> Fidelity:
    return Fidelity(version=reply.version, sample_size=reply.sample_size, noise=reply.noise,
                    patterns=agreement(reply.patterns), noisy=agreement(reply.noisy), same_nearest=reply.same_nearest)


def text_explanation(reply: pb.ExplainResponse) -> TextExplanation:
    """The flat row-major attention reshaped to [layer][head][query][key]."""
    return TextExplanation(
        model=reply.model, tokens=[PromptToken(text=t.text, id=t.id) for t in reply.tokens], layers=list(reply.layers),
        heads=list(reply.heads),
        attention=np.asarray(reply.attention, dtype=np.float32).reshape(tuple(reply.attention_shape)),
        candidates=[NextTokenCandidate(token=c.token, token_id=c.token_id, logit=c.logit, probability=c.probability,
                                       kept_by_top_k=c.kept_by_top_k, kept_by_top_p=c.kept_by_top_p)
                    for c in reply.next_token.candidates],
        distribution=np.asarray(reply.next_token.distribution, dtype=np.float64))


def chunk(reply: pb.GenerateChunk) -> Chunk:
    logprobs = None
    if reply.HasField("logprobs"):
        entry = reply.logprobs
        logprobs = TokenLogprob(token=entry.token, token_id=entry.token_id, logprob=entry.logprob,
                                top=[Alternative(a.token, a.token_id, a.logprob) for a in entry.top])
    return Chunk(text=reply.text, token_id=reply.token_id if reply.HasField("token_id") else None,
                 logprobs=logprobs, finish_reason=reply.finish_reason or None,
                 usage=Usage(reply.usage.prompt_tokens, reply.usage.completion_tokens, reply.usage.total_tokens)
                 if reply.HasField("usage") else None)


def target(url: str) -> str:
    """host:port, from a target or a URL (`grpc://host:port`)."""
    return url.split("://", 1)[1].rstrip("/") if "://" in url else url


class SyncGrpc:
    def __init__(self, url: str, metadata: tuple, timeout: float, options: list):
        self.channel = grpc.insecure_channel(target(url), options=options)
        self.stub = pb_grpc.AmserveStub(self.channel)
        self.metadata, self.timeout = metadata, timeout

    def send(self, call: GrpcCall) -> Any:
        with grpc_errors():
            reply = getattr(self.stub, call.rpc)(call.request, timeout=self.timeout, metadata=self.metadata)
            return call.parse(list(reply) if call.streams else reply)

    def stream(self, call: GrpcCall) -> Iterator[Chunk]:
        with grpc_errors():
            replies = getattr(self.stub, call.rpc)(call.request, timeout=self.timeout, metadata=self.metadata)
            try:
                for reply in replies:
                    yield chunk(reply)
            finally:
                replies.cancel()  # a consumer that stops early cancels the generation

    def close(self) -> None:
        self.channel.close()


class AsyncGrpc:
    """The channel is opened at the first call, in the event loop that makes it."""

    def __init__(self, url: str, metadata: tuple, timeout: float, options: list):
        self.url, self.metadata, self.timeout, self.options = target(url), metadata, timeout, options
        self.channel: grpc.aio.Channel | None = None
        self.stub: pb_grpc.AmserveStub | None = None

    def _method(self, rpc: str):
        if self.stub is None:
            self.channel = grpc.aio.insecure_channel(self.url, options=self.options)
            self.stub = pb_grpc.AmserveStub(self.channel)
        return getattr(self.stub, rpc)

    async def send(self, call: GrpcCall) -> Any:
        with grpc_errors():
            reply = self._method(call.rpc)(call.request, timeout=self.timeout, metadata=self.metadata)
            return call.parse([r async for r in reply] if call.streams else await reply)

    async def stream(self, call: GrpcCall) -> AsyncIterator[Chunk]:
        with grpc_errors():
            replies = self._method(call.rpc)(call.request, timeout=self.timeout, metadata=self.metadata)
            try:
                async for reply in replies:
                    yield chunk(reply)
            finally:
                replies.cancel()

    async def close(self) -> None:
        if self.channel is not None:
            await self.channel.close()
