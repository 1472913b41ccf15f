"""Writes the Triton model repository: one `<model>/config.pbtxt` and `<model>/1/model.py` per model.

Each model is described by a ModelSpec (service/triton/spec.py); its config is built as a
`ModelConfig` protobuf (the schema Triton parses) and written in text format, so field names and
types are checked on export. The model.py files are the sources under `service/triton/templates/`, copied verbatim: thin Python-backend
classes whose logic lives in `service`.

Weights lie beside each model.py: the Energy Transformer's small files are checked in (written by
`amserve train energy-transformer`) and copied along when exporting elsewhere; the LM's are converted
from the default GGUF by `export_llm` (`amserve export` does it unless --skip-llm) and git-ignored.

The checked-in `model_repository/` is `export()`'s output for the service's default settings with
KIND_CPU. The Energy Transformer's config publishes its `image_size` (read from the weights' config)
so that the gateway knows it without reading the repository's files.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from google.protobuf import text_format
from tritonclient.grpc import model_config_pb2 as pb

from service.config import KV_DTYPES, LM_DTYPES, Settings
from service.engines.energy_transformer import CONFIG_FILE as ET_CONFIG
from service.engines.energy_transformer import WEIGHTS_FILE as ET_WEIGHTS_FILE
from service.engines.lm.weights import DEFAULT_MODEL_NAME
from service.triton.spec import ENERGY_TRANSFORMER, LLM, MODELS, ModelSpec

TEMPLATES = Path(__file__).parent / "templates"
# The checked-in repository, where the Energy Transformer's trained weights are kept.
SHIPPED_REPOSITORY = Path(__file__).resolve().parents[2] / "model_repository"
ET_WEIGHTS = (ET_CONFIG, ET_WEIGHTS_FILE)
LLM_FILES = ("model.safetensors", "config.json", "tokenizer.json", "tokenizer_config.json")
CONFIG_HEADER = "# Written by `amserve export`; edit its ModelSpec in service/triton/spec.py, not this file.\n"
DEVICE_KINDS = ("auto", "cpu", "gpu")


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
        if key in settings:  # the Energy Transformer's image_size only where its weights are
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
    served_model_name: str = DEFAULT_MODEL_NAME,
    max_running_sequences: int | None = None,
    max_waiting_sequences: int | None = None,
    max_context: int | None = None,
    dtype: str | None = None,
    kv_dtype: str | None = None,
) -> list[Path]:
    """Write each model's config.pbtxt and 1/model.py under `repository`; returns the files written.

    A relative `data_dir` is kept relative: the model resolves it against Triton's working directory
    at load, as the gateway does against its own. The LM's scheduler limits default to the service's
    settings. Exporting elsewhere than the checked-in repository copies the Energy Transformer's
    weights from it when they are there (not listed in the return value).
    """
    repository = Path(repository)
    batching = Batching(max_batch_size, max_queue_delay_us, max_queue_size)
    kind = instance_kind(device_kind)
    defaults = Settings()
    settings = {
        "data_dir": str(data_dir),
        "served_model_name": served_model_name,
        "max_running_sequences": str(max_running_sequences or defaults.max_running_sequences),
        "max_waiting_sequences": str(max_waiting_sequences or defaults.max_waiting_sequences),
        "max_context": str(max_context or defaults.max_context),
        "dtype": dtype or defaults.dtype,
        "kv_dtype": kv_dtype or defaults.kv_dtype,
    }
    written = []
    for spec in models:
        version = repository / spec.name / "1"
        version.mkdir(parents=True, exist_ok=True)
        if spec is ENERGY_TRANSFORMER:
            _copy_shipped_et_weights(version)
            settings.update(_image_size(version))
        config_path = repository / spec.name / "config.pbtxt"
        config_path.write_text(CONFIG_HEADER + text_format.MessageToString(model_config(spec, batching, kind, settings)))
        model_path = shutil.copyfile(TEMPLATES / spec.template, version / "model.py")
        written += [config_path, Path(model_path)]
    return written


def _image_size(version: Path) -> dict[str, str]:
    """{"image_size": …} from the Energy Transformer's weights beside its model.py; {} without them."""
    if not all((version / name).is_file() for name in ET_WEIGHTS):
        return {}
    return {"image_size": str(json.loads((version / ET_CONFIG).read_text())["image_size"])}


