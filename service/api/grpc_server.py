"""gRPC transport (grpc.aio): protobuf ↔ the shared pydantic models, then the same operations as REST."""

from __future__ import annotations

import contextlib
import time
from collections.abc import Awaitable, Callable

import grpc
import numpy as np
from google.protobuf import json_format, struct_pb2
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection
from pydantic import ValidationError

from service import errors, metrics
from service.api import schemas
from service.api.auth import ApiKeys
from service.api.errors import grpc_code, validation_error
from service.api.operations import Operations
from service.api.pb import amserve_pb2 as pb
from service.api.pb import amserve_pb2_grpc as pb_grpc
from service.banks.registry import BankInfo, Fidelity

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["Amserve"].full_name


def _struct(values: dict) -> struct_pb2.Struct:
    message = struct_pb2.Struct()
    message.update(values)
    return message


def _bank_info(info: BankInfo) -> pb.BankInfo:
    return pb.BankInfo(name=info.name, kind=info.kind, dim=info.dim, params=_struct(info.params),
                       count=info.count, bytes=info.bytes, version=info.version, checksum=info.checksum,
                       shards=[pb.ShardInfo(**shard.model_dump()) for shard in info.shards])


def _present(request, *names: str) -> dict:
    """The optional fields the message sets: proto3 `optional` tells unset from zero, as JSON's absence does."""
    return {name: getattr(request, name) for name in names if request.HasField(name)}


def _listed(request, *names: str) -> dict:
    """The repeated fields the message fills: an empty one stands for JSON's absence (the default)."""
    return {name: list(getattr(request, name)) for name in names if len(getattr(request, name))}


def _dynamics(request) -> dict:
    return {"queries": [list(v.values) for v in request.queries], "trace": request.trace,
            "explain": request.explain, **_present(request, "steps", "step_size", "tolerance", "min_version")}


def _results(response: schemas.RetrieveResponse) -> pb.RetrieveResponse:
    return pb.RetrieveResponse(results=[
        pb.MemoryResult(
            state=r.state, energy=r.energy, steps=r.steps, converged=r.converged, trace=r.trace or [],
            nearest=pb.Nearest(id=r.nearest.id, similarity=r.nearest.similarity) if r.nearest else None,
            explanation=[pb.ExplainedStep(state=step.state, energy=step.energy, top_memories=[
                pb.TopMemory(id=m.id, weight=m.weight) for m in step.top_memories]) for step in r.explanation or ()])
        for r in response.results])


def _image(rows: list[list[float]]) -> list[pb.Vector]:
    return [pb.Vector(values=row) for row in rows]


def _text_explanation(explained: schemas.ExplainTextResponse) -> pb.ExplainResponse:
    """REST's nested [layer][head][query][key] attention as one row-major float32 array and its shape."""
    shape = (len(explained.layers), len(explained.heads), len(explained.tokens), len(explained.tokens))
    attention = np.asarray(explained.attention, dtype=np.float32).reshape(shape)
    nxt = explained.next_token
    return pb.ExplainResponse(
        model=explained.model, tokens=[pb.PromptToken(text=t.text, id=t.id) for t in explained.tokens],
        layers=explained.layers, heads=explained.heads, attention=attention.ravel().tolist(), attention_shape=shape,
        next_token=pb.NextToken(distribution=nxt.distribution, candidates=[
            pb.NextTokenCandidate(token=c.token, token_id=c.token_id, logit=c.logit, probability=c.probability,
                                  kept_by_top_k=c.kept_by_top_k, kept_by_top_p=c.kept_by_top_p)
            for c in nxt.candidates]))


def _fidelity(report: Fidelity) -> pb.Fidelity:
    return pb.Fidelity(version=report.version, sample_size=report.sample_size, noise=report.noise,
                       patterns=pb.Agreement(**report.patterns.model_dump()),
                       noisy=pb.Agreement(**report.noisy.model_dump()), same_nearest=report.same_nearest)


