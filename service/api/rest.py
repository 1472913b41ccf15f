"""REST transport (FastAPI): routers of thin routes over the shared operations; errors in one JSON shape.

The routes reach the operations, the API keys and the settings through `app.state` (set by
`create_app`) with dependencies, as FastAPI's documentation and vLLM's entrypoints do.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator, Awaitable
from http import HTTPStatus
from typing import Annotated

from fastapi import APIRouter, Depends, FastAPI, Path, Query, Request, Response, Security
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse
from fastapi.routing import APIRoute
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from pydantic import BaseModel
from starlette.exceptions import HTTPException
from starlette.routing import Match, Mount
from starlette.types import Receive, Scope, Send

from service import __version__, errors, metrics
from service.api import docs, explorer, schemas
from service.api.auth import ApiKeys
from service.api.errors import MalformedBody, MethodNotAllowed, from_validation
from service.api.middleware import FrontDoor, error_response
from service.api.operations import Operations
from service.banks.registry import BANK_NAME, BankInfo, Fidelity

VERSION_HEADER = "Amserve-Bank-Version"
NO_TELEMETRY = {"tracing": False, "metrics": False, "logs": False}
HTTP_METHODS = ("GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS")
BankPath = Annotated[str, Path(pattern=f"^{BANK_NAME.pattern}$")]


# ----- the OpenAPI document -------------------------------------------------------------------

ERROR_MEANINGS = {
    400: "The body is not readable JSON.",
    401: "No valid API key (on a service with API keys).",
    404: "No such bank, pattern or model.",
    409: "The bank exists already, an id is stored with another vector, or the bank has no patterns.",
    413: "The body, or the prompt, is over the service's limit.",
    422: "Invalid input; `field` names it.",
    429: "Too many generations in progress or waiting; retry after Retry-After seconds.",
    501: "This backend does not offer the operation.",
    503: "Overloaded, or a dependency unavailable; retry after Retry-After seconds.",
}
WITH_BODY = (400, 413, 422)  # what any route reading a JSON body can answer


def answers(*statuses: int) -> dict:
    """The error statuses a route can answer, each in the error envelope."""
    return {status: {"model": schemas.ErrorResponse, "description": ERROR_MEANINGS[status]} for status in statuses}


def links(*operation_ids: str, **parameters: str) -> dict:
    """OpenAPI links from an answer to the operations it leads to (clients and the stateful fuzzer follow them)."""
    return {op: {"operationId": op, "parameters": parameters} for op in operation_ids}


# By reference, for a route whose own answers are not JSON (the other routes put it in the components).
ENVELOPE = {"schema": {"$ref": "#/components/schemas/ErrorResponse"}}
SERVER_SENT_EVENTS = {"text/event-stream": {"schema": {
    "type": "string", "description": "with stream=true: `data: {chunk}` per event, then `data: [DONE]`"}}}


def operation_id(route: APIRoute) -> str:
    """The route's function name: short, stable operation ids for links and generated clients."""
    return route.name


# ----- dependencies ---------------------------------------------------------------------------


# Async, like every dependency here: FastAPI runs a plain `def` dependency in its thread pool, a hop
# per request that costs more than what these do.
async def operations(request: Request) -> Operations:
    return request.app.state.operations


# The API key as the OpenAPI document's security scheme (Swagger UI's "Authorize"); not an error when
# absent: an open service takes none, a service with keys answers 401 itself.
bearer = HTTPBearer(auto_error=False, scheme_name="ApiKey",
                    description="An API key from `amserve keys create`; needed when the service has keys.")


async def caller(request: Request,
                 credentials: Annotated[HTTPAuthorizationCredentials | None, Security(bearer)]) -> str | None:
    """The tenant of the request's API key (None on an open service); 401 without a valid key."""
    return tenant_of(request)


def tenant_of(request: Request) -> str | None:
    return request.app.state.api_keys.tenant(request.headers.get("authorization"))


async def metrics_access(request: Request) -> None:
    """A key for /metrics only with --protect-metrics: the document declares no scheme for it."""
    if request.app.state.protect_metrics:
        tenant_of(request)


def json_answer(answer: BaseModel) -> Response:
    """An answer the operations built from engine columns, as JSON serialised by pydantic-core: returned
    as a Response, FastAPI neither re-validates it against the response model nor encodes it again."""
    return Response(answer.model_dump_json(), media_type="application/json")


