"""The REST gateway's ASGI middleware (`FrontDoor`): front-door load shedding, request metrics, body
size limit and the data plane's short path.

Pure ASGI (no per-request task). Probes and /metrics are neither shed nor measured: a saturated
gateway must still answer its orchestrator and its scraper.
"""

from __future__ import annotations

import time

from fastapi.responses import JSONResponse
from fastapi.routing import APIRoute
from pydantic import ValidationError
from starlette.datastructures import State
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from service import errors, metrics
from service.api.errors import MethodNotAllowed, error_body, http_status, retry_after
from service.banks.registry import BANK_NAME

PROBES = ("/metrics", "/healthz/live", "/healthz/ready")


def replaying(body: bytes, receive: Receive) -> Receive:
    """`receive` for an app downstream of one that read the body already: the body, then `receive`'s messages."""
    replayed = False

    async def replay() -> Message:
        nonlocal replayed
        if replayed:
            return await receive()
        replayed = True
        return {"type": "http.request", "body": body, "more_body": False}
    return replay


def body_too_large(max_bytes: int) -> errors.TooLarge:
    return errors.TooLarge(f"request body exceeds {max_bytes} bytes", field="body")


async def read_body(receive: Receive, max_bytes: int | None = None) -> bytes | None:
    """The request's whole body; None if the client went away first. Past `max_bytes`, TooLarge as
    soon as the chunks read exceed it."""
    chunks, received, more = [], 0, True
    while more:
        message = await receive()
        if message["type"] != "http.request":
            return None
        chunks.append(message.get("body", b""))
        received += len(chunks[-1])
        more = message.get("more_body", False)
        if max_bytes is not None and received > max_bytes:
            raise body_too_large(max_bytes)
    return b"".join(chunks)


def error_response(exc: errors.ServiceError) -> JSONResponse:
    """The error envelope with its status, Retry-After, WWW-Authenticate and Allow headers."""
    headers = {"WWW-Authenticate": "Bearer"} if isinstance(exc, errors.Unauthenticated) else {}
    if isinstance(exc, MethodNotAllowed):
        headers["Allow"] = ", ".join(exc.allow)
    if (seconds := retry_after(exc)) is not None:
        headers["Retry-After"] = str(max(1, round(seconds)))
    return JSONResponse(error_body(exc), status_code=http_status(exc), headers=headers)


