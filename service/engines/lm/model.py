"""Decoder-only transformer: GPT-2 and Llama blocks in one model, with a slot-based KV cache.

GPT-2: learned positions, LayerNorm, GELU (tanh), fused biased projections, tied head.
Llama: RoPE (rotate-half convention, as in HF), RMSNorm, SwiGLU, grouped-query attention.

The KV cache holds up to `max_batch` independent slots of up to `max_context` positions each
(grown on demand), so that continuous batching can run one decode forward over sequences of
different lengths:
`prefill(tokens, slot)` fills a slot from position 0 (`prefill_many` several at once),
`decode(tokens, slots, positions)` appends one token to each listed slot and attends each over its
own prefix.

Speed on CPU: a decode step is a chain of skinny matrix products (1..max_batch rows against every
weight), for which PyTorch's default fp32 path (MKL sgemm) is slow; `setup_cache` therefore also
reorders the linear weights once into oneDNN's blocked layout (`Linear.pack`), 1.3-2x faster for
one sequence and 2-3x for 16 (loadtest/bench_generate.py). The rest of a step is kept to few small
ops: RoPE rotates queries and keys together, decode attention is one SDPA call over a cache view.
With int4 weights about half of one sequence's step was Python, so the decode step runs each layer
from bound methods gathered once (`_DecodeLayer`), without nn.Module's call machinery: 7.2-7.8 ms
became 6.2-6.5 ms on the default model (2 AVX-512 cores). What remained between the weight products
(norms, RoPE, the cache write and attention, SiLU) was still a dozen small ops per layer, each
costing more to call than to compute; for a Llama on CPU with fp32 activations, the step runs that
glue as three fused kernels per layer instead (kernels.py, `_FusedLayer`): one sequence's step
went from 6.4 to 4.5 ms on the default model (medians of 6 runs), 16 sequences' stayed at about
25 ms. The PyTorch path stays for everything else and is the reference the kernels are tested
against.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from types import ModuleType
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from service.engines.lm import kernels


@dataclass(frozen=True)
class ModelConfig:
    arch: str  # "gpt2" | "llama"
    vocab_size: int
    dim: int
    n_layers: int
    n_heads: int
    n_kv_heads: int
    ffn_dim: int
    norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    max_context: int = 2048
    tied_head: bool = True
    head_dim: int | None = None  # defaults to dim // n_heads

    def __post_init__(self) -> None:
        if self.arch not in ("gpt2", "llama"):
            raise ValueError(f"unknown architecture {self.arch!r}")
        if self.n_heads % self.n_kv_heads:
            raise ValueError("n_heads must be a multiple of n_kv_heads")

    @property
    def attn_head_dim(self) -> int:
        return self.head_dim or self.dim // self.n_heads


# --- building blocks -------------------------------------------------------------------------


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        if x.dtype == torch.float32:  # one op, the same arithmetic as below
            return F.rms_norm(x, self.weight.shape, self.weight, self.eps)
        # Normalise in fp32 like the reference implementation, whatever the weights' dtype.
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.to(x.dtype)


# oneDNN chooses its blocked weight layout for an expected number of rows. Measured on the default
# model: hints from 8 to 256 serve 1, 16 and 48 rows alike; 1 is 20-50% slower for every size.
PACK_ROWS_HINT = 16


def can_pack(weight: Tensor) -> bool:
    return weight.device.type == "cpu" and weight.dtype == torch.float32 and torch.backends.mkldnn.is_available()


class Linear(nn.Linear):
    """nn.Linear that multiplies by a oneDNN-prepacked copy of its weight once `pack()` has run
    (CPU, fp32). The dense weight stays the parameter (state_dict, weight tying); the packed copy
    is a cache of it, bypassed as soon as the parameter is replaced, re-pointed or modified in
    place (in-place changes to an inference-mode tensor excepted: those keep no version counter)."""

    packed: Tensor | None = None
    _packed_from: tuple[Tensor | None, int, int] = (None, 0, -1)  # the parameter, its data_ptr and version then

    def pack(self, enabled: bool = True) -> None:
        if not enabled or not can_pack(self.weight):
            self.packed = None
        elif not self.is_packed:
            self.packed = torch.ops.mkldnn._reorder_linear_weight(self.weight.detach(), PACK_ROWS_HINT)
            self._packed_from = (self.weight, self.weight.data_ptr(), _version(self.weight))

    @property
    def is_packed(self) -> bool:
        """Whether the packed copy exists and still matches the weight."""
        weight, data_ptr, version = self._packed_from
        return (self.packed is not None and weight is self.weight and data_ptr == weight.data_ptr()
                and version == _version(weight))

    def forward(self, x: Tensor) -> Tensor:
        if self.is_packed:
            return torch.ops.mkldnn._linear_pointwise(x, self.packed, self.bias, "none", [], "")
        return F.linear(x, self.weight, self.bias)

    def matmul_rows(self) -> Callable[[Tensor], Tensor]:
        """The product for (rows, in) inputs, as the quantized layers have it (the decode step's call)."""
        return self.forward


def _version(tensor: Tensor) -> int:
    return -1 if tensor.is_inference() else tensor._version


def rope_table(config: ModelConfig, device: torch.device | str | None = None) -> Tensor:
    """cos and sign-folded sin for every position, shape (max_context, 2, head_dim), in fp32:
    with them `apply_rope` needs no negation (see there)."""
    head_dim = config.attn_head_dim
    inv_freq = 1.0 / config.rope_theta ** (torch.arange(0, head_dim, 2, device=device).float() / head_dim)
    angles = torch.outer(torch.arange(config.max_context, device=device).float(), inv_freq)
    sin = angles.sin()
    return torch.stack((torch.cat((angles.cos(), angles.cos()), dim=-1), torch.cat((-sin, sin), dim=-1)), dim=1)


def apply_rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """x: (B, T, heads, head_dim); cos, sin: (B, T, 1, head_dim) from `rope_table`.
    HF's x * cos + cat(-x2, x1) * sin, written as x * cos + cat(x2, x1) * cat(-sin, sin)
    (the same products, bit for bit)."""
    return (x * cos + x.roll(x.shape[-1] // 2, dims=-1) * sin).to(x.dtype)


class KVCache:
    """Keys and values, (layers, slots, kv_heads, positions, head_dim), allocated for what has been
    used so far rather than for `max_batch` x `max_context`: `reserve` grows both the slots and the
    positions (at least doubling, up to those limits) and keeps what was written. Allocated memory
    follows the longest sequence and the most slots run at once (it is not given back)."""

    MIN_POSITIONS = 64

    def __init__(self, config: ModelConfig, max_batch: int, max_context: int,
                 device: torch.device, dtype: torch.dtype):
        self.max_batch, self.max_context = max_batch, max_context
        shape = (config.n_layers, 0, config.n_kv_heads, 0, config.attn_head_dim)
        self.k = torch.zeros(shape, device=device, dtype=dtype)
        self.v = torch.zeros(shape, device=device, dtype=dtype)

    @property
    def positions(self) -> int:
        """Positions allocated per slot (the stride of a slot's rows)."""
        return self.k.shape[3]

    def reserve(self, slots: int, positions: int) -> None:
        """Make room for slots [0, slots) and positions [0, positions) of each."""
        have_slots, have_positions = self.k.shape[1], self.k.shape[3]
        if slots <= have_slots and positions <= have_positions:
            return
        if slots > self.max_batch or positions > self.max_context:
            raise ValueError(f"the cache holds {self.max_batch} slots of {self.max_context} positions")
        if slots > have_slots:
            slots = min(max(slots, 2 * have_slots), self.max_batch)
        if positions > have_positions:
            positions = min(max(positions, 2 * have_positions, self.MIN_POSITIONS), self.max_context)
        slots, positions = max(slots, have_slots), max(positions, have_positions)
        for name in ("k", "v"):
            old = getattr(self, name)
            new = old.new_zeros((old.shape[0], slots, old.shape[2], positions, old.shape[4]))
            new[:, :have_slots, :, :have_positions] = old
            setattr(self, name, new)

    @torch.inference_mode()  # the tensors `reserve` made during a forward pass are inference tensors
    def move(self, src: int, dst: int, length: int) -> None:
        """Copy the first `length` positions of slot `src` into slot `dst` (slot compaction)."""
        self.k[:, dst, :, :length] = self.k[:, src, :, :length]
        self.v[:, dst, :, :length] = self.v[:, src, :, :length]


@dataclass
class _DecodeBatch:
    """Where one decode step reads and writes the cache; shared by every layer."""

    cache: KVCache
    rows: Tensor  # (B * kv_heads,): rows of a layer's cache seen as (slots * kv_heads * positions, head_dim)
    slots: slice | Tensor  # the batch's slots: a slice when consecutive (the cache is then read as a view)
    kv_len: int  # longest prefix to attend over
    mask: Tensor | None  # (B, 1, 1, kv_len) additive: -inf past positions[b]; None when nothing is masked


@dataclass
class _PrefillBatch:
    """Several prompts run as one sequence of their tokens (`Transformer.prefill_many`): where each
    token's keys and values go in the cache, and which tokens each may attend to."""

    cache: KVCache
    rows: Tensor  # (tokens * kv_heads,): cache rows, as _DecodeBatch.rows, token-major
    mask: Tensor  # (tokens, tokens) bool: True where a token sees another (same prompt, not later)


class Attention(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.n_heads, self.n_kv_heads = config.n_heads, config.n_kv_heads
        self.head_dim = config.attn_head_dim
        self.scale = self.head_dim ** -0.5
        bias = config.arch == "gpt2"
        self.wqkv = Linear(config.dim, (self.n_heads + 2 * self.n_kv_heads) * self.head_dim, bias=bias)
        self.wo = Linear(self.n_heads * self.head_dim, config.dim, bias=bias)

    def forward(self, x: Tensor, rope: tuple[Tensor, Tensor] | None, layer: int,
                prefill: tuple[KVCache, int] | _PrefillBatch | None = None,
                weights: list[Tensor] | None = None) -> Tensor:
        """With `weights` (a list, without cache), the causal softmax weights (B, n_heads, T, T) are
        appended to it and the output computed from them rather than by the fused kernel."""
        B, T, _ = x.shape
        q, k, v = self.heads(self.wqkv(x), x.dtype, rope)
        if isinstance(prefill, _PrefillBatch):
            for cache, new in ((prefill.cache.k[layer], k), (prefill.cache.v[layer], v)):
                cache.view(-1, self.head_dim).index_copy_(0, prefill.rows, new.reshape(-1, self.head_dim).to(cache.dtype))
            y = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                               attn_mask=prefill.mask,
                                               enable_gqa=self.n_kv_heads != self.n_heads).transpose(1, 2)
        else:
            q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
            if prefill is not None:
                cache, slot = prefill  # reserved by Transformer.prefill
                cache.k[layer, slot, :, :T] = k[0]
                cache.v[layer, slot, :, :T] = v[0]
            if weights is not None:
                y = self._weighted_attention(q, k, v, weights).transpose(1, 2)
            else:
                y = F.scaled_dot_product_attention(q, k, v, is_causal=True,
                                                   enable_gqa=self.n_kv_heads != self.n_heads).transpose(1, 2)
        return self.wo(y.reshape(B, T, -1))

    def heads(self, qkv: Tensor, dtype: torch.dtype, rope: tuple[Tensor, Tensor] | None) -> tuple[Tensor, Tensor, Tensor]:
        """wqkv's output (..., qkv) -> queries, keys, values (..., heads, head_dim), RoPE applied,
        in the activations' `dtype` (a quantized layer answers in its own): RoPE and the cache then
        see the same values whatever the weights."""
        qkv = qkv.to(dtype).view(*qkv.shape[:-1], self.n_heads + 2 * self.n_kv_heads, self.head_dim)
        qk, v = qkv.split((self.n_heads + self.n_kv_heads, self.n_kv_heads), dim=-2)
        if rope is not None:  # queries and keys rotated together
            qk = apply_rope(qk, *rope)
        q, k = qk.split((self.n_heads, self.n_kv_heads), dim=-2)
        return q, k, v

    def _weighted_attention(self, q: Tensor, k: Tensor, v: Tensor, weights: list[Tensor]) -> Tensor:
        """What scaled_dot_product_attention computes, its softmax weights kept: q (B, n_heads, T, d)."""
        groups = self.n_heads // self.n_kv_heads  # each kv head serves `groups` consecutive query heads
        k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
        T = q.shape[2]
        future = torch.ones(T, T, dtype=torch.bool, device=q.device).triu(1)
        probs = (q @ k.transpose(-1, -2) * self.scale).masked_fill(future, float("-inf")).softmax(dim=-1)
        weights.append(probs)
        return probs @ v


def decode_attention(q: Tensor, k: Tensor, v: Tensor, layer: int, batch: _DecodeBatch) -> Tensor:
    """One step's attention: q (B, n_heads, head_dim); k, v (B, n_kv_heads, head_dim) are written
    into the cache first -> (B, n_heads, 1, head_dim)."""
    head_dim = q.shape[-1]
    cache_k, cache_v = batch.cache.k[layer], batch.cache.v[layer]
    cache_k.view(-1, head_dim).index_copy_(0, batch.rows, k.reshape(-1, head_dim).to(cache_k.dtype))
    cache_v.view(-1, head_dim).index_copy_(0, batch.rows, v.reshape(-1, head_dim).to(cache_v.dtype))
    # (B, n_kv_heads, kv_len, head_dim), in the activations' dtype when the cache has its own
    keys = cache_k[batch.slots, :, :batch.kv_len].to(q.dtype)
    values = cache_v[batch.slots, :, :batch.kv_len].to(q.dtype)
    # One kernel for the step's small products; with enable_gqa the query heads sharing a kv head
    # read it once (no repetition).
    return F.scaled_dot_product_attention(q.unsqueeze(2), keys, values, attn_mask=batch.mask,
                                          enable_gqa=q.shape[1] != k.shape[1])


class GeluMLP(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.w_in = Linear(config.dim, config.ffn_dim)
        self.w_out = Linear(config.ffn_dim, config.dim)

    @property
    def projections(self) -> tuple[nn.Module, nn.Module]:
        return self.w_in, self.w_out

    @staticmethod
    def hidden(x: Tensor) -> Tensor:
        return F.gelu(x, approximate="tanh")

    def forward(self, x: Tensor) -> Tensor:
        return self.w_out(self.hidden(self.w_in(x)))


class SwiGLU(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.w_gate_up = Linear(config.dim, 2 * config.ffn_dim, bias=False)
        self.w_down = Linear(config.ffn_dim, config.dim, bias=False)

    @property
    def projections(self) -> tuple[nn.Module, nn.Module]:
        return self.w_gate_up, self.w_down

    @staticmethod
    def hidden(x: Tensor) -> Tensor:
        gate, up = x.chunk(2, dim=-1)
        return F.silu(gate) * up

    def forward(self, x: Tensor) -> Tensor:
        return self.w_down(self.hidden(self.w_gate_up(x)))


def _norm(config: ModelConfig) -> nn.Module:
    if config.arch == "gpt2":
        return nn.LayerNorm(config.dim, eps=config.norm_eps)
    return RMSNorm(config.dim, config.norm_eps)


class Block(nn.Module):
    def __init__(self, config: ModelConfig, layer: int):
        super().__init__()
        self.layer = layer
        self.attn_norm = _norm(config)
        self.attn = Attention(config)
        self.ffn_norm = _norm(config)
        self.ffn = GeluMLP(config) if config.arch == "gpt2" else SwiGLU(config)

    def forward(self, x: Tensor, rope: tuple[Tensor, Tensor] | None,
                prefill: tuple[KVCache, int] | _PrefillBatch | None = None,
                weights: list[Tensor] | None = None) -> Tensor:
        x = x + self.attn(self.attn_norm(x), rope, self.layer, prefill, weights)
        return x + self.ffn(self.ffn_norm(x))

    def decode_plan(self) -> _DecodeLayer:
        ffn_in, ffn_out = self.ffn.projections
        return _DecodeLayer(self.attn_norm.forward, self.attn.wqkv.matmul_rows(), self.attn.heads,
                            self.attn.wo.matmul_rows(), self.ffn_norm.forward, ffn_in.matmul_rows(), self.ffn.hidden,
                            ffn_out.matmul_rows())

    def fused_plan(self) -> _FusedLayer:
        ffn_in, ffn_out = self.ffn.projections
        return _FusedLayer(self.attn_norm.weight, self.attn.wqkv.matmul_rows(), _input_dtype(self.attn.wqkv),
                           self.attn.wo.matmul_rows(), _input_dtype(self.attn.wo), self.ffn_norm.weight,
                           ffn_in.matmul_rows(), _input_dtype(ffn_in), ffn_out.matmul_rows())


def _input_dtype(linear: nn.Module) -> torch.dtype:
    """The dtype a linear layer multiplies its input in (quantized layers: their compute dtype)."""
    return getattr(linear, "compute_dtype", None) or linear.weight.dtype


class _DecodeLayer(NamedTuple):
    """A block's steps as `Transformer.decode` runs them, over (B, dim) rows: bound methods and the
    linear layers' products with their tensors bound, called without nn.Module's call machinery (no
    hooks are used), in Block.forward's order."""

    attn_norm: Callable[[Tensor], Tensor]
    wqkv: Callable[[Tensor], Tensor]
    heads: Callable[..., tuple[Tensor, Tensor, Tensor]]
    wo: Callable[[Tensor], Tensor]
    ffn_norm: Callable[[Tensor], Tensor]
    ffn_in: Callable[[Tensor], Tensor]
    hidden: Callable[[Tensor], Tensor]
    ffn_out: Callable[[Tensor], Tensor]


class _FusedLayer(NamedTuple):
    """A Llama block as `Transformer._decode_fused` runs it: the norms' weights, the products (as
    in `_DecodeLayer`) and the dtype each product takes its input in, which the kernel before it
    writes directly."""

    attn_norm: Tensor
    wqkv: Callable[[Tensor], Tensor]
    wqkv_input: torch.dtype
    wo: Callable[[Tensor], Tensor]
    wo_input: torch.dtype
    ffn_norm: Tensor
    ffn_in: Callable[[Tensor], Tensor]
    ffn_in_input: torch.dtype
    ffn_out: Callable[[Tensor], Tensor]


# --- the model -------------------------------------------------------------------------------


class Transformer(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        self.tok_embeddings = nn.Embedding(config.vocab_size, config.dim)
        self.pos_embeddings = nn.Embedding(config.max_context, config.dim) if config.arch == "gpt2" else None
        self.layers = nn.ModuleList(Block(config, i) for i in range(config.n_layers))
        self.norm = _norm(config)
        self.output = Linear(config.dim, config.vocab_size, bias=False)
        if config.tied_head:
            self.output.weight = self.tok_embeddings.weight
        self.register_buffer("rope", rope_table(config) if config.arch == "llama" else None, persistent=False)
        self.cache: KVCache | None = None
        self._decode_plan: list[_DecodeLayer] = []  # made by setup_cache, once the weights are final
        self._fused_plan: list[_FusedLayer] = []  # instead, where the fused kernels run the step
        self._kernels: ModuleType | None = None
        self.cache_dtype: torch.dtype | None = None  # the KV cache's, when not the activations'

    @classmethod
    def from_state_dict(cls, config: ModelConfig, state: dict[str, Tensor],
                        modules: dict[str, nn.Module] | None = None) -> Transformer:
        """Build without random initialisation; tensors are used as given (device, dtype).
        `modules` (e.g. quantized layers) replace the submodules of those names, and `state` then
        holds the rest; a replaced head is tied to the embedding by whoever made the two."""
        with torch.device("meta"):
            model = cls(config)
        modules = modules or {}
        for name, module in modules.items():
            model.set_submodule(name, module)
            state = {**state, **{f"{name}.{key}": value for key, value in module.state_dict().items()}}
        tied = config.tied_head and "output" not in modules
        if tied:
            state = {**state, "output.weight": state["tok_embeddings.weight"]}
        model.load_state_dict(state, strict=True, assign=True)
        if tied:
            model.output.weight = model.tok_embeddings.weight
        device = state["norm.weight"].device
        model.rope = rope_table(config, device) if config.arch == "llama" else None
        return model.eval()

    @property
    def device(self) -> torch.device:
        return self.tok_embeddings.weight.device

    @property
    def dtype(self) -> torch.dtype:
        """The activations' dtype (that of the norms: quantized layers compute in it too)."""
        return self.norm.weight.dtype

    def setup_cache(self, max_batch: int, max_context: int | None = None, fused: bool = True) -> KVCache:
        """Make the KV cache (grown by prefill/decode as needed), in `cache_dtype` or else the
        activations' dtype. Also packs the linear weights for oneDNN (see `pack_weights`) and plans the
        decode step, so call it once the weights are final. With `fused`, the step runs on the fused
        kernels where they apply (`fused_decode`); else on PyTorch ops."""
        max_context = min(max_context or self.config.max_context, self.config.max_context)
        self.cache = KVCache(self.config, max_batch, max_context, self.device, self.cache_dtype or self.dtype)
        self.pack_weights()
        self._kernels = kernels.load() if fused and self._fusable() else None
        self._fused_plan = [block.fused_plan() for block in self.layers] if self._kernels else []
        self._decode_plan = [] if self._kernels else [block.decode_plan() for block in self.layers]
        return self.cache

    @property
    def fused_decode(self) -> bool:
        """Whether `decode` runs on the fused kernels (kernels.py)."""
        return self._kernels is not None

    def _fusable(self) -> bool:
        """The kernels' case: a Llama on CPU, fp32 activations, products and cache in fp32 or bf16."""
        supported = (torch.float32, torch.bfloat16)
        linears = [linear for block in self.layers for linear in (block.attn.wqkv, block.attn.wo, *block.ffn.projections)]
        return (self.config.arch == "llama" and self.device.type == "cpu" and self.dtype == torch.float32
                and self.cache.k.dtype in supported and all(_input_dtype(linear) in supported for linear in linears))

    def pack_weights(self, enabled: bool = True) -> None:
        """Give every linear layer a oneDNN-prepacked copy of its weight (CPU fp32; elsewhere a
        no-op). Costs one more copy of the linear weights in memory; `enabled=False` drops them."""
        for module in self.modules():
            if isinstance(module, Linear):
                module.pack(enabled)

    def _embed(self, tokens: Tensor, positions: Tensor) -> tuple[Tensor, tuple[Tensor, Tensor] | None]:
        """tokens, positions: (B, T) -> hidden states (B, T, dim) and the RoPE (cos, sin) to use,
        each (B, T, 1, head_dim)."""
        x = self.tok_embeddings(tokens)
        if self.pos_embeddings is not None:
            return x + self.pos_embeddings(positions), None
        table = self.rope[positions]  # (B, T, 2, head_dim)
        return x, (table[:, :, None, 0], table[:, :, None, 1])

    @torch.inference_mode()
    def forward(self, tokens: Tensor, attention: list[Tensor] | None = None) -> Tensor:
        """(B, T) tokens -> (B, T, vocab) logits, causal, without the cache. With `attention` (a list),
        each layer's softmax weights (B, n_heads, T, T) are appended to it."""
        positions = torch.arange(tokens.shape[1], device=tokens.device).expand_as(tokens)
        x, rope = self._embed(tokens, positions)
        for block in self.layers:
            x = block(x, rope, weights=attention)
        return self.output(self.norm(x)).float()

    @torch.inference_mode()
    def prefill(self, tokens: Tensor, slot: int, every_position: bool = False) -> Tensor:
        """Run a prompt (T,) into cache slot `slot` from position 0; returns the last logits (vocab,),
        or with `every_position` those of every position (T, vocab), to score the prompt."""
        if self.cache is None:
            raise RuntimeError("call setup_cache() before prefill()")
        tokens = tokens.view(1, -1)
        self.cache.reserve(slot + 1, tokens.shape[1])
        positions = torch.arange(tokens.shape[1], device=tokens.device).view(1, -1)
        x, rope = self._embed(tokens, positions)
        for block in self.layers:
            x = block(x, rope, prefill=(self.cache, slot))
        return self.output(self.norm(x[0] if every_position else x[0, -1])).float()

    @torch.inference_mode()
    def prefill_many(self, prompts: Sequence[Tensor], slots: Sequence[int]) -> Tensor:
        """`prefill` of several prompts (each (T_i,)) into their slots, in one forward pass over all
        their tokens: each token attends to its own prompt only, so every prompt's cache and logits
        are those of its own prefill (up to the order of float sums), while the matrix products run
        once with every token's rows. -> the last logits of each prompt, (len(prompts), vocab)."""
        if self.cache is None:
            raise RuntimeError("call setup_cache() before prefill_many()")
        if len(prompts) != len(slots) or not prompts:
            raise ValueError("one slot per prompt, at least one prompt")
        device, cache, kv_heads = prompts[0].device, self.cache, self.config.n_kv_heads
        lengths = [int(p.numel()) for p in prompts]
        cache.reserve(max(slots) + 1, max(lengths))
        positions = torch.cat([torch.arange(n, device=device) for n in lengths])
        prompt = torch.repeat_interleave(torch.arange(len(prompts), device=device),
                                         torch.tensor(lengths, device=device))
        slot = torch.tensor(list(slots), device=device)[prompt]
        heads = torch.arange(kv_heads, device=device)
        rows = ((slot[:, None] * kv_heads + heads) * cache.positions + positions[:, None]).view(-1)
        mask = (prompt[:, None] == prompt[None, :]) & (positions[None, :] <= positions[:, None])
        batch = _PrefillBatch(cache=cache, rows=rows, mask=mask)
        x, rope = self._embed(torch.cat([p.view(-1) for p in prompts]).view(1, -1), positions.view(1, -1))
        for block in self.layers:
            x = block(x, rope, prefill=batch)
        ends = torch.tensor(lengths, device=device).cumsum(0) - 1
        return self.output(self.norm(x[0, ends])).float()

    @torch.inference_mode()
    def decode(self, tokens: Tensor, slots: Sequence[int], positions: Sequence[int]) -> Tensor:
        """One step for B sequences at once: tokens (B,) on the model's device, placed at
        `positions[b]` of cache slot `slots[b]`; each attends over its own prefix. -> (B, vocab)."""
        if self.cache is None:
            raise RuntimeError("call setup_cache() before decode()")
        slots, positions = list(slots), list(positions)
        if self._kernels is not None:
            return self._decode_fused(tokens, slots, positions)
        device, cache = tokens.device, self.cache
        B, kv_heads, kv_len = len(slots), self.config.n_kv_heads, max(positions) + 1
        cache.reserve(max(slots) + 1, kv_len)
        pos = torch.tensor(positions, device=device)
        rows = [(slot * kv_heads + head) * cache.positions + position
                for slot, position in zip(slots, positions) for head in range(kv_heads)]
        mask = None
        if min(positions) != kv_len - 1:  # some sequences are shorter than the longest: hide what lies past them
            hidden = torch.arange(kv_len, device=device) > pos[:, None]
            mask = torch.zeros(B, 1, 1, kv_len, device=device, dtype=self.dtype).masked_fill_(
                hidden.view(B, 1, 1, kv_len), float("-inf"))
        consecutive = slots == list(range(slots[0], slots[0] + B))
        batch = _DecodeBatch(
            cache=cache,
            rows=torch.tensor(rows, device=device),
            slots=slice(slots[0], slots[0] + B) if consecutive else torch.tensor(slots, device=device),
            kv_len=kv_len,
            mask=mask,
        )
        x, rope = self._embed(tokens.view(-1, 1), pos.view(-1, 1))
        x, rope = x[:, 0], rope and (rope[0][:, 0], rope[1][:, 0])  # one position per sequence: (B, ...)
        for layer, step in enumerate(self._decode_plan):  # Block.forward, a token at a time
            q, k, v = step.heads(step.wqkv(step.attn_norm(x)), x.dtype, rope)
            x = x + step.wo(decode_attention(q, k, v, layer, batch).view(B, -1))
            x = x + step.ffn_out(step.hidden(step.ffn_in(step.ffn_norm(x))))
        return self.output(self.norm(x)).float()

    def _decode_fused(self, tokens: Tensor, slots: list[int], positions: list[int]) -> Tensor:
        """`decode` on the fused kernels: per layer, the residual add and RMSNorm, RoPE with the
        cache write and attention, and SiLU x up are one call each, between the weight products."""
        config, cache, run = self.config, self.cache, self._kernels
        cache.reserve(max(slots) + 1, max(positions) + 1)
        slot_index, position_index = torch.tensor(slots), torch.tensor(positions)
        x = self.tok_embeddings(tokens).contiguous()  # the residual stream, (B, dim) fp32, added to in place
        eps, plan = config.norm_eps, self._fused_plan
        h = run.add_rms_norm(x, None, plan[0].attn_norm, eps, plan[0].wqkv_input)
        for layer, step in enumerate(plan):
            attended = run.rope_attention(step.wqkv(h), self.rope, cache.k, cache.v, layer, slot_index, position_index,
                                          config.n_heads, config.n_kv_heads, step.wo_input)
            h = run.add_rms_norm(x, step.wo(attended), step.ffn_norm, eps, step.ffn_in_input)
            y = step.ffn_out(run.silu_mul(step.ffn_in(h)))
            if layer + 1 < len(plan):
                h = run.add_rms_norm(x, y, plan[layer + 1].attn_norm, eps, plan[layer + 1].wqkv_input)
        return self.output(run.add_rms_norm(x, y, self.norm.weight, eps, torch.float32)).float()
