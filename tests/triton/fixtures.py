"""A real Triton serving a freshly exported model repository, for any test package:

    from tests.triton.fixtures import triton_server  # noqa: F401  (in a conftest.py)

The repository holds small random weights for the Energy Transformer and the LM (a 2-layer GPT-2
with the GPT-2 vocabulary), so Triton loads every model in seconds.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Sequence
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from service.config import Settings
from service.engines import energy_transformer
from service.triton.export import export
from service.triton.launcher import TritonServer
from service.triton.spec import ASSOCIATIVE_MEMORY, ENERGY_TRANSFORMER, LLM, MODELS, ModelSpec

TEST_LM_NAME = "tiny-gpt2"
TEST_LM_CONTEXT = 16384  # long enough that a generation outlasts the tests that cancel it
TEST_LM = {"model_type": "gpt2", "vocab_size": 50257, "n_positions": TEST_LM_CONTEXT, "n_embd": 32, "n_layer": 2,
           "n_head": 4, "tie_word_embeddings": False}
EOS = 50256  # <|endoftext|> of the GPT-2 vocabulary
# The LM's scheduler in the test repository: one decode slot and one waiting place, so that a
# generation in progress makes the next one wait and the one after that be refused.
TEST_LM_LIMITS = {"max_running_sequences": 1, "max_waiting_sequences": 1, "max_context": TEST_LM_CONTEXT}
MEMORY_ONLY = (ASSOCIATIVE_MEMORY,)


def write_test_weights(repository: Path, models: Sequence[ModelSpec] = MODELS) -> None:
    """Small random weights beside the models' model.py, the same for every call."""
    if ENERGY_TRANSFORMER in models:
        torch.manual_seed(0)
        model = energy_transformer.EnergyTransformer(energy_transformer.ETConfig())
        energy_transformer.save(model, repository / ENERGY_TRANSFORMER.name / "1")
    if LLM in models:
        write_test_lm(repository / LLM.name / "1")


def write_test_lm(directory: Path) -> Path:
    """An HF GPT-2 directory with random weights wide enough that greedy choices never hinge on
    rounding; its end-of-text row is zero, so greedy decoding never stops before the context is full."""
    generator = torch.Generator().manual_seed(0)
    d, vocab, layers = TEST_LM["n_embd"], TEST_LM["vocab_size"], TEST_LM["n_layer"]

    def normal(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=generator)

    tensors = {"transformer.wte.weight": normal(vocab, d), "transformer.wpe.weight": 0.1 * normal(TEST_LM_CONTEXT, d),
               "transformer.ln_f.weight": torch.ones(d), "transformer.ln_f.bias": torch.zeros(d)}
    for i in range(layers):
        block = f"transformer.h.{i}."
        for norm in ("ln_1", "ln_2"):
            tensors[block + norm + ".weight"], tensors[block + norm + ".bias"] = torch.ones(d), torch.zeros(d)
        for name, (rows, cols) in {"attn.c_attn": (d, 3 * d), "attn.c_proj": (d, d),
                                   "mlp.c_fc": (d, 4 * d), "mlp.c_proj": (4 * d, d)}.items():
            tensors[block + name + ".weight"] = normal(rows, cols) / rows**0.5
            tensors[block + name + ".bias"] = torch.zeros(cols)
    head = normal(vocab, d)
    head[EOS] = 0.0
    tensors["lm_head.weight"] = head
    directory.mkdir(parents=True, exist_ok=True)
    save_file(tensors, directory / "model.safetensors", metadata={"format": "pt"})
    (directory / "config.json").write_text(json.dumps(TEST_LM))
    return directory


def export_for_tests(repository: Path, data_dir: Path, models: Sequence[ModelSpec] = MODELS, **batching) -> Path:
    """The service's default export with test weights and its own data dir; `batching` overrides the knobs."""
    defaults = Settings()
    knobs = dict(max_batch_size=defaults.max_batch_size, max_queue_delay_us=defaults.max_queue_delay_us,
                 max_queue_size=defaults.max_queue_size)
    export(repository, data_dir=data_dir, device_kind="auto", models=models, served_model_name=TEST_LM_NAME,
           **TEST_LM_LIMITS, **{**knobs, **batching})
    write_test_weights(repository, models)
    return repository


def launch(root: Path, models: Sequence[ModelSpec] = MODELS, **batching) -> TritonServer:
    """Export `models` into `root`/repository and start Triton on free ports, banks under `root`/data."""
    repository = export_for_tests(root / "repository", root / "data", models, **batching)
    return TritonServer(repository, http_port=0, grpc_port=0, metrics_port=0, data_dir=root / "data",
                        log_path=root / "tritonserver.log").start()


@pytest.fixture(scope="session")
def triton_server(tmp_path_factory) -> Iterator[TritonServer]:
    server = launch(tmp_path_factory.mktemp("triton"))
    try:
        yield server
    finally:
        server.stop()
