from google.protobuf import struct_pb2 as _struct_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class Vector(_message.Message):
    __slots__ = ("values",)
    VALUES_FIELD_NUMBER: _ClassVar[int]
    values: _containers.RepeatedScalarFieldContainer[float]
    def __init__(self, values: _Optional[_Iterable[float]] = ...) -> None: ...

class Mask(_message.Message):
    __slots__ = ("values",)
    VALUES_FIELD_NUMBER: _ClassVar[int]
    values: _containers.RepeatedScalarFieldContainer[bool]
    def __init__(self, values: _Optional[_Iterable[bool]] = ...) -> None: ...

class CreateBankRequest(_message.Message):
    __slots__ = ("bank", "kind", "dim", "params")
    BANK_FIELD_NUMBER: _ClassVar[int]
    KIND_FIELD_NUMBER: _ClassVar[int]
    DIM_FIELD_NUMBER: _ClassVar[int]
    PARAMS_FIELD_NUMBER: _ClassVar[int]
    bank: str
    kind: str
    dim: int
    params: _struct_pb2.Struct
    def __init__(self, bank: _Optional[str] = ..., kind: _Optional[str] = ..., dim: _Optional[int] = ..., params: _Optional[_Union[_struct_pb2.Struct, _Mapping]] = ...) -> None: ...

class BankInfo(_message.Message):
    __slots__ = ("name", "kind", "dim", "params", "count", "bytes", "version", "checksum", "shards")
    NAME_FIELD_NUMBER: _ClassVar[int]
    KIND_FIELD_NUMBER: _ClassVar[int]
    DIM_FIELD_NUMBER: _ClassVar[int]
    PARAMS_FIELD_NUMBER: _ClassVar[int]
    COUNT_FIELD_NUMBER: _ClassVar[int]
    BYTES_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    CHECKSUM_FIELD_NUMBER: _ClassVar[int]
    SHARDS_FIELD_NUMBER: _ClassVar[int]
    name: str
    kind: str
    dim: int
    params: _struct_pb2.Struct
    count: int
    bytes: int
    version: int
    checksum: str
    shards: _containers.RepeatedCompositeFieldContainer[ShardInfo]
    def __init__(self, name: _Optional[str] = ..., kind: _Optional[str] = ..., dim: _Optional[int] = ..., params: _Optional[_Union[_struct_pb2.Struct, _Mapping]] = ..., count: _Optional[int] = ..., bytes: _Optional[int] = ..., version: _Optional[int] = ..., checksum: _Optional[str] = ..., shards: _Optional[_Iterable[_Union[ShardInfo, _Mapping]]] = ...) -> None: ...

class ShardInfo(_message.Message):
    __slots__ = ("shard", "count", "replicas")
    SHARD_FIELD_NUMBER: _ClassVar[int]
    COUNT_FIELD_NUMBER: _ClassVar[int]
    REPLICAS_FIELD_NUMBER: _ClassVar[int]
    shard: int
    count: int
    replicas: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, shard: _Optional[int] = ..., count: _Optional[int] = ..., replicas: _Optional[_Iterable[str]] = ...) -> None: ...

class ListBanksRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ListBanksResponse(_message.Message):
    __slots__ = ("banks",)
    BANKS_FIELD_NUMBER: _ClassVar[int]
    banks: _containers.RepeatedCompositeFieldContainer[BankInfo]
    def __init__(self, banks: _Optional[_Iterable[_Union[BankInfo, _Mapping]]] = ...) -> None: ...

class GetBankRequest(_message.Message):
    __slots__ = ("bank",)
    BANK_FIELD_NUMBER: _ClassVar[int]
    bank: str
    def __init__(self, bank: _Optional[str] = ...) -> None: ...

class DeleteBankRequest(_message.Message):
    __slots__ = ("bank",)
    BANK_FIELD_NUMBER: _ClassVar[int]
    bank: str
    def __init__(self, bank: _Optional[str] = ...) -> None: ...

class DeleteBankResponse(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class StoreRequest(_message.Message):
    __slots__ = ("bank", "patterns", "ids")
    BANK_FIELD_NUMBER: _ClassVar[int]
    PATTERNS_FIELD_NUMBER: _ClassVar[int]
    IDS_FIELD_NUMBER: _ClassVar[int]
    bank: str
    patterns: _containers.RepeatedCompositeFieldContainer[Vector]
    ids: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, bank: _Optional[str] = ..., patterns: _Optional[_Iterable[_Union[Vector, _Mapping]]] = ..., ids: _Optional[_Iterable[str]] = ...) -> None: ...

