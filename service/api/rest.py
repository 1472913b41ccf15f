"""REST transport (FastAPI): thin routes over the shared operations; errors in one JSON shape."""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable

from fastapi import Depends, FastAPI, Header, Request, Response
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from service import __version__, errors, metrics
from service.api import schemas
from service.api.auth import ApiKeys
from service.api.errors import error_body, from_validation, http_status, retry_after
from service.api.operations import Limits, Operations
from service.backends.base import Backend

ERRORS = {status: {"model": schemas.ErrorResponse} for status in (401, 404, 409, 413, 422, 429, 503)}


def error_response(exc: errors.ServiceError) -> JSONResponse:
    headers = {"WWW-Authenticate": "Bearer"} if isinstance(exc, errors.Unauthenticated) else {}
    if (seconds := retry_after(exc)) is not None:
        headers["Retry-After"] = str(max(1, round(seconds)))
    return JSONResponse(error_body(exc), status_code=http_status(exc), headers=headers)


class BodyLimit:
    """413 for bodies over `max_bytes`, by Content-Length or by counting a streamed body."""

    def __init__(self, app: ASGIApp, max_bytes: int):
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        too_large = errors.TooLarge(f"request body exceeds {self.max_bytes} bytes", field="body")
        length = dict(scope["headers"]).get(b"content-length")
        if length is not None and length.isdigit() and int(length) > self.max_bytes:
            metrics.REJECTIONS.labels(reason="body_too_large").inc()
            return await error_response(too_large)(scope, receive, send)
        if length is not None:
            return await self.app(scope, receive, send)
        # A streamed body: read it here (the app would buffer it anyway) so the limit answers 413.
        chunks, received, more = [], 0, True
        while more:
            message = await receive()
            if message["type"] != "http.request":
                return
            chunks.append(message.get("body", b""))
            received += len(chunks[-1])
            more = message.get("more_body", False)
            if received > self.max_bytes:
                metrics.REJECTIONS.labels(reason="body_too_large").inc()
                return await error_response(too_large)(scope, receive, send)
        replayed = False

        async def replay() -> Message:
            nonlocal replayed
            if replayed:
                return await receive()
            replayed = True
            return {"type": "http.request", "body": b"".join(chunks), "more_body": False}

        await self.app(scope, replay, send)