def _copy_shipped_et_weights(version: Path) -> None:
    shipped = SHIPPED_REPOSITORY / ENERGY_TRANSFORMER.name / "1"
    if version.resolve() == shipped.resolve():
        return
    for name in ET_WEIGHTS:
        if (shipped / name).is_file() and not (version / name).exists():
            shutil.copyfile(shipped / name, version / name)


def llm_exported(repository: str | Path) -> bool:
    """True when `<repository>/llm/1/` holds a converted model."""
    version = Path(repository) / LLM.name / "1"
    return all((version / name).is_file() for name in LLM_FILES)


def export_llm(repository: str | Path, gguf: str | Path | None = None, *, progress: bool = True,
               force: bool = False) -> Path:
    """Convert the default LM (or the `gguf` file) into `<repository>/llm/1/` as HF safetensors; a
    no-op when it is there already, unless `force`. The files are written into a scratch folder
    beside them and moved in place, config.json last, so an interrupted or concurrent conversion
    never leaves a half-written model behind. Returns the model directory."""
    from service.engines.lm.weights import convert_gguf, default_gguf_path

    version = Path(repository) / LLM.name / "1"
    if llm_exported(repository) and not force:
        return version
    version.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".convert-", dir=version) as scratch:
        convert_gguf(gguf if gguf is not None else default_gguf_path(), scratch, progress=progress)
        for name in sorted(LLM_FILES, key=lambda n: n == "config.json"):
            os.replace(Path(scratch) / name, version / name)
    return version


def read_config(repository: str | Path, model: str) -> pb.ModelConfig:
    path = Path(repository) / model / "config.pbtxt"
    return text_format.Parse(path.read_text(), pb.ModelConfig())


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
    parser.add_argument("--max-running-sequences", type=int, default=defaults.max_running_sequences,
                        help="LM decode slots of the llm model's scheduler")
    parser.add_argument("--max-waiting-sequences", type=int, default=defaults.max_waiting_sequences,
                        help="LM requests waiting for a slot before 429")
    parser.add_argument("--max-context", type=int, default=defaults.max_context, help="LM context per slot")
    parser.add_argument("--dtype", choices=LM_DTYPES, default=defaults.dtype, help="LM weights (see amserve serve)")
    parser.add_argument("--kv-dtype", choices=KV_DTYPES, default=defaults.kv_dtype, help="LM KV cache")
    parser.add_argument("--skip-llm", action="store_true",
                        help="do not convert the default LM into <repository>/llm/1 (Triton then fails to "
                             "load the llm model until it is there)")


def run(args: argparse.Namespace) -> int:
    for path in export(args.model_repository, data_dir=args.data_dir, max_batch_size=args.max_batch_size,
                       max_queue_delay_us=args.max_queue_delay_us, max_queue_size=args.max_queue_size,
                       device_kind=args.device_kind, max_running_sequences=args.max_running_sequences,
                       max_waiting_sequences=args.max_waiting_sequences, max_context=args.max_context,
                       dtype=args.dtype, kv_dtype=args.kv_dtype):
        print(path)
    et_weights = args.model_repository / ENERGY_TRANSFORMER.name / "1"
    if not all((et_weights / name).is_file() for name in ET_WEIGHTS):
        print(f"note: no Energy Transformer weights in {et_weights}; write them with "
              f"`amserve train energy-transformer --out {et_weights}`", file=sys.stderr)
    if args.skip_llm:
        return 0
    if llm_exported(args.model_repository):
        print(f"{args.model_repository / LLM.name / '1'} (already converted)")
    else:
        print(export_llm(args.model_repository, progress=True))
    return 0
