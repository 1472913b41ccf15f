"""Triton Python model `associative_memory`: named memory banks, persisted in the store (SQLite under
the data dir, or a shared PostgreSQL whose change log this instance follows as a replica).

The request format and the handling of a batch live in service/triton/associative_memory.py; this
class hands Triton's requests to it and its answers back as responses.
"""

import json
import os
import threading
from pathlib import Path

from service.banks.registry import BankRegistry
from service.banks.shards import Placement
from service.banks.store import open_store
from service.triton import python_backend
from service.triton.associative_memory import AssociativeMemory
from service.triton.spec import ASSOCIATIVE_MEMORY


class TritonPythonModel:
    def initialize(self, args):
        config = json.loads(args["model_config"])
        # AMSERVE_DATA_DIR overrides the config, as it does for the gateway (TritonServer(data_dir=...)
        # sets it). A relative data dir is relative to Triton's working directory.
        # AMSERVE_STORE (a postgresql:// DSN) takes the place of the data dir, as for the gateway.
        data_dir = os.environ.get("AMSERVE_DATA_DIR") or config["parameters"]["data_dir"]["string_value"]
        self.store = open_store(os.environ.get("AMSERVE_STORE") or Path(data_dir).resolve())
        # AMSERVE_REPLICA ("index/count") places this replica in the gateway's list: of sharded banks it
        # serves the shards placed on it (service/banks/shards.py).
        registry = BankRegistry(self.store, python_backend.instance_device(args), Placement.from_env())
        self.memory = AssociativeMemory(registry)
        self.stop_following = threading.Event()
        self.follower = threading.Thread(target=registry.follow, args=(self.stop_following,), daemon=True)
        if self.store.shared:
            self.follower.start()

    def execute(self, requests):
        batch = [python_backend.inputs(request, ASSOCIATIVE_MEMORY.input_names) for request in requests]
        return [python_backend.response(answer) for answer in self.memory.execute(batch)]

    def finalize(self):
        self.stop_following.set()
        if self.follower.is_alive():
            self.follower.join()
        self.store.close()