class StoreResponse(_message.Message):
    __slots__ = ("ids", "count", "version")
    IDS_FIELD_NUMBER: _ClassVar[int]
    COUNT_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    ids: _containers.RepeatedScalarFieldContainer[str]
    count: int
    version: int
    def __init__(self, ids: _Optional[_Iterable[str]] = ..., count: _Optional[int] = ..., version: _Optional[int] = ...) -> None: ...

class DeletePatternRequest(_message.Message):
    __slots__ = ("bank", "id")
    BANK_FIELD_NUMBER: _ClassVar[int]
    ID_FIELD_NUMBER: _ClassVar[int]
    bank: str
    id: str
    def __init__(self, bank: _Optional[str] = ..., id: _Optional[str] = ...) -> None: ...

class DeletePatternResponse(_message.Message):
    __slots__ = ("version",)
    VERSION_FIELD_NUMBER: _ClassVar[int]
    version: int
    def __init__(self, version: _Optional[int] = ...) -> None: ...

class RetrieveRequest(_message.Message):
    __slots__ = ("bank", "queries", "steps", "step_size", "tolerance", "trace", "min_version", "explain")
    BANK_FIELD_NUMBER: _ClassVar[int]
    QUERIES_FIELD_NUMBER: _ClassVar[int]
    STEPS_FIELD_NUMBER: _ClassVar[int]
    STEP_SIZE_FIELD_NUMBER: _ClassVar[int]
    TOLERANCE_FIELD_NUMBER: _ClassVar[int]
    TRACE_FIELD_NUMBER: _ClassVar[int]
    MIN_VERSION_FIELD_NUMBER: _ClassVar[int]
    EXPLAIN_FIELD_NUMBER: _ClassVar[int]
    bank: str
    queries: _containers.RepeatedCompositeFieldContainer[Vector]
    steps: int
    step_size: float
    tolerance: float
    trace: bool
    min_version: int
    explain: bool
    def __init__(self, bank: _Optional[str] = ..., queries: _Optional[_Iterable[_Union[Vector, _Mapping]]] = ..., steps: _Optional[int] = ..., step_size: _Optional[float] = ..., tolerance: _Optional[float] = ..., trace: _Optional[bool] = ..., min_version: _Optional[int] = ..., explain: _Optional[bool] = ...) -> None: ...

class CompleteRequest(_message.Message):
    __slots__ = ("bank", "queries", "steps", "step_size", "tolerance", "trace", "mask", "min_version", "explain")
    BANK_FIELD_NUMBER: _ClassVar[int]
    QUERIES_FIELD_NUMBER: _ClassVar[int]
    STEPS_FIELD_NUMBER: _ClassVar[int]
    STEP_SIZE_FIELD_NUMBER: _ClassVar[int]
    TOLERANCE_FIELD_NUMBER: _ClassVar[int]
    TRACE_FIELD_NUMBER: _ClassVar[int]
    MASK_FIELD_NUMBER: _ClassVar[int]
    MIN_VERSION_FIELD_NUMBER: _ClassVar[int]
    EXPLAIN_FIELD_NUMBER: _ClassVar[int]
    bank: str
    queries: _containers.RepeatedCompositeFieldContainer[Vector]
    steps: int
    step_size: float
    tolerance: float
    trace: bool
    mask: _containers.RepeatedCompositeFieldContainer[Mask]
    min_version: int
    explain: bool
    def __init__(self, bank: _Optional[str] = ..., queries: _Optional[_Iterable[_Union[Vector, _Mapping]]] = ..., steps: _Optional[int] = ..., step_size: _Optional[float] = ..., tolerance: _Optional[float] = ..., trace: _Optional[bool] = ..., mask: _Optional[_Iterable[_Union[Mask, _Mapping]]] = ..., min_version: _Optional[int] = ..., explain: _Optional[bool] = ...) -> None: ...

class Nearest(_message.Message):
    __slots__ = ("id", "similarity")
    ID_FIELD_NUMBER: _ClassVar[int]
    SIMILARITY_FIELD_NUMBER: _ClassVar[int]
    id: str
    similarity: float
    def __init__(self, id: _Optional[str] = ..., similarity: _Optional[float] = ...) -> None: ...

