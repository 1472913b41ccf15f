"""What every Triton model of the service shares on the wire: JSON strings in BYTES tensors, and
service errors carried as JSON in a failed response's message.

A failed response's message is `error_message(exc)`: {code, field, message} (plus retry_after for
a Retryable error), which `error_from_message` turns back into the same exception class on the
gateway's side, so a 422 over the triton backend names the same field as over the embedded one.
"""

from __future__ import annotations

import json
from typing import Any

import numpy as np

from service.errors import InvalidArgument, Retryable, ServiceError

# Triton's status name per service error code, so Triton's logs and statistics tell them apart; the
# client reads the code from the JSON message. Model files map these names to pb_utils.TritonError codes.
TRITON_STATUS = {
    "invalid_argument": "INVALID_ARG",
    "not_found": "NOT_FOUND",
    "already_exists": "ALREADY_EXISTS",
    "unavailable": "UNAVAILABLE",
}


def error_message(exc: BaseException) -> str:
    """The JSON text a failed response carries; anything but a ServiceError is an internal error."""
    if not isinstance(exc, ServiceError):
        return json.dumps({"code": ServiceError.code, "field": None, "message": f"{type(exc).__name__}: {exc}"})
    payload = {"code": exc.code, "field": exc.field, "message": exc.message}
    if isinstance(exc, Retryable):
        payload["retry_after"] = exc.retry_after
    return json.dumps(payload)


def error_from_message(message: str) -> ServiceError | None:
    """Inverse of `error_message`; None when `message` is not one (an error from Triton itself)."""
    try:
        payload = json.loads(message)
        code, text = payload["code"], payload["message"]
    except (ValueError, TypeError, KeyError):
        return None
    cls = next((c for c in _subclasses(ServiceError) if vars(c).get("code") == code), ServiceError)
    if issubclass(cls, Retryable):
        return cls(text, retry_after=payload.get("retry_after", 1.0))
    return cls(text, field=payload.get("field"))


def triton_status(exc: BaseException) -> str:
    """The name of the pb_utils.TritonError code for a failed request (INTERNAL for bugs)."""
    return TRITON_STATUS.get(exc.code, "INTERNAL") if isinstance(exc, ServiceError) else "INTERNAL"


def _subclasses(cls: type) -> list[type]:
    return [sub for direct in cls.__subclasses__() for sub in (direct, *_subclasses(direct))]


def json_tensor(value: Any) -> np.ndarray:
    """A BYTES output [1] holding `value` as JSON (the model adds the batch dimension)."""
    return np.array([json.dumps(value)], dtype=np.object_)


def text_tensor(text: str) -> np.ndarray:
    """A BYTES input [1, 1] holding `text` (a batch of one); lone surrogates pass through as they came."""
    return np.array([[text.encode("utf-8", "surrogatepass")]], dtype=np.object_)


def text_value(value: np.ndarray | None) -> str:
    """The one string of a BYTES input without its batch dimension."""
    if value is None or value.size != 1:
        raise InvalidArgument("expected exactly one string")
    item = value.reshape(-1)[0]
    return item.decode("utf-8") if isinstance(item, bytes) else str(item)
