"""Request and response models shared by REST and gRPC: validation happens here, once.

These models are the edge: values are finite and arrays rectangular once a request parsed;
what depends on the service's settings (vectors per request, dim) is checked by the operations,
what depends on a bank (its dim, binary values) by the bank. Responses are built from the
backends' columns here, and only here become Python lists.
"""

from __future__ import annotations

import base64
import binascii
from typing import Annotated, Any, Literal

import numpy as np
from pydantic import (BaseModel, ConfigDict, Field, ValidationError, ValidationInfo, ValidatorFunctionWrapHandler,
                      WithJsonSchema, field_validator, model_validator)
from pydantic_core import InitErrorDetails, PydanticCustomError

from service.banks.registry import BankInfo, MemoryResults
from service.engines.lm.explain import TextExplanation
from service.engines.memory import KINDS
from service.engines.memory.base import MAX_DIM
from service.serving.scheduler import Usage

Finite = Annotated[float, Field(allow_inf_nan=False)]
Pixel = Annotated[float, Field(ge=0, le=1)]
Vector = Annotated[list[Finite], Field(min_length=1)]
# After validation: a list of float rows, or (encoding_format base64) the decoded N×D float32 matrix;
# the operations take either with np.asarray.
Vectors = Annotated[list[Vector], Field(min_length=1), WithJsonSchema({
    "type": "array", "minItems": 1, "items": {"anyOf": [
        {"type": "array", "items": {"type": "number"}, "minItems": 1},
        {"type": "string", "contentEncoding": "base64",
         "description": "little-endian float32 values, with encoding_format base64"}]}}, mode="validation")]
EncodingFormat = Annotated[Literal["float", "base64"], Field(
    description="base64: each vector, and each state in the answer, is a base64 string of little-endian float32")]
BankName = Annotated[str, Field(pattern=r"^[a-z0-9][a-z0-9_-]{0,62}$")]


class Strict(BaseModel):
    # strict: a value of another JSON type than the field's ("3" for 3, false for 0) is refused, as the schema says
    model_config = ConfigDict(extra="forbid", strict=True)


def check_matrix(rows: list[list[Any]]) -> list[list[Any]]:
    """Rectangular (pydantic names the field)."""
    width = len(rows[0])
    for i, row in enumerate(rows):
        if len(row) != width:
            raise ValueError(f"row {i} has {len(row)} values, row 0 has {width} (ragged array)")
    return rows


def vectors_as_encoded(rows: Any, handler: ValidatorFunctionWrapHandler, info: ValidationInfo) -> Any:
    """A wrap validator: the vectors in the request's encoding_format (a field declared before them)."""
    if info.data.get("encoding_format") == "base64":
        return base64_matrix(rows)
    return check_matrix(handler(rows))


def base64_matrix(rows: Any) -> np.ndarray:
    """Base64 strings of little-endian float32, one per vector, decoded straight into one N×D float32
    matrix; a bad row is a validation error at its index."""
    if not isinstance(rows, list) or not rows:
        raise PydanticCustomError("base64_vectors", "must be a non-empty array of base64 strings")
    decoded: list[bytes] = []
    for i, row in enumerate(rows):
        if not isinstance(row, str):
            raise row_error(i, row, "must be a base64 string (encoding_format is base64)")
        try:
            data = binascii.a2b_base64(row, strict_mode=True)
        except ValueError as exc:  # binascii.Error, or a non-ASCII string
            raise row_error(i, row, f"invalid base64 ({exc})") from None
        if not data or len(data) % 4:
            raise row_error(i, row, f"{len(data)} bytes is not a whole, non-zero number of float32 values")
        if decoded and len(data) != len(decoded[0]):
            raise row_error(i, row, f"{len(data) // 4} values, row 0 has {len(decoded[0]) // 4} (ragged array)")
        decoded.append(data)
    # bytearray: a writable buffer, as the float path's arrays are
    matrix = np.frombuffer(bytearray().join(decoded), dtype="<f4").reshape(len(decoded), -1)
    if not np.isfinite(matrix).all():
        first = int(np.argmin(np.isfinite(matrix).all(axis=1)))
        raise row_error(first, rows[first], "values must be finite (no NaN or infinity)")
    return matrix.astype(np.float32, copy=False)


def row_error(index: int, row: Any, reason: str) -> ValidationError:
    """A validation error located at row `index` of the field being validated."""
    return ValidationError.from_exception_data("vectors", [InitErrorDetails(
        type=PydanticCustomError("base64_vector", "{reason}", {"reason": reason}), loc=(index,), input=row)])


