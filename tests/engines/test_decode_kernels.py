"""The fused decode kernels (service/engines/lm/kernels.py) against the PyTorch ops they replace,
and the Llama decode step on them against the step on PyTorch ops."""

from __future__ import annotations

import logging
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from service.engines.lm import kernels
from service.engines.lm.model import ModelConfig, Transformer, apply_rope, rope_table
from tests.engines import test_lm_quantized as quantized_tests

EPS = 1e-5


@pytest.fixture(scope="module", params=kernels.runnable_capabilities())
def run(request):
    """The kernels built for this CPU, and the narrower builds other CPUs get (AVX2, portable)."""
    if request.param == kernels.capability():
        module = kernels.load()
        assert module is not None, "the kernels did not build: make setup installs g++ and ninja"
        return module
    return kernels.build(cpu=request.param)


def close(got: torch.Tensor, want: torch.Tensor) -> None:
    """fp32 results to float rounding; bf16 ones may round one bf16 step apart."""
    assert got.dtype == want.dtype and got.shape == want.shape
    tolerance = {torch.float32: (1e-5, 1e-5), torch.bfloat16: (2 ** -7, 1e-2)}[want.dtype]
    torch.testing.assert_close(got.float(), want.float(), rtol=tolerance[0], atol=tolerance[1])


@pytest.mark.parametrize("residual_dtype", [None, torch.float32, torch.bfloat16])
@pytest.mark.parametrize("out_dtype", [torch.float32, torch.bfloat16])
def test_add_rms_norm_is_the_residual_add_then_rms_norm(run, residual_dtype, out_dtype):
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(5, 576, generator=gen) * 3
    weight = torch.rand(576, generator=gen) + 0.5
    residual = None if residual_dtype is None else torch.randn(5, 576, generator=gen).to(residual_dtype)
    added = x if residual is None else x + residual  # fp32 + bf16 promotes to fp32, as the model adds
    got = run.add_rms_norm(x, residual, weight, EPS, out_dtype)
    torch.testing.assert_close(x, added, rtol=0, atol=0)  # the residual stream is added to in place
    close(got, F.rms_norm(added, (576,), weight, EPS).to(out_dtype))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_silu_mul_is_silu_of_the_gate_times_up(run, dtype):
    gate_up = (torch.randn(3, 2 * 1539, generator=torch.Generator().manual_seed(1)) * 4).to(dtype)  # odd width: a tail
    gate, up = gate_up.chunk(2, dim=-1)
    close(run.silu_mul(gate_up), F.silu(gate) * up)


def reference_attention(qkv, rope, cache_k, cache_v, layer, slots, positions, n_heads, n_kv_heads):
    """model.py's decode step on PyTorch ops, one sequence at a time."""
    head_dim = cache_k.shape[-1]
    outputs = []
    for row, slot, position in zip(qkv, slots, positions):
        heads = row.float().view(n_heads + 2 * n_kv_heads, head_dim)
        qk = apply_rope(heads[:n_heads + n_kv_heads], rope[position, 0], rope[position, 1])
        q, k, v = qk[:n_heads], qk[n_heads:], heads[n_heads + n_kv_heads:]
        cache_k[layer, slot, :, position] = k.to(cache_k.dtype)
        cache_v[layer, slot, :, position] = v.to(cache_v.dtype)
        keys = cache_k[layer, slot, :, :position + 1].float()
        values = cache_v[layer, slot, :, :position + 1].float()
        outputs.append(F.scaled_dot_product_attention(q[None, :, None], keys[None], values[None], enable_gqa=True)
                       .reshape(-1))
    return torch.stack(outputs)


