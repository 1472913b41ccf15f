"""Decoder LMs (GPT-2, Llama): the model with a slot KV cache, weight loading, BPE tokenizers and
batched sampling. The continuous-batching scheduler that drives them is in service/serving/."""

from service.engines.lm.model import KVCache, ModelConfig, Transformer
from service.engines.lm.sampling import SampleOutput, SamplingParams, StopMatcher, TokenLogprobs, sample
from service.engines.lm.tokenizer import IncrementalDecoder, Tokenizer
from service.engines.lm.weights import convert_gguf, default_gguf_path, load_model, load_weights

__all__ = [
    "IncrementalDecoder", "KVCache", "ModelConfig", "SampleOutput", "SamplingParams", "StopMatcher",
    "TokenLogprobs", "Tokenizer", "Transformer", "convert_gguf", "default_gguf_path", "load_model",
    "load_weights", "sample",
]