def field_error(field: str, message: str) -> ValidationError:
    """A validation error of one field, from a validator of the whole model (which pydantic locates at the body)."""
    return ValidationError.from_exception_data("request", [InitErrorDetails(
        type=PydanticCustomError("invalid_combination", message), loc=(field,), input=None)])


def one_message(field: str, message: str):
    """A wrap validator for a field of several accepted shapes: one message naming them all, instead of
    one error per shape tried."""
    def check(value: Any, handler: ValidatorFunctionWrapHandler) -> Any:
        try:
            return handler(value)
        except ValidationError:
            raise PydanticCustomError(field, message) from None
    return check


def shaped_like(other: str):
    """A validator: the mask has the shape of the field `other` (when that one parsed)."""
    def check(mask: list[list[bool]], info: ValidationInfo) -> list[list[bool]]:
        rows = info.data.get(other)
        if rows is not None and (len(mask) != len(rows) or any(len(m) != len(r) for m, r in zip(mask, rows))):
            raise ValueError(f"mask must have the same shape as {other}")
        return mask
    return check


class CreateBank(Strict):
    kind: str = Field(json_schema_extra={"enum": list(KINDS)})  # the engines check it, naming the kinds
    dim: int = Field(ge=1, le=MAX_DIM)
    params: dict[str, Any] = Field(default_factory=dict)


class BankList(BaseModel):
    banks: list[BankInfo]


MAX_FIDELITY_SAMPLE = 1024  # patterns a fidelity report samples: each costs a DrDAM and an exact retrieval


class FidelityRequest(Strict):
    """The options of a drdam bank's fidelity report over gRPC: the bounds of REST's query parameters."""

    sample_size: int = Field(default=64, ge=1, le=MAX_FIDELITY_SAMPLE)
    noise: float = Field(default=0.1, ge=0, le=2, allow_inf_nan=False)


class StoreRequest(Strict):
    encoding_format: EncodingFormat = "float"  # before the vectors: their validator reads it
    patterns: Vectors
    ids: list[str] | None = None

    _vectors = field_validator("patterns", mode="wrap")(vectors_as_encoded)


class StoreResponse(BaseModel):
    ids: list[str]
    count: int
    version: int = Field(description="the bank's version after this write; pass it as min_version to read it back")


class DeletePatternResponse(BaseModel):
    version: int


class DynamicsRequest(Strict):
    encoding_format: EncodingFormat = "float"  # before the vectors: their validator reads it
    queries: Vectors
    steps: int | None = Field(default=None, ge=1, le=10_000)
    step_size: float | None = Field(default=None, gt=0, le=1e3, allow_inf_nan=False)
    tolerance: float | None = Field(default=None, gt=0, le=1e3, allow_inf_nan=False)
    trace: bool = False
    explain: bool = Field(default=False, description="per step (the start included): the state, its energy and the "
                                                     "stored patterns pulling it hardest; implies trace")
    min_version: int | None = Field(default=None, ge=0, lt=2**63,
                                    description="answer only from bank state at this version or later")

    _vectors = field_validator("queries", mode="wrap")(vectors_as_encoded)


class RetrieveRequest(DynamicsRequest):
    pass


class CompleteRequest(DynamicsRequest):
    mask: list[list[bool]] = Field(min_length=1, description="true = known entry, clamped")

    _same_shape_as_queries = field_validator("mask")(shaped_like("queries"))


class Nearest(BaseModel):
    id: str
    similarity: float


State = Annotated[list[float] | str, Field(union_mode="left_to_right",  # floats first: the common answer, one pass
                                           description="base64 of little-endian float32 with encoding_format base64")]


class TopMemory(BaseModel):
    id: str
    weight: float = Field(description="softmax weight (modern, rbf), share of the feature-space similarity (drdam), "
                                      "overlap ξ·v/D (classical, dense)")


class ExplainedStep(BaseModel):
    state: State
    energy: float
    top_memories: list[TopMemory] = Field(description="strongest first; empty where the bank keeps no patterns")


class MemoryResult(BaseModel):
    state: State
    energy: float
    steps: int
    converged: bool
    nearest: Nearest | None
    trace: list[float] | None = None
    explanation: list[ExplainedStep] | None = Field(default=None, description="with explain: one entry per step, "
                                                                                  "the start included")