class FrontDoor:
    """The gateway's own ASGI layer, one frame per request (as four nested layers it cost the tiny bank
    about 4 % of its rate under wrk), in front of the FastAPI app and its own middleware
    (`rest.Gateway`), doing in order:

    * front-door load shedding: past `max_in_flight` requests in progress, 503 + Retry-After at once,
      before reading the body, so admitted requests keep a bounded latency under overload;
    * request duration and count per route template;
    * 413 for bodies over `max_body_bytes`, by Content-Length or by counting a streamed body;
    * the data plane's short path: the memory routes (store, retrieve, complete:
      `endpoint(bank, body, ops, tenant)`) answered below FastAPI. The route is found by its own path
      pattern, the body parsed by pydantic-core from its JSON bytes in one pass, the tenant and the
      operations taken from the app's state: on a small bank FastAPI's routing and dependency solving
      cost more per request than the retrieval itself. Whatever this path would not take as it is
      (another content type, a bad bank name, a body that does not validate) goes on to FastAPI with
      its body, so every error is the one any route answers; the routes are FastAPI's as usual and
      write the OpenAPI document.
    """

    def __init__(self, app: ASGIApp, state: State, memory_routes: list[APIRoute], max_body_bytes: int,
                 max_in_flight: int):
        self.app = app
        self.state = state  # the app's: its operations and API keys
        self.max_body_bytes = max_body_bytes
        self.max_in_flight = max_in_flight
        self.in_flight = 0
        # Read when scraped: a set() per request would take the gauge's lock twice more.
        metrics.IN_FLIGHT.labels("rest").set_function(lambda: self.in_flight)
        # The labelled series, looked up once each: a labels() call costs more than the observation.
        self.series: dict[tuple[str, int], tuple] = {}
        self.memory_routes = []
        for route in memory_routes:
            [body_param] = route.dependant.body_params
            parameters = {param.name for param in route.dependant.path_params + route.dependant.body_params}
            parameters |= {dependency.name for dependency in route.dependant.dependencies}
            if parameters != {"bank", body_param.name, "ops", "tenant"} or route.methods != {"POST"}:
                raise TypeError(f"{route.path}: a memory route is POST endpoint(bank, body, ops, tenant), "
                                f"not {route.methods} {parameters}")
            self.memory_routes.append((route, body_param.field_info.annotation, body_param.name))

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"] in PROBES:
            return await self.app(scope, receive, send)
        if self.in_flight >= self.max_in_flight:
            metrics.REJECTIONS.labels(reason="in_flight_limit").inc()
            overloaded = errors.Overloaded(f"more than {self.max_in_flight} requests in progress; retry shortly")
            return await error_response(overloaded)(scope, receive, send)
        self.in_flight += 1
        started, status = time.perf_counter(), 500

        async def recording_send(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self._answer(scope, receive, recording_send)
        finally:
            self.in_flight -= 1
            duration, count = self._series(getattr(scope.get("route"), "path", "unmatched"), status)
            duration.observe(time.perf_counter() - started)
            count.inc()

    def _series(self, route: str, status: int) -> tuple:
        if (route, status) not in self.series:
            self.series[route, status] = (
                metrics.REQUEST_DURATION.labels(route, "rest", metrics.model_of(route), str(status)),
                metrics.REQUESTS.labels(route, "rest", str(status)))
        return self.series[route, status]

    async def _answer(self, scope: Scope, receive: Receive, send: Send) -> None:
        headers = dict(reversed(scope["headers"]))  # the first of a repeated header counts, as in Starlette
        length = headers.get(b"content-length")
        if length is not None and length.isdigit() and int(length) > self.max_body_bytes:
            return await self._refuse(body_too_large(self.max_body_bytes), scope, receive, send)
        if length is None:
            # A streamed body: read it here (the app would buffer it anyway) so the limit answers 413.
            try:
                body = await read_body(receive, self.max_body_bytes)
            except errors.TooLarge as too_large:
                return await self._refuse(too_large, scope, receive, send)
            if body is None:  # the client went away
                return
            receive = replaying(body, receive)
        if scope["method"] == "POST":
            for route, body_model, body_name in self.memory_routes:
                if (match := route.path_regex.match(scope["path"])) is not None:
                    return await self._memory(route, body_model, body_name, match["bank"], headers,
                                              scope, receive, send)
        await self.app(scope, receive, send)

    async def _memory(self, route: APIRoute, body_model: type, body_name: str, bank: str, headers: dict,
                      scope: Scope, receive: Receive, send: Send) -> None:
        """The short path for one memory route, or FastAPI for what it would not take as it is."""
        media_type = headers.get(b"content-type", b"").partition(b";")[0].strip().lower()
        if media_type != b"application/json" or not BANK_NAME.fullmatch(bank):
            return await self.app(scope, receive, send)
        scope["route"] = route  # as FastAPI's router sets it: the metrics' route template
        state = self.state
        try:
            authorization = headers.get(b"authorization")
            # 401 before the body is looked at, as FastAPI's dependencies do
            tenant = state.api_keys.tenant(authorization.decode("latin-1") if authorization is not None else None)
            if (body := await read_body(receive)) is None:
                return
            try:
                parsed = body_model.model_validate_json(body)
            except ValidationError:
                return await self.app(scope, replaying(body, receive), send)
            response = await route.endpoint(bank=bank, ops=state.operations, tenant=tenant, **{body_name: parsed})
        except errors.ServiceError as exc:
            response = error_response(exc)
        await response(scope, receive, send)

    @staticmethod
    async def _refuse(too_large: errors.TooLarge, scope: Scope, receive: Receive, send: Send) -> None:
        metrics.REJECTIONS.labels(reason="body_too_large").inc()
        await error_response(too_large)(scope, receive, send)
