"""REST transport (FastAPI): routers of thin routes over the shared operations; errors in one JSON shape.

The routes reach the operations, the API keys and the settings through `app.state` (set by
`create_app`) with dependencies, as FastAPI's documentation and vLLM's entrypoints do.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Annotated

from fastapi import APIRouter, Depends, FastAPI, Header, Request, Response
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from service import __version__, errors, metrics
from service.api import schemas
from service.api.auth import ApiKeys
from service.api.errors import from_validation
from service.api.middleware import AdmissionLimit, BodyLimit, Measured, error_response
from service.api.operations import Operations
from service.banks.registry import BankInfo

VERSION_HEADER = "Amserve-Bank-Version"
ERRORS = {status: {"model": schemas.ErrorResponse} for status in (401, 404, 409, 413, 422, 429, 503)}


# ----- dependencies ---------------------------------------------------------------------------


def operations(request: Request) -> Operations:
    return request.app.state.operations


def caller(request: Request, authorization: Annotated[str | None, Header()] = None) -> str | None:
    """The tenant of the request's API key (None on an open service); 401 without a valid key."""
    return request.app.state.api_keys.tenant(authorization)


def metrics_access(request: Request, authorization: Annotated[str | None, Header()] = None) -> None:
    if request.app.state.protect_metrics:
        request.app.state.api_keys.tenant(authorization)


Ops = Annotated[Operations, Depends(operations)]
Caller = Annotated[str | None, Depends(caller)]


# ----- routes ---------------------------------------------------------------------------------

probes = APIRouter(tags=["probes"])
banks = APIRouter(prefix="/v1/banks", responses=ERRORS)
models = APIRouter(tags=["models"], responses=ERRORS)
generation = APIRouter(tags=["generate"], responses=ERRORS)


@probes.get("/healthz/live")
async def live() -> dict:
    return {"status": "live"}


@probes.get("/healthz/ready")
async def ready(ops: Ops) -> JSONResponse:
    """503 when the backend cannot serve; 200 naming the degraded parts when it serves in part (reads
    go on while the store is away, so the orchestrator should keep sending them)."""
    is_ready = await ops.backend.ready()
    body = {"ready": is_ready, "backend": ops.backend.name, "degraded": await ops.backend.degraded()}
    return JSONResponse(body, status_code=200 if is_ready else 503)


@probes.get("/metrics", dependencies=[Depends(metrics_access)])
async def prometheus() -> Response:
    return Response(generate_latest(), media_type=CONTENT_TYPE_LATEST)


@banks.put("/{bank}", status_code=201, response_model=BankInfo, tags=["banks"])
async def create_bank(bank: str, body: schemas.CreateBank, ops: Ops, tenant: Caller):
    return await ops.create_bank(tenant, bank, body)


@banks.get("", response_model=schemas.BankList, tags=["banks"])
async def list_banks(ops: Ops, tenant: Caller):
    return await ops.list_banks(tenant)


@banks.get("/{bank}", response_model=BankInfo, tags=["banks"])
async def get_bank(bank: str, ops: Ops, tenant: Caller):
    return await ops.get_bank(tenant, bank)


@banks.delete("/{bank}", status_code=204, tags=["banks"])
async def delete_bank(bank: str, ops: Ops, tenant: Caller) -> Response:
    await ops.delete_bank(tenant, bank)
    return Response(status_code=204)


@banks.post("/{bank}/store", response_model=schemas.StoreResponse, tags=["memory"])
async def store(bank: str, body: schemas.StoreRequest, ops: Ops, tenant: Caller):
    return await ops.store(tenant, bank, body)


@banks.delete("/{bank}/patterns/{pattern_id}", status_code=204, tags=["memory"])
async def delete_pattern(bank: str, pattern_id: str, ops: Ops, tenant: Caller) -> Response:
    """204; the bank's version after the deletion comes in the Amserve-Bank-Version header."""
    deleted = await ops.delete_pattern(tenant, bank, pattern_id)
    return Response(status_code=204, headers={VERSION_HEADER: str(deleted.version)})


@banks.post("/{bank}/retrieve", response_model=schemas.RetrieveResponse, tags=["memory"])
async def retrieve(bank: str, body: schemas.RetrieveRequest, ops: Ops, tenant: Caller):
    return await ops.retrieve(tenant, bank, body)


