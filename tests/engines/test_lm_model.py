"""Our GPT-2 and Llama against HF transformers on tiny random models saved as safetensors."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from pathlib import Path

import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

from service.engines.lm import Transformer, load_model, load_weights

VOCAB = 96
ATOL = 1e-4


def tiny_hf_model(arch: str, seed: int = 0) -> torch.nn.Module:
    """Random weights with a wide init, so greedy choices are not decided by rounding noise."""
    torch.manual_seed(seed)
    if arch == "gpt2":
        config = GPT2Config(vocab_size=VOCAB, n_positions=64, n_embd=32, n_layer=2, n_head=4,
                            initializer_range=0.2, bos_token_id=None, eos_token_id=None)
        return GPT2LMHeadModel(config).eval()
    config = LlamaConfig(vocab_size=VOCAB, hidden_size=48, intermediate_size=80, num_hidden_layers=2,
                         num_attention_heads=6, num_key_value_heads=2,  # grouped-query attention
                         max_position_embeddings=64, rope_theta=500.0, initializer_range=0.2,
                         bos_token_id=None, eos_token_id=None, pad_token_id=None)
    return LlamaForCausalLM(config).eval()


@pytest.fixture(scope="module", params=["gpt2", "llama"])
def pair(request, tmp_path_factory) -> tuple[torch.nn.Module, Transformer, Path]:
    """(HF model, ours loaded from its save_pretrained directory, the directory)."""
    hf = tiny_hf_model(request.param)
    directory = tmp_path_factory.mktemp(request.param)
    # Llama is written in shards to exercise the index file.
    hf.save_pretrained(directory, max_shard_size="20KB" if request.param == "llama" else "1GB")
    assert (directory / "model.safetensors.index.json").exists() == (request.param == "llama")
    return hf, load_weights(directory), directory


def hf_logits(hf: torch.nn.Module, tokens: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return hf(tokens).logits


def test_forward_logits_match_hf(pair):
    hf, ours, _ = pair
    tokens = torch.randint(0, VOCAB, (3, 40), generator=torch.Generator().manual_seed(1))
    expected = hf_logits(hf, tokens)
    assert expected.abs().max() > 1  # not a degenerate model
    torch.testing.assert_close(ours(tokens), expected, atol=ATOL, rtol=0)


def test_prefill_and_cached_decode_match_hf(pair):
    hf, ours, _ = pair
    tokens = torch.randint(0, VOCAB, (30,), generator=torch.Generator().manual_seed(2))
    expected = hf_logits(hf, tokens[None])[0]
    ours.setup_cache(max_batch=2, max_context=32)
    torch.testing.assert_close(ours.prefill(tokens[:10], slot=1), expected[9], atol=ATOL, rtol=0)
    for position in range(10, 30):
        logits = ours.decode(tokens[position:position + 1], slots=[1], positions=[position])
        torch.testing.assert_close(logits[0], expected[position], atol=ATOL, rtol=0)


@pytest.mark.parametrize("slots", [[2, 0, 3], [0, 1, 2]], ids=["scattered-slots", "consecutive-slots"])
def test_batched_decode_over_slots_of_different_lengths(pair, slots):
    hf, ours, _ = pair
    gen = torch.Generator().manual_seed(3)
    sequences = [torch.randint(0, VOCAB, (n,), generator=gen) for n in (25, 12, 7)]
    prompt_lengths = [20, 5, 2]
    expected = [hf_logits(hf, s[None])[0] for s in sequences]
    ours.setup_cache(max_batch=4, max_context=32)
    for sequence, slot, length in zip(sequences, slots, prompt_lengths):
        ours.prefill(sequence[:length], slot)
    assert_decodes_as_hf(ours, sequences, slots, prompt_lengths, expected, steps=5)


def test_prompts_prefilled_together_decode_as_each_alone(pair):
    """prefill_many: one pass over several prompts, each into its own slot, then decode as usual."""
    hf, ours, _ = pair
    gen = torch.Generator().manual_seed(4)
    sequences = [torch.randint(0, VOCAB, (n,), generator=gen) for n in (10, 30, 5)]
    prompt_lengths, slots = [6, 25, 1], [1, 3, 0]
    expected = [hf_logits(hf, s[None])[0] for s in sequences]
    ours.setup_cache(max_batch=4, max_context=32)
    last = ours.prefill_many([s[:n] for s, n in zip(sequences, prompt_lengths)], slots)
    for row, (want, length) in enumerate(zip(expected, prompt_lengths)):
        torch.testing.assert_close(last[row], want[length - 1], atol=ATOL, rtol=0)
    assert_decodes_as_hf(ours, sequences, slots, prompt_lengths, expected, steps=4)


def greedy_with_cache(model: Transformer, prompt: torch.Tensor, new_tokens: int) -> list[int]:
    model.setup_cache(max_batch=1, max_context=len(prompt) + new_tokens)
    logits, out = model.prefill(prompt, slot=0), []
    for position in range(len(prompt), len(prompt) + new_tokens):
        out.append(int(logits.argmax()))
        logits = model.decode(torch.tensor(out[-1:]), [0], [position])[0]
    return out


def greedy_without_cache(model: Transformer, prompt: torch.Tensor, new_tokens: int) -> list[int]:
    tokens = prompt.tolist()
    for _ in range(new_tokens):
        tokens.append(int(model(torch.tensor([tokens]))[0, -1].argmax()))
    return tokens[len(prompt):]


def test_greedy_continuation_matches_hf_generate(pair):
    hf, ours, _ = pair
    prompt = torch.randint(0, VOCAB, (6,), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        generated = hf.generate(prompt[None], attention_mask=torch.ones(1, 6, dtype=torch.long),
                                max_new_tokens=20, do_sample=False, pad_token_id=0)
    expected = generated[0, 6:].tolist()
    assert len(expected) == 20 and len(set(expected)) > 3
    assert greedy_with_cache(ours, prompt, 20) == expected
    assert greedy_without_cache(ours, prompt, 20) == expected


@pytest.mark.parametrize("pair", ["gpt2"], indirect=True)
def test_gpt2_directory_without_tokenizer_files_uses_gpt2_vocabulary(pair):
    _, _, directory = pair
    model, tokenizer = load_model(directory)
    assert tokenizer.encode("Hello world") == [15496, 995]
    assert tokenizer.eos_token_id == 50256
    assert model.config.tied_head and model.output.weight is model.tok_embeddings.weight


def assert_decodes_as_hf(ours, sequences, slots, prompt_lengths, expected, steps: int) -> None:
    """`steps` decode steps of every slot at once, each token's logits against HF's over its own sequence."""
    for step in range(steps):
        positions = [length + step for length in prompt_lengths]
        tokens = torch.stack([s[p] for s, p in zip(sequences, positions)])
        logits = ours.decode(tokens, slots, positions)
        for row, (want, position) in enumerate(zip(expected, positions)):
            torch.testing.assert_close(logits[row], want[position], atol=ATOL, rtol=0)
