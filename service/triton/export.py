"""Writes the Triton model repository: one `<model>/config.pbtxt` and `<model>/1/model.py` per model.

Each model is described by a ModelSpec; its config is built as a `ModelConfig` protobuf (the schema
Triton parses) and written in text format, so field names and types are checked on export. The
model.py files are the sources under `service/triton/templates/`, copied verbatim: thin Python-backend
classes whose logic lives in `service`.

The checked-in `model_repository/` is `export()`'s output for the service's default settings with
KIND_CPU; `read_batching_config` hands the same batching knobs to the embedded backend.
"""

from __future__ import annotations

import argparse
import shutil
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from google.protobuf import text_format
from tritonclient.grpc import model_config_pb2 as pb

from service.config import Settings

TEMPLATES = Path(__file__).parent / "templates"
CONFIG_HEADER = "# Written by `amserve export`; edit the ModelSpec in service/triton/export.py, not this file.\n"
DEVICE_KINDS = ("auto", "cpu", "gpu")


@dataclass(frozen=True)
class TensorSpec:
    name: str
    data_type: str  # a Triton DataType name, e.g. "TYPE_FP32"
    dims: tuple[int, ...]  # without the batch dimension
    optional: bool = False
    ragged: bool = False  # requests of one batch may differ in shape


@dataclass(frozen=True)
class ModelSpec:
    name: str
    template: str  # file name under service/triton/templates/, written as <name>/1/model.py
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    parameters: tuple[str, ...] = ()  # export settings the model reads from its config parameters
    decoupled: bool = False  # the model streams any number of responses per request


ASSOCIATIVE_MEMORY = ModelSpec(
    name="associative_memory",
    template="associative_memory_model.py",
    inputs=(
        TensorSpec("OP", "TYPE_STRING", (1,)),
        TensorSpec("BANK", "TYPE_STRING", (1,)),
        TensorSpec("ARGS", "TYPE_STRING", (1,)),
        TensorSpec("VECTORS", "TYPE_FP32", (-1, -1), optional=True, ragged=True),
        TensorSpec("CLAMP", "TYPE_BOOL", (-1, -1), optional=True, ragged=True),
    ),
    outputs=(
        TensorSpec("STATES", "TYPE_FP32", (-1, -1)),
        TensorSpec("RESULT", "TYPE_STRING", (1,)),
    ),
    parameters=("data_dir",),
)

MODELS: tuple[ModelSpec, ...] = (ASSOCIATIVE_MEMORY,)


@dataclass(frozen=True)
class Batching:
    """Triton's dynamic batcher knobs; `max_batch_size` counts requests per execute() call."""

    max_batch_size: int
    max_queue_delay_us: int
    max_queue_size: int


def instance_kind(device_kind: str) -> int:
    if device_kind not in DEVICE_KINDS:
        raise ValueError(f"device_kind must be one of {DEVICE_KINDS}, got {device_kind!r}")
    if device_kind == "auto":
        import torch

        device_kind = "gpu" if torch.cuda.is_available() else "cpu"
    return pb.ModelInstanceGroup.KIND_GPU if device_kind == "gpu" else pb.ModelInstanceGroup.KIND_CPU


def model_config(spec: ModelSpec, batching: Batching, kind: int, settings: dict[str, str]) -> pb.ModelConfig:
    config = pb.ModelConfig(name=spec.name, backend="python", max_batch_size=batching.max_batch_size)
    for tensor in spec.inputs:
        config.input.add(name=tensor.name, data_type=pb.DataType.Value(tensor.data_type), dims=tensor.dims,
                         optional=tensor.optional, allow_ragged_batch=tensor.ragged)
    for tensor in spec.outputs:
        config.output.add(name=tensor.name, data_type=pb.DataType.Value(tensor.data_type), dims=tensor.dims)
    # One instance: a stateful model must not split its banks across copies.
    config.instance_group.add(count=1, kind=kind)
    config.dynamic_batching.max_queue_delay_microseconds = batching.max_queue_delay_us
    config.dynamic_batching.default_queue_policy.max_queue_size = batching.max_queue_size
    if spec.decoupled:
        config.model_transaction_policy.decoupled = True
    for key in spec.parameters:
        config.parameters[key].string_value = settings[key]
    return config


def export(
    repository: str | Path,
    *,
    data_dir: str | Path,
    max_batch_size: int,
    max_queue_delay_us: int,
    max_queue_size: int,
    device_kind: str = "auto",
    models: Sequence[ModelSpec] = MODELS,
) -> list[Path]:
    """Write each model's config.pbtxt and 1/model.py under `repository`; returns the files written.

    A relative `data_dir` is kept relative: the model resolves it against Triton's working directory
    at load, as the gateway does against its own.
    """
    repository = Path(repository)
    batching = Batching(max_batch_size, max_queue_delay_us, max_queue_size)
    kind = instance_kind(device_kind)
    settings = {"data_dir": str(data_dir)}
    written = []
    for spec in models:
        version = repository / spec.name / "1"
        version.mkdir(parents=True, exist_ok=True)
        config_path = repository / spec.name / "config.pbtxt"
        config_path.write_text(CONFIG_HEADER + text_format.MessageToString(model_config(spec, batching, kind, settings)))
        model_path = shutil.copyfile(TEMPLATES / spec.template, version / "model.py")
        written += [config_path, Path(model_path)]
    return written


def read_config(repository: str | Path, model: str) -> pb.ModelConfig:
    path = Path(repository) / model / "config.pbtxt"
    return text_format.Parse(path.read_text(), pb.ModelConfig())


def read_batching_config(repository: str | Path, model: str = ASSOCIATIVE_MEMORY.name) -> tuple[int, int, int]:
    """(max_batch_size, max_queue_delay_us, max_queue_size) from `<repository>/<model>/config.pbtxt`."""
    config = read_config(repository, model)
    batcher = config.dynamic_batching
    return config.max_batch_size, batcher.max_queue_delay_microseconds, batcher.default_queue_policy.max_queue_size


# ----- `amserve export` ----------------------------------------------------------------------


def add_arguments(parser: argparse.ArgumentParser) -> None:
    defaults = Settings()
    parser.add_argument("--model-repository", type=Path, default=defaults.model_repository,
                        help="where to write the repository (default ./model_repository)")
    parser.add_argument("--data-dir", default=str(defaults.data_dir),
                        help="banks' data dir as the models will see it; relative to Triton's working "
                             "directory (default data)")
    parser.add_argument("--max-batch-size", type=int, default=defaults.max_batch_size)
    parser.add_argument("--max-queue-delay-us", type=int, default=defaults.max_queue_delay_us)
    parser.add_argument("--max-queue-size", type=int, default=defaults.max_queue_size)
    parser.add_argument("--device-kind", choices=DEVICE_KINDS, default="auto",
                        help="instance_group kind: gpu when CUDA is present with auto (default)")


def run(args: argparse.Namespace) -> int:
    for path in export(args.model_repository, data_dir=args.data_dir, max_batch_size=args.max_batch_size,
                       max_queue_delay_us=args.max_queue_delay_us, max_queue_size=args.max_queue_size,
                       device_kind=args.device_kind):
        print(path)
    return 0