@banks.post("/{bank}/complete", response_model=schemas.RetrieveResponse, tags=["memory"])
async def complete(bank: str, body: schemas.CompleteRequest, ops: Ops, tenant: Caller):
    return await ops.complete(tenant, bank, body)


@models.post("/v1/complete", dependencies=[Depends(caller)], response_model=schemas.CompleteImageResponse)
async def complete_image(body: schemas.CompleteImageRequest, ops: Ops):
    return await ops.complete_image(body)


@models.get("/v1/models", dependencies=[Depends(caller)], response_model=schemas.ModelList)
async def list_models(ops: Ops):
    return await ops.models()


@generation.post("/v1/generate", response_model=schemas.GenerateResponse,
                 description="Generate text; with stream=true, Server-Sent Events: one chunk per token, then the "
                             "finish chunk (finish_reason, usage), then [DONE].")
async def generate(body: schemas.GenerateRequest, request: Request, ops: Ops, tenant: Caller):
    if body.stream:
        return server_sent_events(await ops.start_generation(tenant, body), ops.generate_chunk)
    return await unless_disconnected(request, ops.generate(tenant, body))


@generation.post("/v1/completions", description="OpenAI-compatible text completions (streaming too).")
async def completions(body: schemas.CompletionsRequest, request: Request, ops: Ops, tenant: Caller):
    await ops.check_lm(body.model)
    if body.stream:
        events = await ops.start_generation(tenant, body)
        completion_id = f"cmpl-{uuid.uuid4().hex}"
        return server_sent_events(events, lambda e: ops.completion_chunk(body.model, completion_id, e))
    return await unless_disconnected(request, ops.completions(tenant, body))


# ----- errors ---------------------------------------------------------------------------------


async def service_error(_: Request, exc: errors.ServiceError) -> JSONResponse:
    return error_response(exc)


async def invalid_request(_: Request, exc: RequestValidationError) -> JSONResponse:
    return error_response(from_validation(list(exc.errors())))


# ----- streaming and cancellation -------------------------------------------------------------


def server_sent_events(events: AsyncIterator[dict], to_chunk: Callable[[dict], dict]) -> StreamingResponse:
    """`data: {json}` per event, then `data: [DONE]`. If the client leaves, Starlette cancels this
    stream and closing `events` cancels the generation."""
    async def lines() -> AsyncIterator[bytes]:
        async with contextlib.aclosing(events):
            async for event in events:
                yield f"data: {json.dumps(to_chunk(event))}\n\n".encode()
        yield b"data: [DONE]\n\n"
    return StreamingResponse(lines(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})


async def unless_disconnected(request: Request, work: Awaitable, poll: float = 0.25):
    """Await `work`, cancelling it (and so its generation) if the client disconnects first."""
    task = asyncio.ensure_future(work)
    try:
        while True:
            done, _ = await asyncio.wait({task}, timeout=poll)
            if done:
                return task.result()
            if await request.is_disconnected():
                task.cancel()
                metrics.REJECTIONS.labels(reason="client_disconnected").inc()
                raise asyncio.CancelledError("client disconnected")
    finally:
        task.cancel()


# ----- the app --------------------------------------------------------------------------------


def create_app(ops: Operations, *, max_body_bytes: int = 64 * 1024 * 1024, api_keys: ApiKeys = ApiKeys({}),
               protect_metrics: bool = False, max_in_flight: int = 512) -> FastAPI:
    app = FastAPI(title="amserve", version=__version__,
                  description="Associative memories, the Energy Transformer and decoder LMs.")
    app.state.operations = ops
    app.state.api_keys = api_keys
    app.state.protect_metrics = protect_metrics
    for router in (probes, banks, models, generation):
        app.include_router(router)
    app.add_exception_handler(errors.ServiceError, service_error)
    app.add_exception_handler(RequestValidationError, invalid_request)
    app.add_middleware(BodyLimit, max_bytes=max_body_bytes)
    app.add_middleware(Measured)
    app.add_middleware(AdmissionLimit, max_in_flight=max_in_flight)  # outermost: sheds before any work
    return app
