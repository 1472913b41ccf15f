"""Service errors → HTTP status / gRPC code, and the one JSON error shape {"error": {code, message, field}}."""

from __future__ import annotations

import grpc
from pydantic import ValidationError

from service import errors


class MalformedBody(errors.InvalidArgument):
    """A body that cannot be read at all (not JSON, not UTF-8): 400, where a readable but invalid one is 422."""


class MethodNotAllowed(errors.ServiceError):
    """A path that exists, asked with a method it does not take: 405, naming the ones it takes in Allow."""

    code = "method_not_allowed"

    def __init__(self, message: str, *, allow: list[str]):
        super().__init__(message)
        self.allow = allow


HTTP_STATUS: dict[type[errors.ServiceError], int] = {
    MalformedBody: 400,
    MethodNotAllowed: 405,
    errors.InvalidArgument: 422,
    errors.Unauthenticated: 401,
    errors.NotFound: 404,
    errors.AlreadyExists: 409,
    errors.Conflict: 409,
    errors.TooLarge: 413,
    errors.NotSupported: 501,
    errors.Overloaded: 503,
    errors.TooManyRequests: 429,
    errors.Unavailable: 503,
}

GRPC_CODE: dict[type[errors.ServiceError], grpc.StatusCode] = {
    errors.InvalidArgument: grpc.StatusCode.INVALID_ARGUMENT,
    errors.Unauthenticated: grpc.StatusCode.UNAUTHENTICATED,
    errors.NotFound: grpc.StatusCode.NOT_FOUND,
    errors.AlreadyExists: grpc.StatusCode.ALREADY_EXISTS,
    errors.Conflict: grpc.StatusCode.FAILED_PRECONDITION,
    errors.TooLarge: grpc.StatusCode.RESOURCE_EXHAUSTED,
    errors.NotSupported: grpc.StatusCode.UNIMPLEMENTED,
    errors.Overloaded: grpc.StatusCode.UNAVAILABLE,
    errors.TooManyRequests: grpc.StatusCode.RESOURCE_EXHAUSTED,
    errors.Unavailable: grpc.StatusCode.UNAVAILABLE,
}


def http_status(exc: errors.ServiceError) -> int:
    return HTTP_STATUS.get(type(exc), 500)


def grpc_code(exc: errors.ServiceError) -> grpc.StatusCode:
    return GRPC_CODE.get(type(exc), grpc.StatusCode.INTERNAL)


def error_body(exc: errors.ServiceError) -> dict:
    body = {"code": exc.code, "message": exc.message}
    if exc.field:
        body["field"] = exc.field
    return {"error": body}


def retry_after(exc: errors.ServiceError) -> float | None:
    return getattr(exc, "retry_after", None)


def field_path(loc: tuple) -> str:
    """('body', 'queries', 0, 1) → 'queries[0][1]'."""
    path = ""
    for part in loc:
        if part in ("body", "query", "path"):
            continue
        path += f"[{part}]" if isinstance(part, int) else (f".{part}" if path else str(part))
    return path or "body"


def from_validation(errs: list[dict]) -> errors.InvalidArgument:
    """The first validation problem, naming its field, as the one error the client sees."""
    first = errs[0]
    if first.get("type") == "json_invalid":
        return MalformedBody(f"body: invalid JSON ({first.get('ctx', {}).get('error', 'decode error')})",
                             field="body")
    field = field_path(tuple(first.get("loc", ())))
    message = first.get("msg", "invalid value").removeprefix("Value error, ")
    return errors.InvalidArgument(f"{field}: {message}", field=field)


def validation_error(exc: ValidationError) -> errors.InvalidArgument:
    return from_validation(exc.errors())
