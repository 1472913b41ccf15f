"""The REST gateway's ASGI middlewares: body size limit, front-door load shedding and request metrics.

Pure ASGI (no per-request task). Probes and /metrics are neither shed nor measured: a saturated
gateway must still answer its orchestrator and its scraper.
"""

from __future__ import annotations

import time

from fastapi.responses import JSONResponse
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from service import errors, metrics
from service.api.errors import MethodNotAllowed, error_body, http_status, retry_after

PROBES = ("/metrics", "/healthz/live", "/healthz/ready")


def error_response(exc: errors.ServiceError) -> JSONResponse:
    """The error envelope with its status, Retry-After, WWW-Authenticate and Allow headers."""
    headers = {"WWW-Authenticate": "Bearer"} if isinstance(exc, errors.Unauthenticated) else {}
    if isinstance(exc, MethodNotAllowed):
        headers["Allow"] = ", ".join(exc.allow)
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
        length = dict(scope["headers"]).get(b"content-length")
        if length is not None and length.isdigit() and int(length) > self.max_bytes:
            return await self._refuse(scope, receive, send)
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
                return await self._refuse(scope, receive, send)
        replayed = False

        async def replay() -> Message:
            nonlocal replayed
            if replayed:
                return await receive()
            replayed = True
            return {"type": "http.request", "body": b"".join(chunks), "more_body": False}

        await self.app(scope, replay, send)

    async def _refuse(self, scope: Scope, receive: Receive, send: Send) -> None:
        metrics.REJECTIONS.labels(reason="body_too_large").inc()
        too_large = errors.TooLarge(f"request body exceeds {self.max_bytes} bytes", field="body")
        await error_response(too_large)(scope, receive, send)


class Measured:
    """Request duration, count and in-flight gauge per route template (pure ASGI: no per-request task)."""

    def __init__(self, app: ASGIApp):
        self.app = app
        # The labelled series, looked up once each: a labels() call costs more than the observation.
        self.in_flight = metrics.IN_FLIGHT.labels("rest")
        self.series: dict[tuple[str, int], tuple] = {}

    def _series(self, route: str, status: int) -> tuple:
        if (route, status) not in self.series:
            self.series[route, status] = (
                metrics.REQUEST_DURATION.labels(route, "rest", metrics.model_of(route), str(status)),
                metrics.REQUESTS.labels(route, "rest", str(status)))
        return self.series[route, status]

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

        self.in_flight.inc()
        try:
            await self.app(scope, receive, recording_send)
        finally:
            self.in_flight.dec()
            route = getattr(scope.get("route"), "path", "unmatched")
            if route not in PROBES:
                duration, count = self._series(route, status)
                duration.observe(time.perf_counter() - started)
                count.inc()


class AdmissionLimit:
    """Front-door load shedding: past `max_in_flight` requests in progress, answer 503 + Retry-After at
    once, before reading the body, so admitted requests keep a bounded latency under overload."""

    def __init__(self, app: ASGIApp, max_in_flight: int):
        self.app = app
        self.max_in_flight = max_in_flight
        self.in_flight = 0

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"] in PROBES:
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
