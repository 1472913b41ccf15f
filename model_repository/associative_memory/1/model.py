"""Triton Python model `associative_memory`: named memory banks, persisted under the data dir.

The request format and the handling of a batch live in service/triton/associative_memory.py; this
class converts between Triton tensors and numpy and turns failures into per-request errors.
"""

import json
import os
import traceback
from pathlib import Path

import numpy as np
import triton_python_backend_utils as pb_utils

from service.banks.store import SQLiteStore
from service.banks.registry import BankRegistry
from service.errors import ServiceError
from service.triton.associative_memory import INPUT_NAMES, AssociativeMemory
from service.triton.wire import error_message


class TritonPythonModel:
    def initialize(self, args):
        config = json.loads(args["model_config"])
        # AMSERVE_DATA_DIR overrides the config, as it does for the gateway (TritonServer(data_dir=...)
        # sets it). A relative data dir is relative to Triton's working directory.
        data_dir = os.environ.get("AMSERVE_DATA_DIR") or config["parameters"]["data_dir"]["string_value"]
        data_dir = Path(data_dir).resolve()
        if args["model_instance_kind"] == "GPU":
            device = f"cuda:{args['model_instance_device_id']}"
        else:
            device = "cpu"
        self.store = SQLiteStore(data_dir)
        self.memory = AssociativeMemory(BankRegistry(self.store, device))
        # Triton's status per service error code, so its logs and statistics tell them apart; the
        # client reads the code from the JSON message. (pb_utils.TritonError exists from here on.)
        self.triton_codes = {
            "invalid_argument": pb_utils.TritonError.INVALID_ARG,
            "not_found": pb_utils.TritonError.NOT_FOUND,
            "already_exists": pb_utils.TritonError.ALREADY_EXISTS,
            "unavailable": pb_utils.TritonError.UNAVAILABLE,
        }

    def execute(self, requests):
        batch = [{name: _input(request, name) for name in INPUT_NAMES} for request in requests]
        return [self._response(answer) for answer in self.memory.execute(batch)]

    def finalize(self):
        self.store.close()

    def _response(self, answer):
        if isinstance(answer, dict):
            tensors = [pb_utils.Tensor(name, value[np.newaxis]) for name, value in answer.items()]
            return pb_utils.InferenceResponse(tensors)
        if isinstance(answer, ServiceError):
            code = self.triton_codes.get(answer.code, pb_utils.TritonError.INTERNAL)
        else:
            pb_utils.Logger.log_error("".join(traceback.format_exception(answer)))
            code = pb_utils.TritonError.INTERNAL
        return pb_utils.InferenceResponse(error=pb_utils.TritonError(error_message(answer), code))


def _input(request, name):
    """The input without its batch dimension (each request is one batch item), None if absent."""
    tensor = pb_utils.get_input_tensor_by_name(request, name)
    return None if tensor is None else tensor.as_numpy()[0]
