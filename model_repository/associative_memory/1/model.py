"""Triton Python model `associative_memory`: named memory banks, persisted under the data dir.

The request format and the handling of a batch live in service/triton/associative_memory.py; this
class hands Triton's requests to it and its answers back as responses.
"""

import json
import os
from pathlib import Path

from service.banks.registry import BankRegistry
from service.banks.store import SQLiteStore
from service.triton import python_backend
from service.triton.associative_memory import AssociativeMemory
from service.triton.spec import ASSOCIATIVE_MEMORY


class TritonPythonModel:
    def initialize(self, args):
        config = json.loads(args["model_config"])
        # AMSERVE_DATA_DIR overrides the config, as it does for the gateway (TritonServer(data_dir=...)
        # sets it). A relative data dir is relative to Triton's working directory.
        data_dir = os.environ.get("AMSERVE_DATA_DIR") or config["parameters"]["data_dir"]["string_value"]
        self.store = SQLiteStore(Path(data_dir).resolve())
        self.memory = AssociativeMemory(BankRegistry(self.store, python_backend.instance_device(args)))

    def execute(self, requests):
        batch = [python_backend.inputs(request, ASSOCIATIVE_MEMORY.input_names) for request in requests]
        return [python_backend.response(answer) for answer in self.memory.execute(batch)]

    def finalize(self):
        self.store.close()
