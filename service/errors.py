"""Domain errors raised below the API layer; api/errors.py maps them to HTTP and gRPC codes."""


class ServiceError(Exception):
    """Base class: `code` is a stable machine-readable name, `field` the offending input if any."""

    code = "internal"

    def __init__(self, message: str, *, field: str | None = None):
        super().__init__(message)
        self.message = message
        self.field = field


class InvalidArgument(ServiceError):
    code = "invalid_argument"


class Unauthenticated(ServiceError):
    code = "unauthenticated"


class NotFound(ServiceError):
    code = "not_found"


class AlreadyExists(ServiceError):
    code = "already_exists"


class Conflict(ServiceError):
    code = "conflict"


class TooLarge(ServiceError):
    code = "too_large"


class NotSupported(ServiceError):
    """An operation this backend does not offer (another backend does)."""

    code = "not_implemented"


class Retryable(ServiceError):
    """Not the request's fault: the same request may succeed after `retry_after` seconds."""

    def __init__(self, message: str, *, retry_after: float = 1.0):
        super().__init__(message)
        self.retry_after = retry_after


class Overloaded(Retryable):
    """Queue full: the client should retry after `retry_after` seconds."""

    code = "overloaded"


class TooManyRequests(Overloaded):
    """A per-model waiting queue (e.g. text generation) is full: 429 rather than 503."""

    code = "too_many_requests"


class Unavailable(Retryable):
    """A dependency (Triton, the data dir) cannot serve right now."""

    code = "unavailable"