class RetrieveResponse(BaseModel):
    results: list[MemoryResult]

    @classmethod
    def from_results(cls, results: MemoryResults, encoding_format: str = "float") -> RetrieveResponse:
        """The response for a backend's columns, built without re-validating what the engine made."""
        states = encoded_states(results.states, encoding_format)
        nearest = [None if pid is None else Nearest.model_construct(id=pid, similarity=similarity)
                   for pid, similarity in zip(results.nearest, results.similarity.tolist())]
        steps = results.steps.tolist()
        traces = [None] * len(steps) if results.trace is None else [
            row[:count + 1] for row, count in zip(results.trace.tolist(), steps)]
        explanations = [None] * len(steps) if results.step_states is None else [
            explained_steps(results, row, count, trace, encoding_format)
            for row, (count, trace) in enumerate(zip(steps, traces))]
        return cls.model_construct(results=[
            MemoryResult.model_construct(state=state, energy=energy, steps=count, converged=converged,
                                         nearest=near, trace=trace, explanation=explanation)
            for state, energy, count, converged, near, trace, explanation in zip(
                states, results.energy.tolist(), steps, results.converged.tolist(), nearest,
                traces, explanations)])


def encoded_states(states: np.ndarray, encoding_format: str) -> list:
    """N×D float32 states as lists of floats, or base64 strings of little-endian float32."""
    if encoding_format == "base64":
        return [base64.b64encode(row).decode("ascii") for row in np.ascontiguousarray(states, "<f4")]
    return states.tolist()


def explained_steps(results: MemoryResults, row: int, steps: int, energies: list[float],
                    encoding_format: str) -> list[ExplainedStep]:
    """Result `row`'s steps 0..steps; its energies are the trace's."""
    states = encoded_states(results.step_states[row, :steps + 1], encoding_format)
    ids, weights = results.top_ids[row, :steps + 1].tolist(), results.top_weights[row, :steps + 1].tolist()
    return [ExplainedStep.model_construct(state=state, energy=energy, top_memories=[
                TopMemory.model_construct(id=pid, weight=weight) for pid, weight in zip(step_ids, step_weights)])
            for state, energy, step_ids, step_weights in zip(states, energies, ids, weights)]


class CompleteImageRequest(Strict):
    model: Literal["energy-transformer"] = "energy-transformer"
    image: list[list[Pixel]] = Field(min_length=1, description="H×W pixel values in [0,1]")
    mask: list[list[bool]] = Field(min_length=1, description="H×W, true = missing pixel")
    steps: int | None = Field(default=None, ge=0, le=1000)
    explain: bool = Field(default=False, description="the image after every step (the start included), with the "
                                                     "energy split into its attention and Hopfield parts")

    _rectangular = field_validator("image")(check_matrix)
    _same_shape_as_image = field_validator("mask")(shaped_like("image"))


class ImageFrame(BaseModel):
    image: list[list[float]]
    energy: float = Field(description="attention_energy + hopfield_energy")
    attention_energy: float
    hopfield_energy: float


class CompleteImageResponse(BaseModel):
    model: str
    image: list[list[float]]
    energy_trace: list[float]
    frames: list[ImageFrame] | None = Field(default=None, description="with explain: one per step, the start "
                                                                      "included; the last is `image`")

    @classmethod
    def explained(cls, model: str, frames: np.ndarray, attention: np.ndarray, hopfield: np.ndarray
                  ) -> CompleteImageResponse:
        energy = (attention + hopfield).tolist()
        return cls.model_construct(model=model, image=frames[-1].tolist(), energy_trace=energy, frames=[
            ImageFrame.model_construct(image=image, energy=total, attention_energy=a, hopfield_energy=h)
            for image, total, a, h in zip(frames.tolist(), energy, attention.tolist(), hopfield.tolist())])


MAX_PROMPT_CHARS = 1_000_000  # the schema's bound; the service's own limit (a setting) is lower
MAX_NEW_TOKENS = 8192
MAX_CHOICES = 64  # prompts × n; the service's own limit is lower


class SamplingFields(Strict):
    """Sampling knobs shared by /v1/generate and the OpenAI-compatible /v1/completions and /v1/chat/completions."""

    max_tokens: int = Field(default=16, ge=1, le=MAX_NEW_TOKENS)
    temperature: float = Field(default=1.0, ge=0, le=100, allow_inf_nan=False, description="0 = greedy")
    top_p: float = Field(default=1.0, gt=0, le=1, allow_inf_nan=False)
    seed: int | None = Field(default=None, ge=0, lt=2**63)
    stop: str | list[str] | None = Field(default=None, description="strings that end the text (not returned)")
    stream: bool = False

    def stop_strings(self) -> tuple[str, ...]:
        return (self.stop,) if isinstance(self.stop, str) else tuple(self.stop or ())


