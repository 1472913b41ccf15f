"""Triton Python model `llm`: text generation, decoupled (one response per generated token).

The weights are the HF directory beside this file (`amserve export` converts the default GGUF into
it). The request format and the handling of a generation live in service/triton/llm.py: a
continuous-batching scheduler owned by this instance runs every generation; execute() only submits
the requests and returns, and the scheduler's thread sends each event through the request's
response sender.
"""

import json
from pathlib import Path

import triton_python_backend_utils as pb_utils

from service.triton import python_backend
from service.triton.llm import TextGeneration
from service.triton.spec import LLM
from service.triton.wire import json_tensor


class TritonPythonModel:
    def initialize(self, args):
        config = json.loads(args["model_config"])
        if not pb_utils.using_decoupled_model_transaction_policy(config):
            raise pb_utils.TritonModelException("the llm model must be decoupled: it streams tokens")
        parameters = {key: config["parameters"][key]["string_value"] for key in LLM.parameters}
        weights = Path(args["model_repository"]) / args["model_version"]
        self.generation = TextGeneration.load(weights, python_backend.instance_device(args), parameters)

    def execute(self, requests):
        for request in requests:
            inputs = python_backend.inputs(request, LLM.input_names)
            self.generation.start(inputs, _Stream(request.get_response_sender()))
        return None  # decoupled: the responses go through the senders

    def finalize(self):
        self.generation.close()


class _Stream:
    def __init__(self, sender):
        self.sender = sender

    def send(self, event, final):
        flags = pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL if final else 0
        self.sender.send(python_backend.response({"TOKEN": json_tensor(event)}), flags=flags)

    def fail(self, error):
        self.sender.send(python_backend.error_response(error), flags=pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL)

    def is_cancelled(self):
        return self.sender.is_cancelled()