class AmserveServicer(pb_grpc.AmserveServicer):
    def __init__(self, ops: Operations, api_keys: ApiKeys):
        self.ops = ops
        self.api_keys = api_keys

    async def _call(self, route: str, context: grpc.aio.ServicerContext,
                    handler: Callable[[str | None], Awaitable]):
        """Authenticates, then runs handler(tenant): validation and service errors → status codes;
        metrics as for REST."""
        started = time.perf_counter()
        metrics.IN_FLIGHT.labels("grpc").inc()
        status = grpc.StatusCode.OK
        try:
            try:
                tenant = self.api_keys.tenant(dict(context.invocation_metadata()).get("authorization"))
                return await handler(tenant)
            except ValidationError as exc:
                raise validation_error(exc) from exc
        except errors.ServiceError as exc:
            status = grpc_code(exc)
            # the envelope's code and field as trailers: one gRPC status stands for several of them
            trailers = [("amserve-error-code", exc.code)]
            if exc.field and exc.field.isascii():
                trailers.append(("amserve-error-field", exc.field))
            if (seconds := getattr(exc, "retry_after", None)) is not None:
                trailers.append(("retry-after", str(max(1, round(seconds)))))
            context.set_trailing_metadata(tuple(trailers))
            message = f"{exc.field}: {exc.message}" if exc.field and not exc.message.startswith(exc.field) else exc.message
            await context.abort(status, message)
        finally:
            metrics.IN_FLIGHT.labels("grpc").dec()
            metrics.REQUEST_DURATION.labels(route, "grpc", metrics.model_of(route), status.name).observe(
                time.perf_counter() - started)
            metrics.REQUESTS.labels(route, "grpc", status.name).inc()

    async def CreateBank(self, request, context):
        async def handler(tenant):
            body = schemas.CreateBank.model_validate(
                {"kind": request.kind, "dim": request.dim, "params": json_format.MessageToDict(request.params)})
            return _bank_info(await self.ops.create_bank(tenant, request.bank, body))
        return await self._call("CreateBank", context, handler)

    async def ListBanks(self, request, context):
        async def handler(tenant):
            listing = await self.ops.list_banks(tenant)
            return pb.ListBanksResponse(banks=[_bank_info(b) for b in listing.banks])
        return await self._call("ListBanks", context, handler)

    async def GetBank(self, request, context):
        async def handler(tenant):
            return _bank_info(await self.ops.get_bank(tenant, request.bank))
        return await self._call("GetBank", context, handler)

    async def BankFidelity(self, request, context):
        async def handler(tenant):
            options = schemas.FidelityRequest.model_validate(_present(request, "sample_size", "noise"))
            return _fidelity(await self.ops.fidelity(tenant, request.bank, options.sample_size, options.noise))
        return await self._call("BankFidelity", context, handler)

    async def DeleteBank(self, request, context):
        async def handler(tenant):
            await self.ops.delete_bank(tenant, request.bank)
            return pb.DeleteBankResponse()
        return await self._call("DeleteBank", context, handler)

    async def Store(self, request, context):
        async def handler(tenant):
            body = schemas.StoreRequest.model_validate(
                {"patterns": [list(v.values) for v in request.patterns], "ids": list(request.ids) or None})
            stored = await self.ops.store(tenant, request.bank, body)
            return pb.StoreResponse(ids=stored.ids, count=stored.count, version=stored.version)
        return await self._call("Store", context, handler)

    async def DeletePattern(self, request, context):
        async def handler(tenant):
            deleted = await self.ops.delete_pattern(tenant, request.bank, request.id)
            return pb.DeletePatternResponse(version=deleted.version)
        return await self._call("DeletePattern", context, handler)

    async def Retrieve(self, request, context):
        async def handler(tenant):
            body = schemas.RetrieveRequest.model_validate(_dynamics(request))
            return _results(await self.ops.retrieve(tenant, request.bank, body))
        return await self._call("Retrieve", context, handler)

    async def Complete(self, request, context):
        async def handler(tenant):
            body = schemas.CompleteRequest.model_validate(
                {**_dynamics(request), "mask": [list(m.values) for m in request.mask]})
            return _results(await self.ops.complete(tenant, request.bank, body))
        return await self._call("Complete", context, handler)

    async def CompleteImage(self, request, context):
        async def handler(_tenant):
            body = schemas.CompleteImageRequest.model_validate({
                "model": request.model or "energy-transformer",
                "image": [list(row.values) for row in request.image],
                "mask": [list(row.values) for row in request.mask], "explain": request.explain,
                **_present(request, "steps")})
            done = await self.ops.complete_image(body)
            return pb.CompleteImageResponse(model=done.model, image=_image(done.image), energy_trace=done.energy_trace,
                                            frames=[pb.ImageFrame(image=_image(f.image), energy=f.energy,
                                                                  attention_energy=f.attention_energy,
                                                                  hopfield_energy=f.hopfield_energy)
                                                    for f in done.frames or ()])
        return await self._call("CompleteImage", context, handler)

    async def ListModels(self, request, context):
        async def handler(_tenant):
            listing = await self.ops.models()
            return pb.ListModelsResponse(models=[
                pb.ModelCard(id=m.id, task=m.task, ready=m.ready, details=_struct(m.details)) for m in listing.data])
        return await self._call("ListModels", context, handler)

    async def Explain(self, request, context):
        async def handler(_tenant):
            body = schemas.ExplainTextRequest.model_validate({
                "prompt": request.prompt, **_present(request, "temperature", "top_k", "top_p", "top_n"),
                **_listed(request, "layers", "heads")})
            return _text_explanation(await self.ops.explain_text(body))
        return await self._call("Explain", context, handler)

    async def Generate(self, request, context):
        """Server-streaming: a validation or queue error aborts before the first chunk."""
        fields = {"prompt": request.prompt, "stop": list(request.stop) or None,
                  **_present(request, "max_tokens", "temperature", "top_k", "top_p", "seed", "logprobs", "timeout")}
        events = await self._call("Generate", context, lambda tenant: self.ops.start_generation(
            tenant, schemas.GenerateRequest.model_validate(fields)))
        async with contextlib.aclosing(events):
            async for event in events:
                yield _generate_chunk(self.ops.generate_chunk(event))


    async def Chat(self, request, context):
        """Server-streaming, as /v1/chat/completions with stream=true and the usage asked for."""
        fields = {"model": request.model, "stop": list(request.stop) or None, "logprobs": request.logprobs,
                  "ignore_eos": request.ignore_eos, "stream": True, "stream_options": {"include_usage": True},
                  "messages": [{"role": m.role, "content": m.content} for m in request.messages],
                  **_present(request, "max_tokens", "temperature", "top_p", "seed", "top_logprobs", "n", "min_tokens")}
        chunks = await self._call("Chat", context, lambda tenant: self.ops.stream_chat_completions(
            tenant, schemas.ChatCompletionsRequest.model_validate(fields)))
        async with contextlib.aclosing(chunks):
            async for chunk in chunks:
                yield _chat_chunk(chunk)


