"""GGUF loading and conversion: a tiny Llama written the way llama.cpp's converter writes it
(llama.cpp tensor names, q/k rows permuted for its RoPE), checked against HF transformers."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from pathlib import Path

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType, GGUFWriter
from gguf.quants import dequantize, quantize
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from service.engines.lm import convert_gguf, load_model
from service.engines.lm.tokenizer import bytes_to_unicode
from tests.engines.test_lm_tokenizer import hf_byte_level_bpe

SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
MERGES = [("Ġ", "t"), ("h", "e"), ("Ġt", "he"), ("i", "n"), ("Ġ", "a"), ("1", "2")]
TOKENS = [*SPECIALS, *bytes_to_unicode().values(), *("".join(m) for m in MERGES)]
CHAT_TEMPLATE = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
                 "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
HEADS, KV_HEADS = 4, 2


def llama_cpp_permute(weight: np.ndarray, n_heads: int) -> np.ndarray:
    """As in llama.cpp's convert_hf_to_gguf.py (LlamaModel.permute)."""
    return (weight.reshape(n_heads, 2, weight.shape[0] // n_heads // 2, *weight.shape[1:])
            .swapaxes(1, 2).reshape(weight.shape))


def gguf_name(hf_name: str) -> str:
    fixed = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
             "lm_head.weight": "output.weight"}
    if hf_name in fixed:
        return fixed[hf_name]
    parts = {"input_layernorm": "attn_norm", "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k",
             "self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output",
             "post_attention_layernorm": "ffn_norm", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
             "mlp.down_proj": "ffn_down"}
    layer, rest = hf_name.removeprefix("model.layers.").split(".", 1)
    return f"blk.{layer}.{parts[rest.removesuffix('.weight')]}.weight"


def write_tiny_gguf(path: Path, hf: LlamaForCausalLM, quant: GGMLQuantizationType) -> dict[str, torch.Tensor]:
    """Writes `hf` as GGUF; returns the HF state dict as the file holds it (after quantisation)."""
    c = hf.config
    writer = GGUFWriter(path, "llama")
    writer.add_context_length(c.max_position_embeddings)
    writer.add_embedding_length(c.hidden_size)
    writer.add_block_count(c.num_hidden_layers)
    writer.add_feed_forward_length(c.intermediate_size)
    writer.add_head_count(c.num_attention_heads)
    writer.add_head_count_kv(c.num_key_value_heads)
    writer.add_layer_norm_rms_eps(c.rms_norm_eps)
    writer.add_rope_freq_base(c.rope_parameters["rope_theta"])
    writer.add_rope_dimension_count(c.hidden_size // c.num_attention_heads)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("smollm")
    writer.add_token_list(TOKENS)
    writer.add_token_types([3] * len(SPECIALS) + [1] * (len(TOKENS) - len(SPECIALS)))
    writer.add_token_merges([" ".join(m) for m in MERGES])
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    writer.add_chat_template(CHAT_TEMPLATE)
    stored = {}
    for name, tensor in hf.state_dict().items():
        values = tensor.numpy()
        if values.ndim == 2 and quant != GGMLQuantizationType.F32:
            values = dequantize(quantize(values, quant), quant)  # what the file will hold
        stored[name] = torch.from_numpy(values.copy())
        if name.endswith("q_proj.weight"):
            values = llama_cpp_permute(values, HEADS)
        elif name.endswith("k_proj.weight"):
            values = llama_cpp_permute(values, KV_HEADS)
        if values.ndim == 2 and quant != GGMLQuantizationType.F32:
            writer.add_tensor(gguf_name(name), quantize(values, quant), raw_dtype=quant)
        else:
            writer.add_tensor(gguf_name(name), np.ascontiguousarray(values, dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return stored


def tiny_hf_llama() -> LlamaForCausalLM:
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(TOKENS), hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                         num_attention_heads=HEADS, num_key_value_heads=KV_HEADS, max_position_embeddings=64,
                         rope_theta=500.0, initializer_range=0.2, bos_token_id=1, eos_token_id=2)
    return LlamaForCausalLM(config).eval()


@pytest.fixture(scope="module", params=[GGMLQuantizationType.F32, GGMLQuantizationType.Q8_0], ids=["f32", "q8_0"])
def gguf_file(request, tmp_path_factory) -> tuple[Path, LlamaForCausalLM]:
    """(the .gguf path, an HF model holding exactly the weights stored in it)."""
    hf = tiny_hf_llama()
    path = tmp_path_factory.mktemp("gguf") / "tiny.gguf"
    stored = write_tiny_gguf(path, hf, request.param)
    hf.load_state_dict(stored)
    return path, hf


def test_gguf_logits_match_hf(gguf_file):
    path, hf = gguf_file
    model, _ = load_model(path)
    tokens = torch.randint(0, len(TOKENS), (2, 30), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = hf(tokens).logits
    assert model.config.n_kv_heads == KV_HEADS and not model.config.tied_head
    torch.testing.assert_close(model(tokens), expected, atol=1e-4, rtol=0)


def test_gguf_tokenizer_matches_hf_tokenizers(gguf_file):
    _, tokenizer = load_model(gguf_file[0])
    reference = hf_byte_level_bpe({t: i for i, t in enumerate(TOKENS)}, MERGES, SPECIALS, split_digits=True)
    for text in ["the thin hen", " the 12 in a tin", "<|im_start|>user\nthe<|im_end|>", "ünï 🌍"]:
        assert tokenizer.encode(text) == reference.encode(text, add_special_tokens=False).ids
        assert tokenizer.decode(tokenizer.encode(text)) == text
    assert tokenizer.encode(" the") == [TOKENS.index("Ġthe")]
    assert tokenizer.eos_token_id == 2


@pytest.mark.parametrize("gguf_file", [GGMLQuantizationType.Q8_0], indirect=True, ids=["q8_0"])
def test_convert_gguf_writes_a_directory_hf_can_load(gguf_file, tmp_path):
    path, hf = gguf_file
    out = convert_gguf(path, tmp_path / "converted", progress=False)
    assert {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"} <= {
        p.name for p in out.iterdir()}
    tokens = torch.randint(0, len(TOKENS), (1, 20), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = hf(tokens).logits
        converted_by_hf = LlamaForCausalLM.from_pretrained(out).eval()(tokens).logits
    torch.testing.assert_close(converted_by_hf, expected, atol=1e-4, rtol=0)

    model, tokenizer = load_model(out)
    torch.testing.assert_close(model(tokens), expected, atol=1e-4, rtol=0)
    _, from_gguf = load_model(path)
    hf_tokenizer = PreTrainedTokenizerFast.from_pretrained(out)
    messages = [{"role": "user", "content": "the 12 hens"}]
    chat = tokenizer.apply_chat_template(messages)
    assert chat == from_gguf.apply_chat_template(messages) == hf_tokenizer.apply_chat_template(messages,
                                                                                                tokenize=False,
                                                                                                add_generation_prompt=True)
    assert tokenizer.encode(chat) == from_gguf.encode(chat) == hf_tokenizer.encode(chat, add_special_tokens=False)
    assert (tokenizer.bos_token_id, tokenizer.eos_token_id) == (1, 2)