Ops = Annotated[Operations, Depends(operations)]
Caller = Annotated[str | None, Depends(caller)]


# ----- routes ---------------------------------------------------------------------------------

# Every route past the probes needs a key (with keys) and is shed under overload.
GUARDED = answers(401, 503)
probes = APIRouter(tags=["probes"])
banks = APIRouter(prefix="/v1/banks", responses=GUARDED)
# Answered by service.api.middleware.FrontDoor; declared here for FastAPI's fallback and the document.
memory = APIRouter(prefix="/v1/banks", responses=GUARDED)
models = APIRouter(tags=["models"], responses=GUARDED)
generation = APIRouter(tags=["generate"], responses=GUARDED)


@probes.get("/healthz/live")
async def live() -> dict:
    return {"status": "live"}


@probes.get("/healthz/ready", response_model=schemas.Readiness,
            responses={503: {"model": schemas.Readiness, "description": "The backend cannot serve."}})
async def ready(ops: Ops) -> JSONResponse:
    """503 when the backend cannot serve; 200 naming the degraded parts when it serves in part (reads
    go on while the store is away, so the orchestrator should keep sending them)."""
    is_ready = await ops.backend.ready()
    body = {"ready": is_ready, "backend": ops.backend.name, "degraded": await ops.backend.degraded()}
    return JSONResponse(body, status_code=200 if is_ready else 503)


@probes.get("/metrics", dependencies=[Depends(metrics_access)], response_class=PlainTextResponse,
            responses={401: {"description": ERROR_MEANINGS[401], "content": {"application/json": ENVELOPE}}},
            description="Prometheus text format; 401 only with --protect-metrics.")
async def prometheus() -> Response:
    return Response(generate_latest(), media_type=CONTENT_TYPE_LATEST)


@memory.post("/{bank}/store", response_model=schemas.StoreResponse, tags=["memory"], responses={
    **answers(*WITH_BODY, 404, 409),
    200: {"links": links("retrieve", "complete", bank="$request.path.bank")
          | links("delete_pattern", bank="$request.path.bank", pattern_id="$response.body#/ids/0")}})
async def store(bank: BankPath, body: schemas.StoreRequest, ops: Ops, tenant: Caller) -> Response:
    return json_answer(await ops.store(tenant, bank, body))


@memory.post("/{bank}/retrieve", response_model=schemas.RetrieveResponse, tags=["memory"],
             responses=answers(*WITH_BODY, 404, 409))
async def retrieve(bank: BankPath, body: schemas.RetrieveRequest, ops: Ops, tenant: Caller) -> Response:
    return json_answer(await ops.retrieve(tenant, bank, body))


@memory.post("/{bank}/complete", response_model=schemas.RetrieveResponse, tags=["memory"],
             responses=answers(*WITH_BODY, 404, 409))
async def complete(bank: BankPath, body: schemas.CompleteRequest, ops: Ops, tenant: Caller) -> Response:
    return json_answer(await ops.complete(tenant, bank, body))


@banks.put("/{bank}", status_code=201, response_model=BankInfo, tags=["banks"], responses={
    **answers(*WITH_BODY, 409),
    201: {"links": links("get_bank", "store", "retrieve", "complete", "delete_bank", bank="$response.body#/name")}})
async def create_bank(bank: BankPath, body: schemas.CreateBank, ops: Ops, tenant: Caller):
    return await ops.create_bank(tenant, bank, body)


@banks.get("", response_model=schemas.BankList, tags=["banks"])
async def list_banks(ops: Ops, tenant: Caller):
    return await ops.list_banks(tenant)


@banks.get("/{bank}", response_model=BankInfo, tags=["banks"], responses=answers(404, 422))
async def get_bank(bank: BankPath, ops: Ops, tenant: Caller):
    return await ops.get_bank(tenant, bank)


@banks.get("/{bank}/fidelity", response_model=Fidelity, tags=["banks"], responses=answers(404, 409, 422),
           description="How well a drdam bank's random features approximate the exact rbf log-sum-exp energy on a "
                       "sample of its own stored patterns and noisy copies of them; 409 when the bank does not keep "
                       "its patterns.")