@pytest.mark.parametrize("cache_dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("qkv_dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("positions", [[0], [37, 3, 200]], ids=["first-position", "uneven-prefixes"])
def test_rope_attention_writes_the_cache_and_attends_as_sdpa(run, cache_dtype, qkv_dtype, positions):
    """Grouped-query attention (6 query heads on 2 kv heads), sequences in scattered slots, each
    over its own prefix: the output, and the cache rows written (and only those)."""
    config = ModelConfig(arch="llama", vocab_size=8, dim=96, n_layers=3, n_heads=6, n_kv_heads=2, ffn_dim=8,
                         max_context=256)
    gen = torch.Generator().manual_seed(2)
    slots = [3, 0, 1][:len(positions)]
    rope = rope_table(config)
    cache_k = torch.randn(3, 4, 2, 256, 16, generator=gen).to(cache_dtype)
    cache_v = torch.randn(3, 4, 2, 256, 16, generator=gen).to(cache_dtype)
    qkv = (torch.randn(len(positions), 10 * 16, generator=gen) * 2).to(qkv_dtype)
    want_k, want_v = cache_k.clone(), cache_v.clone()
    want = reference_attention(qkv, rope, want_k, want_v, 1, slots, positions, 6, 2)
    got = run.rope_attention(qkv, rope, cache_k, cache_v, 1, torch.tensor(slots), torch.tensor(positions), 6, 2,
                             torch.float32)
    close(got, want)
    close(cache_k, want_k)
    close(cache_v, want_v)
    written = torch.zeros(3, 4, 2, 256, dtype=torch.bool)
    for slot, position in zip(slots, positions):
        written[1, slot, :, position] = True
    assert torch.equal(cache_k[~written], want_k[~written]) and torch.equal(cache_v[~written], want_v[~written])
    assert not torch.equal(cache_k[written], torch.zeros_like(cache_k[written]))
    as_bf16 = run.rope_attention(qkv, rope, cache_k, cache_v, 1, torch.tensor(slots), torch.tensor(positions), 6, 2,
                                 torch.bfloat16)
    close(as_bf16, want.to(torch.bfloat16))


def test_the_kernels_refuse_what_they_do_not_handle(run):
    rope = rope_table(ModelConfig(arch="llama", vocab_size=8, dim=32, n_layers=1, n_heads=2, n_kv_heads=1, ffn_dim=8,
                                  max_context=16))
    cache = torch.zeros(1, 1, 1, 16, 16)
    qkv = torch.zeros(1, 4 * 16)
    one = torch.tensor([0])
    with pytest.raises(RuntimeError, match="expected float32 or bfloat16"):
        run.silu_mul(torch.zeros(1, 8, dtype=torch.float16))
    with pytest.raises(RuntimeError, match="outside the cache"):
        run.rope_attention(qkv, rope, cache, cache.clone(), 0, one, torch.tensor([16]), 2, 1, torch.float32)
    with pytest.raises(RuntimeError, match="qkv"):
        run.rope_attention(qkv[:, :-1], rope, cache, cache.clone(), 0, one, one, 2, 1, torch.float32)
    with pytest.raises(RuntimeError, match="residual"):
        run.add_rms_norm(torch.zeros(2, 16), torch.zeros(1, 16), torch.ones(16), EPS, torch.float32)


def tiny_llama(int4: bool) -> Transformer:
    """Norm weights about 1 (not about 0), so that logits are large enough for the tolerances to bite."""
    model = quantized_tests.tiny_llama(dim=64, ffn_dim=128, max_context=128, int4=int4)
    with torch.no_grad():
        for name, weight in model.named_parameters():
            if name.endswith("norm.weight"):
                weight.add_(1)
    return model


@pytest.mark.parametrize("int4", [False, True], ids=["fp32", "int4"])
@pytest.mark.parametrize("cache_dtype", [None, torch.bfloat16], ids=["fp32-cache", "bf16-cache"])
def test_the_fused_step_decodes_as_the_step_on_pytorch_ops(int4, cache_dtype):
    """Three sequences of different lengths in scattered slots, the cache growing past its first
    allocation, both paths fed the same tokens."""
    models = [tiny_llama(int4), tiny_llama(int4)]
    for model, fused in zip(models, (True, False)):
        model.cache_dtype = cache_dtype
        model.setup_cache(max_batch=4, max_context=128, fused=fused)
        assert model.fused_decode == fused
    gen = torch.Generator().manual_seed(3)
    prompts, slots = [torch.randint(0, 64, (n,), generator=gen) for n in (30, 3, 60)], [2, 0, 3]
    for model in models:
        for prompt, slot in zip(prompts, slots):
            model.prefill(prompt, slot)
    lengths = [len(p) for p in prompts]
    atol = 1e-4 if not int4 and cache_dtype is None else 5e-2
    for _ in range(8):
        tokens = torch.randint(0, 64, (3,), generator=gen)
        fused, reference = (model.decode(tokens, slots, lengths) for model in models)
        assert reference.abs().max() > 1
        torch.testing.assert_close(fused, reference, rtol=0, atol=atol)
        lengths = [n + 1 for n in lengths]
    assert models[0].cache.positions == 128  # grown from 64


def test_models_the_kernels_do_not_cover_decode_on_pytorch_ops():
    gpt2 = Transformer(ModelConfig(arch="gpt2", vocab_size=16, dim=32, n_layers=1, n_heads=2, n_kv_heads=2, ffn_dim=64,
                                   max_context=16)).eval()
    gpt2.setup_cache(max_batch=1)
    bf16 = tiny_llama(int4=False).to(torch.bfloat16)
    bf16.setup_cache(max_batch=1)
    assert not gpt2.fused_decode and not bf16.fused_decode
    assert bf16.decode(torch.tensor([1]), [0], [0]).shape == (1, 64)


def test_without_a_compiler_the_model_decodes_on_pytorch_ops(monkeypatch, caplog):
    def no_compiler(verbose: bool = False):
        raise RuntimeError("Error building extension\nc++: command not found")

    kernels.load.cache_clear()
    monkeypatch.setattr(kernels, "build", no_compiler)
    try:
        with caplog.at_level(logging.WARNING, logger=kernels.__name__):
            model = tiny_llama(int4=False)
            model.setup_cache(max_batch=1)
        assert not model.fused_decode
        assert "decode step runs on PyTorch ops: c++: command not found" in caplog.text
        assert model.decode(torch.tensor([1]), [0], [0]).shape == (1, 64)
    finally:
        kernels.load.cache_clear()


def test_amserve_kernels_builds_them():
    result = subprocess.run([sys.executable, "-m", "service.cli", "kernels"], capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == f"decode kernels ready ({kernels.capability()})"