class MemoryResult(_message.Message):
    __slots__ = ("state", "energy", "steps", "converged", "nearest", "trace", "explanation")
    STATE_FIELD_NUMBER: _ClassVar[int]
    ENERGY_FIELD_NUMBER: _ClassVar[int]
    STEPS_FIELD_NUMBER: _ClassVar[int]
    CONVERGED_FIELD_NUMBER: _ClassVar[int]
    NEAREST_FIELD_NUMBER: _ClassVar[int]
    TRACE_FIELD_NUMBER: _ClassVar[int]
    EXPLANATION_FIELD_NUMBER: _ClassVar[int]
    state: _containers.RepeatedScalarFieldContainer[float]
    energy: float
    steps: int
    converged: bool
    nearest: Nearest
    trace: _containers.RepeatedScalarFieldContainer[float]
    explanation: _containers.RepeatedCompositeFieldContainer[ExplainedStep]
    def __init__(self, state: _Optional[_Iterable[float]] = ..., energy: _Optional[float] = ..., steps: _Optional[int] = ..., converged: _Optional[bool] = ..., nearest: _Optional[_Union[Nearest, _Mapping]] = ..., trace: _Optional[_Iterable[float]] = ..., explanation: _Optional[_Iterable[_Union[ExplainedStep, _Mapping]]] = ...) -> None: ...

class TopMemory(_message.Message):
    __slots__ = ("id", "weight")
    ID_FIELD_NUMBER: _ClassVar[int]
    WEIGHT_FIELD_NUMBER: _ClassVar[int]
    id: str
    weight: float
    def __init__(self, id: _Optional[str] = ..., weight: _Optional[float] = ...) -> None: ...

class ExplainedStep(_message.Message):
    __slots__ = ("state", "energy", "top_memories")
    STATE_FIELD_NUMBER: _ClassVar[int]
    ENERGY_FIELD_NUMBER: _ClassVar[int]
    TOP_MEMORIES_FIELD_NUMBER: _ClassVar[int]
    state: _containers.RepeatedScalarFieldContainer[float]
    energy: float
    top_memories: _containers.RepeatedCompositeFieldContainer[TopMemory]
    def __init__(self, state: _Optional[_Iterable[float]] = ..., energy: _Optional[float] = ..., top_memories: _Optional[_Iterable[_Union[TopMemory, _Mapping]]] = ...) -> None: ...

class RetrieveResponse(_message.Message):
    __slots__ = ("results",)
    RESULTS_FIELD_NUMBER: _ClassVar[int]
    results: _containers.RepeatedCompositeFieldContainer[MemoryResult]
    def __init__(self, results: _Optional[_Iterable[_Union[MemoryResult, _Mapping]]] = ...) -> None: ...

class CompleteImageRequest(_message.Message):
    __slots__ = ("model", "image", "mask", "steps", "explain")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    IMAGE_FIELD_NUMBER: _ClassVar[int]
    MASK_FIELD_NUMBER: _ClassVar[int]
    STEPS_FIELD_NUMBER: _ClassVar[int]
    EXPLAIN_FIELD_NUMBER: _ClassVar[int]
    model: str
    image: _containers.RepeatedCompositeFieldContainer[Vector]
    mask: _containers.RepeatedCompositeFieldContainer[Mask]
    steps: int
    explain: bool
    def __init__(self, model: _Optional[str] = ..., image: _Optional[_Iterable[_Union[Vector, _Mapping]]] = ..., mask: _Optional[_Iterable[_Union[Mask, _Mapping]]] = ..., steps: _Optional[int] = ..., explain: _Optional[bool] = ...) -> None: ...

class CompleteImageResponse(_message.Message):
    __slots__ = ("model", "image", "energy_trace", "frames")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    IMAGE_FIELD_NUMBER: _ClassVar[int]
    ENERGY_TRACE_FIELD_NUMBER: _ClassVar[int]
    FRAMES_FIELD_NUMBER: _ClassVar[int]
    model: str
    image: _containers.RepeatedCompositeFieldContainer[Vector]
    energy_trace: _containers.RepeatedScalarFieldContainer[float]
    frames: _containers.RepeatedCompositeFieldContainer[ImageFrame]
    def __init__(self, model: _Optional[str] = ..., image: _Optional[_Iterable[_Union[Vector, _Mapping]]] = ..., energy_trace: _Optional[_Iterable[float]] = ..., frames: _Optional[_Iterable[_Union[ImageFrame, _Mapping]]] = ...) -> None: ...