def _chat_chunk(chunk: dict) -> pb.ChatChunk:
    """An OpenAI chat.completion.chunk as the gRPC one (one choice, or only the usage)."""
    if not chunk["choices"]:
        return pb.ChatChunk(usage=pb.Usage(**chunk["usage"]))
    choice = chunk["choices"][0]
    message = pb.ChatChunk(index=choice["index"], role=choice["delta"].get("role", ""),
                           text=choice["delta"].get("content", ""), finish_reason=choice["finish_reason"] or "")
    for entry in (choice["logprobs"] or {}).get("content", []):
        message.logprobs.CopyFrom(pb.ChatTokenLogprob(token=entry["token"], logprob=entry["logprob"], top_logprobs=[
            pb.ChatTopLogprob(token=top["token"], logprob=top["logprob"]) for top in entry["top_logprobs"]]))
    return message


def _generate_chunk(chunk: dict) -> pb.GenerateChunk:
    message = pb.GenerateChunk(text=chunk["text"], finish_reason=chunk.get("finish_reason", ""))
    if "token_id" in chunk:
        message.token_id = chunk["token_id"]
    if "logprobs" in chunk:
        message.logprobs.CopyFrom(pb.TokenLogprob(**{**chunk["logprobs"], "top": [
            pb.Alternative(**alt) for alt in chunk["logprobs"]["top"]]}))
    if "usage" in chunk:
        message.usage.CopyFrom(pb.Usage(**chunk["usage"]))
    return message


def create_server(ops: Operations, *, max_message_bytes: int = 64 * 1024 * 1024, api_keys: ApiKeys = ApiKeys({}),
                  max_in_flight: int = 512) -> tuple[grpc.aio.Server, health.aio.HealthServicer]:
    options = [("grpc.max_receive_message_length", max_message_bytes),
               ("grpc.max_send_message_length", max_message_bytes)]
    # Past max_in_flight concurrent RPCs grpc answers RESOURCE_EXHAUSTED at once (load shedding).
    server = grpc.aio.server(options=options, maximum_concurrent_rpcs=max_in_flight)
    pb_grpc.add_AmserveServicer_to_server(AmserveServicer(ops, api_keys), server)
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    reflection.enable_server_reflection(
        (SERVICE_NAME, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name, reflection.SERVICE_NAME), server)
    return server, health_servicer
