"""What the three model.py files share inside Triton's Python backend: reading a request's inputs,
the instance's device, and turning an answer (outputs or an exception) into a response.

Imported only by model.py files: `triton_python_backend_utils` exists inside Triton alone.
"""

from __future__ import annotations

import traceback

import numpy as np
import triton_python_backend_utils as pb_utils

from service.errors import ServiceError
from service.triton.wire import error_message, triton_status


def instance_device(args: dict) -> str:
    """The torch device of this model instance (the instance_group kind Triton gave it)."""
    return f"cuda:{args['model_instance_device_id']}" if args["model_instance_kind"] == "GPU" else "cpu"


def inputs(request, names: tuple[str, ...]) -> dict[str, np.ndarray | None]:
    """The request's inputs without their batch dimension (each request is one batch item); None if absent."""
    tensors = {name: pb_utils.get_input_tensor_by_name(request, name) for name in names}
    return {name: None if tensor is None else tensor.as_numpy()[0] for name, tensor in tensors.items()}


def response(answer: dict[str, np.ndarray] | BaseException):
    """Outputs (without the batch dimension) as a response, or an exception as an error response."""
    if isinstance(answer, BaseException):
        return error_response(answer)
    return pb_utils.InferenceResponse([pb_utils.Tensor(name, value[np.newaxis]) for name, value in answer.items()])


def error_response(error: BaseException):
    """The JSON error the gateway decodes (service/triton/wire.py); a bug is logged with its traceback."""
    if not isinstance(error, ServiceError):
        pb_utils.Logger.log_error("".join(traceback.format_exception(error)))
    code = getattr(pb_utils.TritonError, triton_status(error))
    return pb_utils.InferenceResponse(error=pb_utils.TritonError(error_message(error), code))