class ImageFrame(_message.Message):
    __slots__ = ("image", "energy", "attention_energy", "hopfield_energy")
    IMAGE_FIELD_NUMBER: _ClassVar[int]
    ENERGY_FIELD_NUMBER: _ClassVar[int]
    ATTENTION_ENERGY_FIELD_NUMBER: _ClassVar[int]
    HOPFIELD_ENERGY_FIELD_NUMBER: _ClassVar[int]
    image: _containers.RepeatedCompositeFieldContainer[Vector]
    energy: float
    attention_energy: float
    hopfield_energy: float
    def __init__(self, image: _Optional[_Iterable[_Union[Vector, _Mapping]]] = ..., energy: _Optional[float] = ..., attention_energy: _Optional[float] = ..., hopfield_energy: _Optional[float] = ...) -> None: ...

class ListModelsRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ModelCard(_message.Message):
    __slots__ = ("id", "task", "ready", "details")
    ID_FIELD_NUMBER: _ClassVar[int]
    TASK_FIELD_NUMBER: _ClassVar[int]
    READY_FIELD_NUMBER: _ClassVar[int]
    DETAILS_FIELD_NUMBER: _ClassVar[int]
    id: str
    task: str
    ready: bool
    details: _struct_pb2.Struct
    def __init__(self, id: _Optional[str] = ..., task: _Optional[str] = ..., ready: _Optional[bool] = ..., details: _Optional[_Union[_struct_pb2.Struct, _Mapping]] = ...) -> None: ...

class ListModelsResponse(_message.Message):
    __slots__ = ("models",)
    MODELS_FIELD_NUMBER: _ClassVar[int]
    models: _containers.RepeatedCompositeFieldContainer[ModelCard]
    def __init__(self, models: _Optional[_Iterable[_Union[ModelCard, _Mapping]]] = ...) -> None: ...

class GenerateRequest(_message.Message):
    __slots__ = ("prompt", "max_tokens", "temperature", "top_k", "top_p", "seed", "stop", "logprobs", "timeout")
    PROMPT_FIELD_NUMBER: _ClassVar[int]
    MAX_TOKENS_FIELD_NUMBER: _ClassVar[int]
    TEMPERATURE_FIELD_NUMBER: _ClassVar[int]
    TOP_K_FIELD_NUMBER: _ClassVar[int]
    TOP_P_FIELD_NUMBER: _ClassVar[int]
    SEED_FIELD_NUMBER: _ClassVar[int]
    STOP_FIELD_NUMBER: _ClassVar[int]
    LOGPROBS_FIELD_NUMBER: _ClassVar[int]
    TIMEOUT_FIELD_NUMBER: _ClassVar[int]
    prompt: str
    max_tokens: int
    temperature: float
    top_k: int
    top_p: float
    seed: int
    stop: _containers.RepeatedScalarFieldContainer[str]
    logprobs: int
    timeout: float
    def __init__(self, prompt: _Optional[str] = ..., max_tokens: _Optional[int] = ..., temperature: _Optional[float] = ..., top_k: _Optional[int] = ..., top_p: _Optional[float] = ..., seed: _Optional[int] = ..., stop: _Optional[_Iterable[str]] = ..., logprobs: _Optional[int] = ..., timeout: _Optional[float] = ...) -> None: ...

class Alternative(_message.Message):
    __slots__ = ("token", "token_id", "logprob")
    TOKEN_FIELD_NUMBER: _ClassVar[int]
    TOKEN_ID_FIELD_NUMBER: _ClassVar[int]
    LOGPROB_FIELD_NUMBER: _ClassVar[int]
    token: str
    token_id: int
    logprob: float
    def __init__(self, token: _Optional[str] = ..., token_id: _Optional[int] = ..., logprob: _Optional[float] = ...) -> None: ...

class TokenLogprob(_message.Message):
    __slots__ = ("token", "token_id", "logprob", "top")
    TOKEN_FIELD_NUMBER: _ClassVar[int]
    TOKEN_ID_FIELD_NUMBER: _ClassVar[int]
    LOGPROB_FIELD_NUMBER: _ClassVar[int]
    TOP_FIELD_NUMBER: _ClassVar[int]
    token: str
    token_id: int
    logprob: float
    top: _containers.RepeatedCompositeFieldContainer[Alternative]
    def __init__(self, token: _Optional[str] = ..., token_id: _Optional[int] = ..., logprob: _Optional[float] = ..., top: _Optional[_Iterable[_Union[Alternative, _Mapping]]] = ...) -> None: ...

