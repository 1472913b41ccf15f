"""Triton Python model `energy_transformer`: masked image completion with the Energy Transformer.

The weights (model.safetensors, et_config.json) lie beside this file; without them every request is
answered 503. The request format and the handling of a batch live in
service/triton/energy_transformer.py; this class hands Triton's requests to it and its answers back.
"""

from pathlib import Path

import triton_python_backend_utils as pb_utils

from service.triton import python_backend
from service.triton.energy_transformer import ImageCompletion
from service.triton.spec import ENERGY_TRANSFORMER


class TritonPythonModel:
    def initialize(self, args):
        weights = Path(args["model_repository"]) / args["model_version"]
        self.completion = ImageCompletion.load(weights, python_backend.instance_device(args))
        if self.completion.model is None:
            pb_utils.Logger.log_warn(f"{self.completion.missing}: every request is answered 503 Unavailable")

    def execute(self, requests):
        batch = [python_backend.inputs(request, ENERGY_TRANSFORMER.input_names) for request in requests]
        return [python_backend.response(answer) for answer in self.completion.execute(batch)]
