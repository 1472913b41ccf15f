"""Typed errors from the service's error envelope {"error": {"code", "message", "field"}} (REST) or its
gRPC status with the `amserve-error-code`, `amserve-error-field` and `retry-after` trailers."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import grpc
import httpx


class AmserveError(Exception):
    """An error answered by the service, or met on the way to it.

    `code` is the service's stable name for it (e.g. "not_found"), `field` the offending input if the
    service named one, `status` the HTTP status (REST) or the grpc.StatusCode (gRPC), and `retry_after`
    the seconds the service asked to wait before trying again (None when it asked nothing).
    """

    def __init__(self, message: str, *, code: str = "internal", field: str | None = None,
                 status: int | grpc.StatusCode | None = None, retry_after: float | None = None):
        super().__init__(message)
        self.message = message
        self.code = code
        self.field = field
        self.status = status
        self.retry_after = retry_after

    def __str__(self) -> str:
        return f"{self.code}: {self.message}"


class InvalidArgument(AmserveError):
    """The request is malformed or its values are refused (HTTP 400/422, INVALID_ARGUMENT)."""


class Unauthorized(AmserveError):
    """No API key, or not a valid one (HTTP 401, UNAUTHENTICATED)."""


class NotFound(AmserveError):
    """Unknown bank, pattern or model (HTTP 404, NOT_FOUND)."""


class Conflict(AmserveError):
    """The bank exists, the id is stored with another vector, or the bank is empty (HTTP 409)."""


class PayloadTooLarge(AmserveError):
    """The body or prompt is over the service's limit (HTTP 413, RESOURCE_EXHAUSTED)."""


class Overloaded(AmserveError):
    """The service's queue is full: try again after `retry_after` seconds (HTTP 503/429, UNAVAILABLE)."""


class Unavailable(AmserveError):
    """The service, or what it depends on, cannot serve right now; also: it could not be reached."""


class Timeout(AmserveError):
    """No answer within the client's timeout (the request may still have run)."""


# What may be tried again, after `retry_after` seconds or a backoff: the service did not do the work.
RETRYABLE = (Overloaded, Unavailable)

BY_CODE: dict[str, type[AmserveError]] = {
    "invalid_argument": InvalidArgument,
    "unauthenticated": Unauthorized,
    "not_found": NotFound,
    "already_exists": Conflict,
    "conflict": Conflict,
    "too_large": PayloadTooLarge,
    "overloaded": Overloaded,
    "too_many_requests": Overloaded,
    "unavailable": Unavailable,
}

# For answers without the service's code: from a proxy, or from the HTTP/gRPC layer itself.
BY_HTTP_STATUS: dict[int, type[AmserveError]] = {
    400: InvalidArgument, 401: Unauthorized, 403: Unauthorized, 404: NotFound, 409: Conflict,
    413: PayloadTooLarge, 422: InvalidArgument, 429: Overloaded, 502: Unavailable, 503: Unavailable,
    504: Timeout,
}
BY_GRPC_CODE: dict[grpc.StatusCode, type[AmserveError]] = {
    grpc.StatusCode.INVALID_ARGUMENT: InvalidArgument,
    grpc.StatusCode.UNAUTHENTICATED: Unauthorized,
    grpc.StatusCode.PERMISSION_DENIED: Unauthorized,
    grpc.StatusCode.NOT_FOUND: NotFound,
    grpc.StatusCode.ALREADY_EXISTS: Conflict,
    grpc.StatusCode.FAILED_PRECONDITION: Conflict,
    grpc.StatusCode.RESOURCE_EXHAUSTED: PayloadTooLarge,  # gRPC's own message size limit says this too
    grpc.StatusCode.UNAVAILABLE: Unavailable,
    grpc.StatusCode.DEADLINE_EXCEEDED: Timeout,
}


def seconds(value: str | None) -> float | None:
    """A Retry-After value in seconds (the service sends whole seconds; an HTTP date is not waited for)."""
    try:
        return max(0.0, float(value)) if value is not None else None
    except ValueError:
        return None


def from_http(response: httpx.Response) -> AmserveError:
    """The error a non-2xx answer stands for (its body read)."""
    try:
        envelope = response.json()["error"]
        code, message, field = envelope["code"], envelope["message"], envelope.get("field")
    except (ValueError, KeyError, TypeError):  # not the service's envelope
        code, message, field = None, response.text or response.reason_phrase, None
    kind = BY_CODE.get(code) or BY_HTTP_STATUS.get(response.status_code, AmserveError)
    return kind(message, code=code or f"http_{response.status_code}", field=field, status=response.status_code,
                retry_after=seconds(response.headers.get("retry-after")))


def from_grpc(error: grpc.RpcError) -> AmserveError:
    """The error a failed gRPC call stands for."""
    status = error.code()
    trailers = dict(error.trailing_metadata() or ())
    code = trailers.get("amserve-error-code")
    retry_after = seconds(trailers.get("retry-after"))
    kind = BY_CODE.get(code) or BY_GRPC_CODE.get(status, AmserveError)
    return kind(error.details() or status.name, code=code or status.name.lower(),
                field=trailers.get("amserve-error-field"), status=status, retry_after=retry_after)


@contextlib.contextmanager
def http_errors() -> Iterator[None]:
    """httpx's own errors (nothing answered in time, no connection) as service errors."""
    try:
        yield
    except httpx.ConnectTimeout as exc:  # before the other timeouts: nothing was sent
        raise Unavailable(f"cannot reach the service: {exc!r}", code="unreachable") from exc
    except httpx.TimeoutException as exc:
        raise Timeout(f"no answer in time ({type(exc).__name__})", code="timeout") from exc
    except httpx.TransportError as exc:
        raise Unavailable(f"cannot reach the service: {exc!r}", code="unreachable") from exc


@contextlib.contextmanager
def grpc_errors() -> Iterator[None]:
    try:
        yield
    except grpc.RpcError as exc:
        raise from_grpc(exc) from exc
