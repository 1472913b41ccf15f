"""The three Triton models' tensors: the one description that the exported config.pbtxt, the model
files and the gateway's requests all derive their input and output names and types from."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class TensorSpec:
    name: str
    data_type: str  # a Triton DataType name, e.g. "TYPE_FP32"
    dims: tuple[int, ...]  # without the batch dimension
    optional: bool = False
    ragged: bool = False  # requests of one batch may differ in shape

    @property
    def wire_type(self) -> str:
        """The datatype name an inference request uses for this tensor, e.g. "FP32", "BYTES"."""
        return "BYTES" if self.data_type == "TYPE_STRING" else self.data_type.removeprefix("TYPE_")


@dataclass(frozen=True)
class ModelSpec:
    name: str
    template: str  # file name under service/triton/templates/, written as <name>/1/model.py
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    parameters: tuple[str, ...] = ()  # export settings the model reads from its config parameters
    decoupled: bool = False  # the model streams any number of responses per request

    @property
    def input_names(self) -> tuple[str, ...]:
        return tuple(tensor.name for tensor in self.inputs)

    def input(self, name: str) -> TensorSpec:
        return next(tensor for tensor in self.inputs if tensor.name == name)


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
        TensorSpec("RESULT", "TYPE_STRING", (1,)),
        TensorSpec("STATES", "TYPE_FP32", (-1, -1)),
        TensorSpec("ENERGY", "TYPE_FP32", (-1,)),
        TensorSpec("STEPS", "TYPE_INT64", (-1,)),
        TensorSpec("CONVERGED", "TYPE_BOOL", (-1,)),
        TensorSpec("NEAREST", "TYPE_STRING", (-1,)),
        TensorSpec("SIMILARITY", "TYPE_FP32", (-1,)),
        TensorSpec("TRACE", "TYPE_FP32", (-1, -1)),
        TensorSpec("STEP_STATES", "TYPE_FP32", (-1, -1, -1)),
        TensorSpec("TOP_IDS", "TYPE_STRING", (-1, -1, -1)),
        TensorSpec("TOP_WEIGHTS", "TYPE_FP32", (-1, -1, -1)),
        TensorSpec("MAX_LOGIT", "TYPE_FP64", (-1,)),
        TensorSpec("TOTAL", "TYPE_FP64", (-1,)),
        TensorSpec("WEIGHTED", "TYPE_FP64", (-1, -1)),
        TensorSpec("BEST", "TYPE_FP64", (-1,)),
    ),
    parameters=("data_dir",),
)

ENERGY_TRANSFORMER = ModelSpec(
    name="energy_transformer",
    template="energy_transformer_model.py",
    inputs=(
        TensorSpec("IMAGE", "TYPE_FP32", (-1, -1), ragged=True),
        TensorSpec("MISSING", "TYPE_BOOL", (-1, -1), ragged=True),
        TensorSpec("STEPS", "TYPE_INT32", (1,), optional=True),
        TensorSpec("EXPLAIN", "TYPE_BOOL", (1,), optional=True),
    ),
    outputs=(
        TensorSpec("IMAGE", "TYPE_FP32", (-1, -1)),
        TensorSpec("ENERGY_TRACE", "TYPE_FP32", (-1,)),
        TensorSpec("FRAMES", "TYPE_FP32", (-1, -1, -1)),
        TensorSpec("ATTENTION_ENERGY", "TYPE_FP32", (-1,)),
        TensorSpec("HOPFIELD_ENERGY", "TYPE_FP32", (-1,)),
    ),
    parameters=("image_size",),
)

LLM = ModelSpec(
    name="llm",
    template="llm_model.py",
    inputs=(
        TensorSpec("PROMPT", "TYPE_STRING", (1,)),
        TensorSpec("PARAMS", "TYPE_STRING", (1,)),
    ),
    outputs=(TensorSpec("TOKEN", "TYPE_STRING", (1,)),),
    parameters=("served_model_name", "max_running_sequences", "max_waiting_sequences", "max_context", "dtype",
                "kv_dtype"),
    decoupled=True,
)

MODELS: tuple[ModelSpec, ...] = (ASSOCIATIVE_MEMORY, ENERGY_TRANSFORMER, LLM)
