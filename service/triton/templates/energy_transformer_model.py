"""Triton Python model `energy_transformer`: masked image completion with the Energy Transformer.

The weights (model.safetensors, et_config.json) lie beside this file; without them every request is
answered 503. The request format and the handling of a batch live in
service/triton/energy_transformer.py; this class converts between Triton tensors and numpy and turns
failures into per-request errors.
"""

import traceback
from pathlib import Path

import numpy as np
import triton_python_backend_utils as pb_utils

from service.errors import ServiceError
from service.triton.energy_transformer import INPUT_NAMES, ImageCompletion
from service.triton.wire import error_message, triton_status


class TritonPythonModel:
    def initialize(self, args):
        weights = Path(args["model_repository"]) / args["model_version"]
        if args["model_instance_kind"] == "GPU":
            device = f"cuda:{args['model_instance_device_id']}"
        else:
            device = "cpu"
        self.completion = ImageCompletion.load(weights, device)
        if self.completion.model is None:
            pb_utils.Logger.log_warn(f"{self.completion.missing}: every request is answered 503 Unavailable")

    def execute(self, requests):
        batch = [{name: _input(request, name) for name in INPUT_NAMES} for request in requests]
        return [_response(answer) for answer in self.completion.execute(batch)]


def _input(request, name):
    """The input without its batch dimension (each request is one batch item), None if absent."""
    tensor = pb_utils.get_input_tensor_by_name(request, name)
    return None if tensor is None else tensor.as_numpy()[0]


def _response(answer):
    if isinstance(answer, dict):
        return pb_utils.InferenceResponse([pb_utils.Tensor(name, value[np.newaxis]) for name, value in answer.items()])
    if not isinstance(answer, ServiceError):  # a bug, not a bad request
        pb_utils.Logger.log_error("".join(traceback.format_exception(answer)))
    code = getattr(pb_utils.TritonError, triton_status(answer))
    return pb_utils.InferenceResponse(error=pb_utils.TritonError(error_message(answer), code))