class GenerateRequest(SamplingFields):
    prompt: str = Field(max_length=MAX_PROMPT_CHARS)
    top_k: int = Field(default=0, ge=0, le=1_000_000, description="0 = off")
    logprobs: int | None = Field(default=None, ge=0, le=20, description="top-n alternatives per token")
    timeout: float | None = Field(default=None, gt=0, le=3600, description="seconds before finish_reason=deadline")


class Alternative(BaseModel):
    token: str
    token_id: int
    logprob: float


class TokenLogprob(Alternative):
    top: list[Alternative]


class GenerateResponse(BaseModel):
    text: str
    tokens: list[int]
    finish_reason: str
    usage: Usage
    logprobs: list[TokenLogprob] | None = None


MAX_TOP_N = 100
MAX_INDICES = 1024  # layers or heads a /v1/explain may list
Indices = Annotated[list[Annotated[int, Field(ge=0)]], Field(min_length=1, max_length=MAX_INDICES)]


class ExplainTextRequest(Strict):
    prompt: str = Field(max_length=MAX_PROMPT_CHARS)
    temperature: float = Field(default=1.0, ge=0, le=100, allow_inf_nan=False, description="0 = greedy")
    top_k: int = Field(default=0, ge=0, le=1_000_000, description="0 = off")
    top_p: float = Field(default=1.0, gt=0, le=1, allow_inf_nan=False)
    top_n: int = Field(default=10, ge=1, le=MAX_TOP_N, description="next-token candidates to list")
    layers: Indices | None = Field(default=None, description="layer indices whose attention to answer (default all)")
    heads: Indices | None = Field(default=None, description="head indices whose attention to answer (default all)")


class PromptToken(BaseModel):
    text: str
    id: int


class NextTokenCandidate(BaseModel):
    token: str
    token_id: int
    logit: float
    probability: float = Field(description="softmax(logits / temperature); temperature 0 counts as 1")
    kept_by_top_k: bool
    kept_by_top_p: bool


class NextToken(BaseModel):
    candidates: list[NextTokenCandidate] = Field(description="the top_n most likely, most likely first")
    distribution: list[float] = Field(description="per candidate, what the sampler draws from: top-k and top-p "
                                                  "applied, renormalised over every kept token (0 where removed)")


class ExplainTextResponse(BaseModel):
    model: str
    tokens: list[PromptToken]
    layers: list[int] = Field(description="the layers `attention` holds, in its order")
    heads: list[int] = Field(description="the heads `attention` holds, in its order")
    attention: list[list[list[list[float]]]] = Field(description="[layer][head][query][key] causal softmax weights")
    next_token: NextToken

    @classmethod
    def of(cls, model: str, explained: TextExplanation) -> ExplainTextResponse:
        nxt = explained.next_token
        return cls.model_construct(
            model=model, layers=explained.layers, heads=explained.heads,
            tokens=[PromptToken.model_construct(text=t, id=i) for t, i in zip(explained.tokens, explained.token_ids)],
            attention=explained.attention.tolist(),
            next_token=NextToken.model_construct(distribution=nxt.distribution, candidates=[
                NextTokenCandidate.model_construct(token=t, token_id=i, logit=logit, probability=p, kept_by_top_k=k,
                                                   kept_by_top_p=q)
                for t, i, logit, p, k, q in zip(nxt.tokens, nxt.token_ids, nxt.logits, nxt.probabilities,
                                                 nxt.kept_by_top_k, nxt.kept_by_top_p)]))


class StreamOptions(Strict):
    include_usage: bool = Field(default=False, description="a last chunk with the usage and no choices")


class OpenAIFields(SamplingFields):
    """What OpenAI's completions and chat completions share, with vLLM's extensions."""

    model: str
    n: int = Field(default=1, ge=1, le=MAX_CHOICES, description="choices per prompt; choice i samples with seed + i")
    stream_options: StreamOptions | None = None
    user: str | None = None
    min_tokens: int = Field(default=0, ge=0, le=MAX_NEW_TOKENS,
                            description="(vLLM) no end-of-sequence token before this many tokens")
    ignore_eos: bool = Field(default=False, description="(vLLM) generate past the end-of-sequence token")

    def include_usage(self) -> bool:
        return self.stream_options is not None and self.stream_options.include_usage