async def fidelity(bank: BankPath, ops: Ops, tenant: Caller,
                   sample_size: Annotated[int, Query(ge=1, le=schemas.MAX_FIDELITY_SAMPLE)] = 64,
                   noise: Annotated[float, Query(ge=0, le=2, allow_inf_nan=False)] = 0.1):
    return await ops.fidelity(tenant, bank, sample_size, noise)


@banks.delete("/{bank}", status_code=204, tags=["banks"], responses=answers(404, 422))
async def delete_bank(bank: BankPath, ops: Ops, tenant: Caller) -> Response:
    await ops.delete_bank(tenant, bank)
    return Response(status_code=204)


@banks.delete("/{bank}/patterns/{pattern_id}", status_code=204, tags=["memory"], responses=answers(404, 422))
async def delete_pattern(bank: BankPath, pattern_id: str, ops: Ops, tenant: Caller) -> Response:
    """204; the bank's version after the deletion comes in the Amserve-Bank-Version header."""
    deleted = await ops.delete_pattern(tenant, bank, pattern_id)
    return Response(status_code=204, headers={VERSION_HEADER: str(deleted.version)})


@models.post("/v1/complete", dependencies=[Depends(caller)], response_model=schemas.CompleteImageResponse,
             responses=answers(*WITH_BODY))
async def complete_image(body: schemas.CompleteImageRequest, ops: Ops):
    return await ops.complete_image(body)


@models.get("/v1/models", dependencies=[Depends(caller)], response_model=schemas.ModelList)
async def list_models(ops: Ops):
    return await ops.models()


@generation.post("/v1/explain", dependencies=[Depends(caller)], response_model=schemas.ExplainTextResponse, responses=answers(*WITH_BODY),
                 description="The text model explained by its own forward pass: the prompt's tokens, the causal "
                             "softmax attention [layer][head][query][key] of the layers and heads asked for, and the "
                             "next-token candidates with what temperature, top-k and top-p make of them; 413 past "
                             "--max-attention-weights (layers × heads × tokens²).")
async def explain_text(body: schemas.ExplainTextRequest, ops: Ops) -> Response:
    return json_answer(await ops.explain_text(body))


@generation.post("/v1/generate", response_model=schemas.GenerateResponse,
                 responses={**answers(*WITH_BODY, 429), 200: {"content": SERVER_SENT_EVENTS}},
                 description="Generate text; with stream=true, Server-Sent Events: one chunk per token, then the "
                             "finish chunk (finish_reason, usage), then [DONE].")
async def generate(body: schemas.GenerateRequest, request: Request, ops: Ops, tenant: Caller):
    return await streamed_or_whole(request, body.stream, ops.stream_generate, ops.generate, tenant, body)


@generation.post("/v1/completions", responses={**answers(*WITH_BODY, 404, 429), 200: {"content": SERVER_SENT_EVENTS}},
                 description="OpenAI-compatible text completions (streaming too): prompt lists, echo with prompt "
                             "logprobs (max_tokens 0 scores the prompt), n, and vLLM's min_tokens and ignore_eos.")
async def completions(body: schemas.CompletionsRequest, request: Request, ops: Ops, tenant: Caller):
    return await streamed_or_whole(request, body.stream, ops.stream_completions, ops.completions, tenant, body)


@generation.post("/v1/chat/completions", responses={**answers(*WITH_BODY, 404, 429),
                                                     200: {"content": SERVER_SENT_EVENTS}},
                 description="OpenAI-compatible chat completions: the messages rendered with the model's own chat "
                             "template; with stream=true, chat.completion.chunk deltas.")
async def chat_completions(body: schemas.ChatCompletionsRequest, request: Request, ops: Ops, tenant: Caller):
    return await streamed_or_whole(request, body.stream, ops.stream_chat_completions, ops.chat_completions, tenant,
                                   body)


# ----- errors ---------------------------------------------------------------------------------


async def service_error(_: Request, exc: errors.ServiceError) -> JSONResponse:
    return error_response(exc)


async def invalid_request(_: Request, exc: RequestValidationError) -> JSONResponse:
    return error_response(from_validation(list(exc.errors())))