class Usage(_message.Message):
    __slots__ = ("prompt_tokens", "completion_tokens", "total_tokens")
    PROMPT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    COMPLETION_TOKENS_FIELD_NUMBER: _ClassVar[int]
    TOTAL_TOKENS_FIELD_NUMBER: _ClassVar[int]
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    def __init__(self, prompt_tokens: _Optional[int] = ..., completion_tokens: _Optional[int] = ..., total_tokens: _Optional[int] = ...) -> None: ...

class GenerateChunk(_message.Message):
    __slots__ = ("text", "token_id", "logprobs", "finish_reason", "usage")
    TEXT_FIELD_NUMBER: _ClassVar[int]
    TOKEN_ID_FIELD_NUMBER: _ClassVar[int]
    LOGPROBS_FIELD_NUMBER: _ClassVar[int]
    FINISH_REASON_FIELD_NUMBER: _ClassVar[int]
    USAGE_FIELD_NUMBER: _ClassVar[int]
    text: str
    token_id: int
    logprobs: TokenLogprob
    finish_reason: str
    usage: Usage
    def __init__(self, text: _Optional[str] = ..., token_id: _Optional[int] = ..., logprobs: _Optional[_Union[TokenLogprob, _Mapping]] = ..., finish_reason: _Optional[str] = ..., usage: _Optional[_Union[Usage, _Mapping]] = ...) -> None: ...

class ChatMessage(_message.Message):
    __slots__ = ("role", "content")
    ROLE_FIELD_NUMBER: _ClassVar[int]
    CONTENT_FIELD_NUMBER: _ClassVar[int]
    role: str
    content: str
    def __init__(self, role: _Optional[str] = ..., content: _Optional[str] = ...) -> None: ...

class ChatRequest(_message.Message):
    __slots__ = ("model", "messages", "max_tokens", "temperature", "top_p", "seed", "stop", "logprobs", "top_logprobs", "n", "min_tokens", "ignore_eos")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    MESSAGES_FIELD_NUMBER: _ClassVar[int]
    MAX_TOKENS_FIELD_NUMBER: _ClassVar[int]
    TEMPERATURE_FIELD_NUMBER: _ClassVar[int]
    TOP_P_FIELD_NUMBER: _ClassVar[int]
    SEED_FIELD_NUMBER: _ClassVar[int]
    STOP_FIELD_NUMBER: _ClassVar[int]
    LOGPROBS_FIELD_NUMBER: _ClassVar[int]
    TOP_LOGPROBS_FIELD_NUMBER: _ClassVar[int]
    N_FIELD_NUMBER: _ClassVar[int]
    MIN_TOKENS_FIELD_NUMBER: _ClassVar[int]
    IGNORE_EOS_FIELD_NUMBER: _ClassVar[int]
    model: str
    messages: _containers.RepeatedCompositeFieldContainer[ChatMessage]
    max_tokens: int
    temperature: float
    top_p: float
    seed: int
    stop: _containers.RepeatedScalarFieldContainer[str]
    logprobs: bool
    top_logprobs: int
    n: int
    min_tokens: int
    ignore_eos: bool
    def __init__(self, model: _Optional[str] = ..., messages: _Optional[_Iterable[_Union[ChatMessage, _Mapping]]] = ..., max_tokens: _Optional[int] = ..., temperature: _Optional[float] = ..., top_p: _Optional[float] = ..., seed: _Optional[int] = ..., stop: _Optional[_Iterable[str]] = ..., logprobs: _Optional[bool] = ..., top_logprobs: _Optional[int] = ..., n: _Optional[int] = ..., min_tokens: _Optional[int] = ..., ignore_eos: _Optional[bool] = ...) -> None: ...

class ChatTopLogprob(_message.Message):
    __slots__ = ("token", "logprob")
    TOKEN_FIELD_NUMBER: _ClassVar[int]
    LOGPROB_FIELD_NUMBER: _ClassVar[int]
    token: str
    logprob: float
    def __init__(self, token: _Optional[str] = ..., logprob: _Optional[float] = ...) -> None: ...