TokenId = Annotated[int, Field(ge=0, lt=2**31)]


class CompletionsRequest(OpenAIFields):
    """OpenAI `POST /v1/completions`: one choice per prompt and n, index ordered (prompt-major)."""

    prompt: (Annotated[str, Field(max_length=MAX_PROMPT_CHARS)]
             | Annotated[list[Annotated[str, Field(max_length=MAX_PROMPT_CHARS)]],
                         Field(min_length=1, max_length=MAX_CHOICES)]
             | Annotated[list[TokenId], Field(min_length=1, max_length=MAX_NEW_TOKENS * 16)]
             | Annotated[list[Annotated[list[TokenId], Field(min_length=1, max_length=MAX_NEW_TOKENS * 16)]],
                         Field(min_length=1, max_length=MAX_CHOICES)]) = Field(
        description="a text, texts, token ids, or lists of token ids: one choice (n choices) per prompt")
    max_tokens: int = Field(default=16, ge=0, le=MAX_NEW_TOKENS, description="0 with echo: score the prompt only")
    logprobs: int | None = Field(default=None, ge=0, le=5, description="the n most likely alternatives per token")
    echo: bool = Field(default=False, description="the prompt first in the text; with logprobs, its tokens' too "
                                                  "(the first one's null)")

    @model_validator(mode="after")
    def _scoring_needs_echo(self) -> CompletionsRequest:
        if self.max_tokens == 0 and not self.echo:
            raise field_error("max_tokens", "0 is for scoring the prompt, with echo true")
        if self.min_tokens > self.max_tokens:
            raise field_error("min_tokens", "more than max_tokens")
        return self

    _one_prompt_shape = field_validator("prompt", mode="wrap")(one_message(
        "prompt", "must be a string, or a non-empty array of strings, of token ids (integers >= 0) or of "
        "non-empty arrays of token ids"))

    def prompts(self) -> list[str | list[int]]:
        """Each prompt: a text or token ids."""
        if isinstance(self.prompt, str) or isinstance(self.prompt[0], int):
            return [self.prompt]
        return list(self.prompt)


class TextPart(Strict):
    type: Literal["text"]
    text: str = Field(max_length=MAX_PROMPT_CHARS)


class ChatMessage(Strict):
    role: Literal["system", "user", "assistant"]
    content: Annotated[str, Field(max_length=MAX_PROMPT_CHARS)] | Annotated[list[TextPart], Field(
        min_length=1, max_length=10_000)]

    _one_content_shape = field_validator("content", mode="wrap")(one_message(
        "content", 'must be a string or a non-empty array of {"type": "text", "text"} parts'))

    def text(self) -> str:
        return self.content if isinstance(self.content, str) else "".join(part.text for part in self.content)


class ChatCompletionsRequest(OpenAIFields):
    """OpenAI `POST /v1/chat/completions`: the messages rendered with the model's chat template."""

    messages: list[ChatMessage] = Field(min_length=1, max_length=10_000)
    max_tokens: int | None = Field(default=None, ge=1, le=MAX_NEW_TOKENS,
                                   description="as max_completion_tokens (OpenAI's older name)")
    max_completion_tokens: int | None = Field(default=None, ge=1, le=MAX_NEW_TOKENS,
                                              description="default: the service's limit of new tokens")
    logprobs: bool = Field(default=False, description="each generated token's logprob")
    top_logprobs: int | None = Field(default=None, ge=0, le=20,
                                     description="the n most likely alternatives per token; needs logprobs")

    @model_validator(mode="after")
    def _consistent(self) -> ChatCompletionsRequest:
        if self.top_logprobs is not None and not self.logprobs:
            raise field_error("top_logprobs", "needs logprobs true")
        new_tokens = self.max_completion_tokens or self.max_tokens
        if new_tokens is not None and self.min_tokens > new_tokens:
            raise field_error("min_tokens", "more than max_completion_tokens")
        return self


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    owned_by: str = "amserve"
    task: str
    ready: bool
    details: dict[str, Any] = Field(default_factory=dict)


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class Readiness(BaseModel):
    ready: bool
    backend: str
    degraded: list[str] = Field(description="parts that cannot serve while the rest does (e.g. writes while the store is away)")


class ErrorBody(BaseModel):
    code: str
    message: str
    field: str | None = None


class ErrorResponse(BaseModel):
    error: ErrorBody
