"""The decode step through torch.compile (`Transformer.compile_decode`): the logits of the eager
step, for one sequence and for batches of any size, without compiling again."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

from service.engines.lm import Transformer, default_gguf_path, load_model, load_weights
from service.serving.scheduler import Scheduler
from tests.engines.test_lm_default_model import generate
from tests.engines.test_lm_quantized import TEXT

VOCAB = 96


@pytest.fixture
def no_recompilation():
    """From here on a recompilation of the step raises (compile_decode made both graphs)."""
    with torch.compiler.set_stance("fail_on_recompile"):
        yield


def tiny_quantizable_model(arch: str) -> torch.nn.Module:
    """Random weights whose input dimensions are multiples of the int4 group size."""
    torch.manual_seed(0)
    if arch == "gpt2":
        config = GPT2Config(vocab_size=VOCAB, n_positions=64, n_embd=64, n_layer=2, n_head=4,
                            initializer_range=0.2, bos_token_id=None, eos_token_id=None)
        return GPT2LMHeadModel(config).eval()
    config = LlamaConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                         initializer_range=0.2, bos_token_id=None, eos_token_id=None, pad_token_id=None)
    return LlamaForCausalLM(config).eval()


def decode_steps(model: Transformer, sequences: list[torch.Tensor], slots: list[int], starts: list[int],
                 steps: int) -> torch.Tensor:
    """Prefill each sequence's first `starts[i]` tokens into its slot, then decode `steps` of them
    all at once -> (steps * len(slots), vocab)."""
    for sequence, slot, start in zip(sequences, slots, starts):
        model.prefill(sequence[:start], slot)
    rows = []
    for step in range(steps):
        positions = [start + step for start in starts]
        tokens = torch.stack([s[p] for s, p in zip(sequences, positions)])
        rows.append(model.decode(tokens, slots, positions))
    return torch.cat(rows)


@pytest.mark.parametrize("dtype", ["int8", "int4"])
@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_compiled_decode_is_the_eager_one_for_one_sequence_and_for_batches(arch, dtype, tmp_path):
    tiny_quantizable_model(arch).save_pretrained(tmp_path)
    eager, compiled = load_weights(tmp_path, dtype=dtype), load_weights(tmp_path, dtype=dtype)
    for model in (eager, compiled):
        model.setup_cache(max_batch=4, max_context=32)
    compiled.compile_decode()
    gen = torch.Generator().manual_seed(5)
    sequences = [torch.randint(0, VOCAB, (n,), generator=gen) for n in (25, 12, 7)]
    cases = [([sequences[0]], [0], [8]),  # one sequence
             (sequences, [2, 0, 3], [20, 5, 2]),  # slots out of order, of different lengths (masked)
             (sequences[:2], [0, 1], [6, 6])]  # consecutive slots, same length
    with torch.compiler.set_stance("fail_on_recompile"):
        for case in cases:
            want, got = decode_steps(eager, *case, steps=4), decode_steps(compiled, *case, steps=4)
            assert want.abs().max() > 1  # not a degenerate model
            torch.testing.assert_close(got, want, atol=0.1, rtol=0)


def test_float_models_decode_eagerly(tmp_path):
    tiny_quantizable_model("llama").save_pretrained(tmp_path)
    model = load_weights(tmp_path)  # fp32: oneDNN-packed Linear layers
    assert not model.decode_compiles
    model.setup_cache(max_batch=2, max_context=32)
    with pytest.raises(RuntimeError, match="quantized"):
        model.compile_decode()
    Scheduler(model, None, max_batch_size=2, max_context=32, compile_decode=True).close()
    assert model._compiled_step is None


@pytest.fixture(scope="module")
def eager_and_compiled():
    """The default model in int4 (as served) twice, one decoding eagerly and one compiled."""
    eager, tokenizer = load_model(default_gguf_path(), dtype="int4")
    compiled, _ = load_model(default_gguf_path(), dtype="int4")
    for model in (eager, compiled):
        model.setup_cache(max_batch=4, max_context=128)
    compiled.compile_decode()
    return eager, compiled, tokenizer


def test_the_compiled_default_model_decodes_as_the_eager_one(eager_and_compiled, no_recompilation):
    """Inductor computes the bf16 products' neighbours in fp32 and rounds once where the eager step
    rounds after each op (measured here: at most 0.5 logit apart, every top-1 alike)."""
    eager, compiled, tokenizer = eager_and_compiled
    tokens = torch.tensor(tokenizer.encode(TEXT))
    three = ([tokens] * 3, [0, 1, 2], [40, 25, 32])  # at different positions, then one alone
    steps = {name: torch.cat((decode_steps(model, *three, steps=12), decode_steps(model, [tokens], [0], [50], 12)))
             for name, model in (("eager", eager), ("compiled", compiled))}
    assert steps["eager"].abs().max() > 5
    assert (steps["compiled"] - steps["eager"]).abs().max() <= 1.5
    assert (steps["compiled"].argmax(-1) == steps["eager"].argmax(-1)).float().mean() >= 0.95


def test_a_scheduler_compiles_the_step_and_generates_with_it(eager_and_compiled):
    eager, compiled, tokenizer = eager_and_compiled
    text, reason = generate(compiled, tokenizer, "The capital of France is", max_tokens=8, compile_decode=True)
    assert compiled._compiled_step is not None  # made again for the scheduler's cache
    assert (text, reason) == generate(eager, tokenizer, "The capital of France is", max_tokens=8)
    assert "Paris" in text and reason == "length"
