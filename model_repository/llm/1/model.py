"""Triton Python model `llm`: text generation, decoupled (one response per generated token).

The weights are the HF directory beside this file (`amserve export` converts the default GGUF into
it). The request format and the handling of a generation live in service/triton/llm.py: a
continuous-batching scheduler owned by this instance runs every generation; execute() only submits
the requests and returns, and the scheduler's thread sends each event through the request's
response sender.
"""

import json
import traceback
from pathlib import Path

import numpy as np
import triton_python_backend_utils as pb_utils

from service.errors import ServiceError
from service.triton.llm import INPUT_NAMES, PARAMETERS, TextGeneration
from service.triton.wire import error_message, triton_status


class TritonPythonModel:
    def initialize(self, args):
        config = json.loads(args["model_config"])
        if not pb_utils.using_decoupled_model_transaction_policy(config):
            raise pb_utils.TritonModelException("the llm model must be decoupled: it streams tokens")
        parameters = {key: config["parameters"][key]["string_value"] for key in PARAMETERS}
        if args["model_instance_kind"] == "GPU":
            device = f"cuda:{args['model_instance_device_id']}"
        else:
            device = "cpu"
        weights = Path(args["model_repository"]) / args["model_version"]
        self.generation = TextGeneration.load(weights, device, parameters)

    def execute(self, requests):
        for request in requests:
            inputs = {name: _input(request, name) for name in INPUT_NAMES}
            self.generation.start(inputs, _Stream(request.get_response_sender()))
        return None  # decoupled: the responses go through the senders

    def finalize(self):
        self.generation.close()


class _Stream:
    def __init__(self, sender):
        self.sender = sender

    def send(self, event, final):
        token = np.array([[json.dumps(event).encode("utf-8")]], dtype=np.object_)
        flags = pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL if final else 0
        self.sender.send(pb_utils.InferenceResponse([pb_utils.Tensor("TOKEN", token)]), flags=flags)

    def fail(self, error):
        if not isinstance(error, ServiceError):  # a bug, not a bad request
            pb_utils.Logger.log_error("".join(traceback.format_exception(error)))
        code = getattr(pb_utils.TritonError, triton_status(error))
        response = pb_utils.InferenceResponse(error=pb_utils.TritonError(error_message(error), code))
        self.sender.send(response, flags=pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL)

    def is_cancelled(self):
        return self.sender.is_cancelled()


def _input(request, name):
    """The input without its batch dimension (each request is one batch item), None if absent."""
    tensor = pb_utils.get_input_tensor_by_name(request, name)
    return None if tensor is None else tensor.as_numpy()[0]