class Measured:
    """Request duration, count and in-flight gauge per route template (pure ASGI: no per-request task)."""

    UNMEASURED = ("/metrics", "/healthz/live", "/healthz/ready")

    def __init__(self, app: ASGIApp):
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        started = time.perf_counter()
        status = 500

        async def recording_send(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        metrics.IN_FLIGHT.labels("rest").inc()
        try:
            await self.app(scope, receive, recording_send)
        finally:
            metrics.IN_FLIGHT.labels("rest").dec()
            route = getattr(scope.get("route"), "path", "unmatched")
            if route not in self.UNMEASURED:
                metrics.REQUEST_DURATION.labels(route, "rest", metrics.model_of(route), str(status)).observe(
                    time.perf_counter() - started)
                metrics.REQUESTS.labels(route, "rest", str(status)).inc()


class AdmissionLimit:
    """Front-door load shedding: past `max_in_flight` requests in progress, answer 503 + Retry-After at
    once, before reading the body, so admitted requests keep a bounded latency under overload."""

    EXEMPT = ("/metrics", "/healthz/live", "/healthz/ready")

    def __init__(self, app: ASGIApp, max_in_flight: int):
        self.app = app
        self.max_in_flight = max_in_flight
        self.in_flight = 0

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"] in self.EXEMPT:
            return await self.app(scope, receive, send)
        if self.in_flight >= self.max_in_flight:
            metrics.REJECTIONS.labels(reason="in_flight_limit").inc()
            overloaded = errors.Overloaded(f"more than {self.max_in_flight} requests in progress; retry shortly")
            return await error_response(overloaded)(scope, receive, send)
        self.in_flight += 1
        try:
            await self.app(scope, receive, send)
        finally:
            self.in_flight -= 1


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


def create_app(backend: Backend, *, max_body_bytes: int = 64 * 1024 * 1024, api_keys: ApiKeys = ApiKeys({}),
               protect_metrics: bool = False, limits: Limits = Limits(), max_in_flight: int = 512) -> FastAPI:
    ops = Operations(backend, limits)

    async def tenant(authorization: str | None = Header(default=None)) -> str | None:
        return api_keys.tenant(authorization)

    Tenant = Depends(tenant)
    metrics_guard = [Tenant] if protect_metrics else []
    app = FastAPI(title="amserve", version=__version__,
                  description="Associative memories, the Energy Transformer and decoder LMs.")

    @app.exception_handler(errors.ServiceError)
    async def service_error(_: Request, exc: errors.ServiceError) -> JSONResponse:
        return error_response(exc)

    @app.exception_handler(RequestValidationError)
    async def invalid_request(_: Request, exc: RequestValidationError) -> JSONResponse:
        return error_response(from_validation(list(exc.errors())))

    @app.get("/healthz/live", tags=["probes"])
    async def live() -> dict:
        return {"status": "live"}

    @app.get("/healthz/ready", tags=["probes"])
    async def ready() -> JSONResponse:
        is_ready = await backend.ready()
        return JSONResponse({"ready": is_ready, "backend": backend.name}, status_code=200 if is_ready else 503)

    @app.get("/metrics", tags=["probes"], dependencies=metrics_guard)
    async def prometheus() -> Response:
        return Response(generate_latest(), media_type=CONTENT_TYPE_LATEST)

    @app.put("/v1/banks/{bank}", status_code=201, response_model=schemas.BankInfo, responses=ERRORS, tags=["banks"])
    async def create_bank(bank: str, body: schemas.CreateBank, caller: str | None = Tenant):
        return await ops.create_bank(caller, bank, body)

    @app.get("/v1/banks", response_model=schemas.BankList, tags=["banks"])
    async def list_banks(caller: str | None = Tenant):
        return await ops.list_banks(caller)

    @app.get("/v1/banks/{bank}", response_model=schemas.BankInfo, responses=ERRORS, tags=["banks"])
    async def get_bank(bank: str, caller: str | None = Tenant):
        return await ops.get_bank(caller, bank)

    @app.delete("/v1/banks/{bank}", status_code=204, responses=ERRORS, tags=["banks"])
    async def delete_bank(bank: str, caller: str | None = Tenant) -> Response:
        await ops.delete_bank(caller, bank)
        return Response(status_code=204)

    @app.post("/v1/banks/{bank}/store", response_model=schemas.StoreResponse, responses=ERRORS, tags=["memory"])
    async def store(bank: str, body: schemas.StoreRequest, caller: str | None = Tenant):
        return await ops.store(caller, bank, body)

    @app.delete("/v1/banks/{bank}/patterns/{pattern_id}", status_code=204, responses=ERRORS, tags=["memory"])
    async def delete_pattern(bank: str, pattern_id: str, caller: str | None = Tenant) -> Response:
        await ops.delete_pattern(caller, bank, pattern_id)
        return Response(status_code=204)

    @app.post("/v1/banks/{bank}/retrieve", response_model=schemas.RetrieveResponse, responses=ERRORS,
              tags=["memory"])
    async def retrieve(bank: str, body: schemas.RetrieveRequest, caller: str | None = Tenant):
        return await ops.retrieve(caller, bank, body)

    @app.post("/v1/banks/{bank}/complete", response_model=schemas.RetrieveResponse, responses=ERRORS,
              tags=["memory"])
    async def complete(bank: str, body: schemas.CompleteRequest, caller: str | None = Tenant):
        return await ops.complete(caller, bank, body)

    @app.post("/v1/complete", dependencies=[Tenant], response_model=schemas.CompleteImageResponse,
              responses=ERRORS, tags=["models"])
    async def complete_image(body: schemas.CompleteImageRequest):
        return await ops.complete_image(body)

    @app.post("/v1/generate", response_model=schemas.GenerateResponse, responses=ERRORS, tags=["generate"],
              description="Generate text; with stream=true, Server-Sent Events: one chunk per token, then the "
                          "finish chunk (finish_reason, usage), then [DONE].")
    async def generate(body: schemas.GenerateRequest, request: Request, caller: str | None = Tenant):
        if body.stream:
            events = await ops.start_generation(caller, body)
            return server_sent_events(events, ops.generate_chunk)
        return await unless_disconnected(request, ops.generate(caller, body))

    @app.post("/v1/completions", responses=ERRORS, tags=["generate"],
              description="OpenAI-compatible text completions (streaming too).")
    async def completions(body: schemas.CompletionsRequest, request: Request, caller: str | None = Tenant):
        await ops.check_lm(body.model)
        if body.stream:
            events = await ops.start_generation(caller, body)
            completion_id = f"cmpl-{uuid.uuid4().hex}"
            return server_sent_events(events, lambda e: ops.completion_chunk(body.model, completion_id, e))
        return await unless_disconnected(request, ops.completions(caller, body))

    @app.get("/v1/models", dependencies=[Tenant], response_model=schemas.ModelList, tags=["models"])
    async def models():
        return await ops.models()

    app.add_middleware(BodyLimit, max_bytes=max_body_bytes)
    app.add_middleware(Measured)
    app.add_middleware(AdmissionLimit, max_in_flight=max_in_flight)  # outermost: sheds before any work
    return app