class ChatTokenLogprob(_message.Message):
    __slots__ = ("token", "logprob", "top_logprobs")
    TOKEN_FIELD_NUMBER: _ClassVar[int]
    LOGPROB_FIELD_NUMBER: _ClassVar[int]
    TOP_LOGPROBS_FIELD_NUMBER: _ClassVar[int]
    token: str
    logprob: float
    top_logprobs: _containers.RepeatedCompositeFieldContainer[ChatTopLogprob]
    def __init__(self, token: _Optional[str] = ..., logprob: _Optional[float] = ..., top_logprobs: _Optional[_Iterable[_Union[ChatTopLogprob, _Mapping]]] = ...) -> None: ...

class ChatChunk(_message.Message):
    __slots__ = ("index", "role", "text", "logprobs", "finish_reason", "usage")
    INDEX_FIELD_NUMBER: _ClassVar[int]
    ROLE_FIELD_NUMBER: _ClassVar[int]
    TEXT_FIELD_NUMBER: _ClassVar[int]
    LOGPROBS_FIELD_NUMBER: _ClassVar[int]
    FINISH_REASON_FIELD_NUMBER: _ClassVar[int]
    USAGE_FIELD_NUMBER: _ClassVar[int]
    index: int
    role: str
    text: str
    logprobs: ChatTokenLogprob
    finish_reason: str
    usage: Usage
    def __init__(self, index: _Optional[int] = ..., role: _Optional[str] = ..., text: _Optional[str] = ..., logprobs: _Optional[_Union[ChatTokenLogprob, _Mapping]] = ..., finish_reason: _Optional[str] = ..., usage: _Optional[_Union[Usage, _Mapping]] = ...) -> None: ...

class ExplainRequest(_message.Message):
    __slots__ = ("prompt", "temperature", "top_k", "top_p", "top_n", "layers", "heads")
    PROMPT_FIELD_NUMBER: _ClassVar[int]
    TEMPERATURE_FIELD_NUMBER: _ClassVar[int]
    TOP_K_FIELD_NUMBER: _ClassVar[int]
    TOP_P_FIELD_NUMBER: _ClassVar[int]
    TOP_N_FIELD_NUMBER: _ClassVar[int]
    LAYERS_FIELD_NUMBER: _ClassVar[int]
    HEADS_FIELD_NUMBER: _ClassVar[int]
    prompt: str
    temperature: float
    top_k: int
    top_p: float
    top_n: int
    layers: _containers.RepeatedScalarFieldContainer[int]
    heads: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, prompt: _Optional[str] = ..., temperature: _Optional[float] = ..., top_k: _Optional[int] = ..., top_p: _Optional[float] = ..., top_n: _Optional[int] = ..., layers: _Optional[_Iterable[int]] = ..., heads: _Optional[_Iterable[int]] = ...) -> None: ...

class PromptToken(_message.Message):
    __slots__ = ("text", "id")
    TEXT_FIELD_NUMBER: _ClassVar[int]
    ID_FIELD_NUMBER: _ClassVar[int]
    text: str
    id: int
    def __init__(self, text: _Optional[str] = ..., id: _Optional[int] = ...) -> None: ...

class NextTokenCandidate(_message.Message):
    __slots__ = ("token", "token_id", "logit", "probability", "kept_by_top_k", "kept_by_top_p")
    TOKEN_FIELD_NUMBER: _ClassVar[int]
    TOKEN_ID_FIELD_NUMBER: _ClassVar[int]
    LOGIT_FIELD_NUMBER: _ClassVar[int]
    PROBABILITY_FIELD_NUMBER: _ClassVar[int]
    KEPT_BY_TOP_K_FIELD_NUMBER: _ClassVar[int]
    KEPT_BY_TOP_P_FIELD_NUMBER: _ClassVar[int]
    token: str
    token_id: int
    logit: float
    probability: float
    kept_by_top_k: bool
    kept_by_top_p: bool
    def __init__(self, token: _Optional[str] = ..., token_id: _Optional[int] = ..., logit: _Optional[float] = ..., probability: _Optional[float] = ..., kept_by_top_k: _Optional[bool] = ..., kept_by_top_p: _Optional[bool] = ...) -> None: ...