async def http_error(request: Request, exc: HTTPException) -> JSONResponse:
    """What FastAPI and Starlette raise themselves, in the same envelope: a body FastAPI cannot read,
    a path no route has, a method the path does not take."""
    if exc.status_code == 400:
        return error_response(MalformedBody(f"body: not readable ({exc.__cause__ or exc.detail})", field="body"))
    if exc.status_code == 404:
        return error_response(errors.NotFound(f"no route {request.url.path}; the API is described at /openapi.json"))
    if exc.status_code == 405:
        return error_response(MethodNotAllowed(f"{request.method} is not allowed on {request.url.path}",
                                               allow=allowed_methods(request)))
    code = HTTPStatus(exc.status_code).phrase.lower().replace(" ", "_")  # any other: named by its status
    return JSONResponse({"error": {"code": code, "message": str(exc.detail)}}, status_code=exc.status_code,
                        headers=exc.headers)


def allowed_methods(request: Request) -> list[str]:
    """Every method some route takes at this path: Starlette's own Allow names only the first route's."""
    # As the app saw the path, before a mount it went through moved root_path on.
    scope = {**request.scope, "root_path": request.scope.get("app_root_path", request.scope.get("root_path", ""))}
    allowed: set[str] = set()
    for route in request.app.router.routes:
        if isinstance(route, Mount):  # the docs' assets: static files, read with GET and HEAD
            allowed |= {"GET", "HEAD"} if route.matches(scope)[0] is Match.FULL else set()
        else:
            allowed |= {method for method in HTTP_METHODS if route.matches({**scope, "method": method})[0] is Match.FULL}
    return sorted(allowed)


# ----- streaming and cancellation -------------------------------------------------------------


def server_sent_events(chunks: AsyncIterator[dict]) -> StreamingResponse:
    """`data: {json}` per chunk, then `data: [DONE]`. If the client leaves, Starlette cancels this
    stream and closing `chunks` cancels the generations."""
    async def lines() -> AsyncIterator[bytes]:
        async with contextlib.aclosing(chunks):
            async for chunk in chunks:
                yield f"data: {json.dumps(chunk)}\n\n".encode()
        yield b"data: [DONE]\n\n"
    return StreamingResponse(lines(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})


async def streamed_or_whole(request: Request, stream: bool, streamed, whole, tenant: str | None, body):
    """A generation route's answer: Server-Sent Events from `streamed`, or `whole`'s answer unless the
    client went away first."""
    if stream:
        return server_sent_events(await streamed(tenant, body))
    return await unless_disconnected(request, whole(tenant, body))


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
               protect_metrics: bool = False, max_in_flight: int = 512) -> Gateway:
    # Swagger UI and ReDoc come from service.api.docs, with their assets served here, not from a CDN.
    # No OpenTelemetry: the service exports Prometheus metrics, and FastAPI's native telemetry asks the
    # OpenTelemetry providers (and the environment) on every request.
    app = Gateway(title="amserve", version=__version__, docs_url=None, redoc_url=None,
                  generate_unique_id_function=operation_id, telemetry=NO_TELEMETRY,
                  description="Associative memories, the Energy Transformer and decoder LMs.")
    app.state.operations = ops
    app.state.api_keys = api_keys
    app.state.protect_metrics = protect_metrics
    # Busiest first: a request is matched against the routes in order (FrontDoor answers most
    # store, retrieve and complete requests before routing; the memory routes take the rest).
    for router in (memory, banks, probes, models, generation, docs.pages, explorer.pages):
        app.include_router(router)
    app.mount(docs.ASSETS_URL, docs.assets(), name="docs_assets")
    app.mount(explorer.URL, explorer.files(), name="explorer")  # the page at /explorer/
    app.add_exception_handler(errors.ServiceError, service_error)
    app.add_exception_handler(RequestValidationError, invalid_request)
    app.add_exception_handler(HTTPException, http_error)
    app.front_door = FrontDoor(app.past_front_door, app.state, memory.routes, max_body_bytes, max_in_flight)
    return app


class Gateway(FastAPI):
    """The FastAPI app with its `FrontDoor` in front: every request meets the front door first, ahead
    of FastAPI's own middleware (server errors, telemetry, its body limit), five ASGI layers that a
    short-path request has no use for; whatever the front door passes on enters FastAPI as usual."""

    front_door: FrontDoor | None = None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        await (self.front_door or self.past_front_door)(scope, receive, send)

    async def past_front_door(self, scope: Scope, receive: Receive, send: Send) -> None:
        await super().__call__(scope, receive, send)
