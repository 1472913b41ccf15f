"""Decoder LMs (GPT-2, Llama): model with a slot KV cache, weight loading, BPE tokenizers,
batched sampling and the continuous-batching scheduler."""

from service.engines.lm.model import KVCache, ModelConfig, Transformer
from service.engines.lm.sampling import SampleOutput, SamplingParams, StopMatcher, TokenLogprobs, sample
from service.engines.lm.scheduler import (
    Event,
    FinishEvent,
    GenerationRequest,
    RequestHandle,
    Scheduler,
    SchedulerStats,
    TokenEvent,
    Usage,
)
from service.engines.lm.tokenizer import IncrementalDecoder, Tokenizer
from service.engines.lm.weights import convert_gguf, default_gguf_path, load_model, load_weights

__all__ = [
    "Event", "FinishEvent", "GenerationRequest", "IncrementalDecoder", "KVCache", "ModelConfig",
    "RequestHandle", "SampleOutput", "SamplingParams", "Scheduler", "SchedulerStats", "StopMatcher",
    "TokenEvent", "TokenLogprobs", "Tokenizer", "Transformer", "Usage", "convert_gguf", "default_gguf_path",
    "load_model", "load_weights", "sample",
]