class NextToken(_message.Message):
    __slots__ = ("candidates", "distribution")
    CANDIDATES_FIELD_NUMBER: _ClassVar[int]
    DISTRIBUTION_FIELD_NUMBER: _ClassVar[int]
    candidates: _containers.RepeatedCompositeFieldContainer[NextTokenCandidate]
    distribution: _containers.RepeatedScalarFieldContainer[float]
    def __init__(self, candidates: _Optional[_Iterable[_Union[NextTokenCandidate, _Mapping]]] = ..., distribution: _Optional[_Iterable[float]] = ...) -> None: ...

class ExplainResponse(_message.Message):
    __slots__ = ("model", "tokens", "layers", "heads", "attention", "attention_shape", "next_token")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    TOKENS_FIELD_NUMBER: _ClassVar[int]
    LAYERS_FIELD_NUMBER: _ClassVar[int]
    HEADS_FIELD_NUMBER: _ClassVar[int]
    ATTENTION_FIELD_NUMBER: _ClassVar[int]
    ATTENTION_SHAPE_FIELD_NUMBER: _ClassVar[int]
    NEXT_TOKEN_FIELD_NUMBER: _ClassVar[int]
    model: str
    tokens: _containers.RepeatedCompositeFieldContainer[PromptToken]
    layers: _containers.RepeatedScalarFieldContainer[int]
    heads: _containers.RepeatedScalarFieldContainer[int]
    attention: _containers.RepeatedScalarFieldContainer[float]
    attention_shape: _containers.RepeatedScalarFieldContainer[int]
    next_token: NextToken
    def __init__(self, model: _Optional[str] = ..., tokens: _Optional[_Iterable[_Union[PromptToken, _Mapping]]] = ..., layers: _Optional[_Iterable[int]] = ..., heads: _Optional[_Iterable[int]] = ..., attention: _Optional[_Iterable[float]] = ..., attention_shape: _Optional[_Iterable[int]] = ..., next_token: _Optional[_Union[NextToken, _Mapping]] = ...) -> None: ...

class FidelityRequest(_message.Message):
    __slots__ = ("bank", "sample_size", "noise")
    BANK_FIELD_NUMBER: _ClassVar[int]
    SAMPLE_SIZE_FIELD_NUMBER: _ClassVar[int]
    NOISE_FIELD_NUMBER: _ClassVar[int]
    bank: str
    sample_size: int
    noise: float
    def __init__(self, bank: _Optional[str] = ..., sample_size: _Optional[int] = ..., noise: _Optional[float] = ...) -> None: ...

class Agreement(_message.Message):
    __slots__ = ("mean_abs_energy_error", "max_abs_energy_error", "mean_gradient_cosine", "min_gradient_cosine")
    MEAN_ABS_ENERGY_ERROR_FIELD_NUMBER: _ClassVar[int]
    MAX_ABS_ENERGY_ERROR_FIELD_NUMBER: _ClassVar[int]
    MEAN_GRADIENT_COSINE_FIELD_NUMBER: _ClassVar[int]
    MIN_GRADIENT_COSINE_FIELD_NUMBER: _ClassVar[int]
    mean_abs_energy_error: float
    max_abs_energy_error: float
    mean_gradient_cosine: float
    min_gradient_cosine: float
    def __init__(self, mean_abs_energy_error: _Optional[float] = ..., max_abs_energy_error: _Optional[float] = ..., mean_gradient_cosine: _Optional[float] = ..., min_gradient_cosine: _Optional[float] = ...) -> None: ...

class Fidelity(_message.Message):
    __slots__ = ("version", "sample_size", "noise", "patterns", "noisy", "same_nearest")
    VERSION_FIELD_NUMBER: _ClassVar[int]
    SAMPLE_SIZE_FIELD_NUMBER: _ClassVar[int]
    NOISE_FIELD_NUMBER: _ClassVar[int]
    PATTERNS_FIELD_NUMBER: _ClassVar[int]
    NOISY_FIELD_NUMBER: _ClassVar[int]
    SAME_NEAREST_FIELD_NUMBER: _ClassVar[int]
    version: int
    sample_size: int
    noise: float
    patterns: Agreement
    noisy: Agreement
    same_nearest: float
    def __init__(self, version: _Optional[int] = ..., sample_size: _Optional[int] = ..., noise: _Optional[float] = ..., patterns: _Optional[_Union[Agreement, _Mapping]] = ..., noisy: _Optional[_Union[Agreement, _Mapping]] = ..., same_nearest: _Optional[float] = ...) -> None: ...
