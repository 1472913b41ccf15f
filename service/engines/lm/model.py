"""Decoder-only transformer: GPT-2 and Llama blocks in one model, with a slot-based KV cache.

GPT-2: learned positions, LayerNorm, GELU (tanh), fused biased projections, tied head.
Llama: RoPE (rotate-half convention, as in HF), RMSNorm, SwiGLU, grouped-query attention.

The KV cache holds `max_batch` independent slots of `max_context` positions each, so that
continuous batching can run one decode forward over sequences of different lengths:
`prefill(tokens, slot)` fills a slot from position 0, `decode(tokens, slots, positions)` appends
one token to each listed slot and attends each over its own prefix.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn


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
        # Normalise in fp32 like the reference implementation, whatever the weights' dtype.
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.to(x.dtype)


def rope_table(config: ModelConfig, device: torch.device | str | None = None) -> Tensor:
    """cos and sin for every position, shape (max_context, 2, head_dim), in fp32."""
    head_dim = config.attn_head_dim
    inv_freq = 1.0 / config.rope_theta ** (torch.arange(0, head_dim, 2, device=device).float() / head_dim)
    angles = torch.outer(torch.arange(config.max_context, device=device).float(), inv_freq)
    angles = torch.cat((angles, angles), dim=-1)
    return torch.stack((angles.cos(), angles.sin()), dim=1)


def apply_rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """x: (B, heads, T, head_dim); cos, sin: (B, 1, T, head_dim). Rotates the two halves."""
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return (x.float() * cos + rotated.float() * sin).to(x.dtype)


class KVCache:
    """Preallocated keys and values: (layers, slots, kv_heads, positions, head_dim)."""

    def __init__(self, config: ModelConfig, max_batch: int, max_context: int,
                 device: torch.device, dtype: torch.dtype):
        shape = (config.n_layers, max_batch, config.n_kv_heads, max_context, config.attn_head_dim)
        self.k = torch.zeros(shape, device=device, dtype=dtype)
        self.v = torch.zeros(shape, device=device, dtype=dtype)

    @property
    def max_batch(self) -> int:
        return self.k.shape[1]

    @property
    def max_context(self) -> int:
        return self.k.shape[3]

    def move(self, src: int, dst: int, length: int) -> None:
        """Copy the first `length` positions of slot `src` into slot `dst` (slot compaction)."""
        self.k[:, dst, :, :length] = self.k[:, src, :, :length]
        self.v[:, dst, :, :length] = self.v[:, src, :, :length]


@dataclass
class _DecodeBatch:
    """Where one decode step reads and writes the cache; shared by every layer."""

    cache: KVCache
    slots: Tensor  # (B,) on device
    positions: Tensor  # (B,) on device
    slot_range: slice | None  # set when slots are consecutive: the cache is read as a view
    kv_len: int  # longest prefix to attend over
    mask: Tensor  # (B, 1, 1, kv_len): position p visible to row b iff p <= positions[b]


class Attention(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.n_heads, self.n_kv_heads = config.n_heads, config.n_kv_heads
        self.head_dim = config.attn_head_dim
        bias = config.arch == "gpt2"
        self.wqkv = nn.Linear(config.dim, (self.n_heads + 2 * self.n_kv_heads) * self.head_dim, bias=bias)
        self.wo = nn.Linear(self.n_heads * self.head_dim, config.dim, bias=bias)

    def forward(self, x: Tensor, rope: tuple[Tensor, Tensor] | None, layer: int,
                prefill: tuple[KVCache, int] | None = None, decode: _DecodeBatch | None = None) -> Tensor:
        B, T, _ = x.shape
        q_size, kv_size = self.n_heads * self.head_dim, self.n_kv_heads * self.head_dim
        q, k, v = self.wqkv(x).split((q_size, kv_size, kv_size), dim=-1)
        q = q.view(B, T, self.n_heads, self.head_dim).transpose(1, 2)
        k = k.view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)
        v = v.view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)
        if rope is not None:
            q, k = apply_rope(q, *rope), apply_rope(k, *rope)

        if decode is not None:
            y = self._decode_attention(q, k, v, layer, decode)
        else:
            if prefill is not None:
                cache, slot = prefill
                cache.k[layer, slot, :, :T] = k[0]
                cache.v[layer, slot, :, :T] = v[0]
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True,
                                               enable_gqa=self.n_kv_heads != self.n_heads)
        return self.wo(y.transpose(1, 2).reshape(B, T, -1))

    def _decode_attention(self, q: Tensor, k: Tensor, v: Tensor, layer: int, batch: _DecodeBatch) -> Tensor:
        cache_k, cache_v = batch.cache.k[layer], batch.cache.v[layer]
        cache_k[batch.slots, :, batch.positions] = k[:, :, 0]
        cache_v[batch.slots, :, batch.positions] = v[:, :, 0]
        if batch.slot_range is not None:
            keys = cache_k[batch.slot_range, :, :batch.kv_len]
            values = cache_v[batch.slot_range, :, :batch.kv_len]
        else:
            keys = cache_k[batch.slots, :, :batch.kv_len]
            values = cache_v[batch.slots, :, :batch.kv_len]
        # One query per sequence: the query heads sharing a kv head become that head's query
        # rows, so grouped-query attention needs no key/value repetition.
        B = q.shape[0]
        group = self.n_heads // self.n_kv_heads
        q = q.reshape(B, self.n_kv_heads, group, self.head_dim)
        y = F.scaled_dot_product_attention(q, keys, values, attn_mask=batch.mask)
        return y.reshape(B, self.n_heads, 1, self.head_dim)


class GeluMLP(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.w_in = nn.Linear(config.dim, config.ffn_dim)
        self.w_out = nn.Linear(config.ffn_dim, config.dim)

    def forward(self, x: Tensor) -> Tensor:
        return self.w_out(F.gelu(self.w_in(x), approximate="tanh"))


class SwiGLU(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.w_gate_up = nn.Linear(config.dim, 2 * config.ffn_dim, bias=False)
        self.w_down = nn.Linear(config.ffn_dim, config.dim, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        gate, up = self.w_gate_up(x).chunk(2, dim=-1)
        return self.w_down(F.silu(gate) * up)


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
                prefill: tuple[KVCache, int] | None = None, decode: _DecodeBatch | None = None) -> Tensor:
        x = x + self.attn(self.attn_norm(x), rope, self.layer, prefill, decode)
        return x + self.ffn(self.ffn_norm(x))


# --- the model -------------------------------------------------------------------------------


class Transformer(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        self.tok_embeddings = nn.Embedding(config.vocab_size, config.dim)
        self.pos_embeddings = nn.Embedding(config.max_context, config.dim) if config.arch == "gpt2" else None
        self.layers = nn.ModuleList(Block(config, i) for i in range(config.n_layers))
        self.norm = _norm(config)
        self.output = nn.Linear(config.dim, config.vocab_size, bias=False)
        if config.tied_head:
            self.output.weight = self.tok_embeddings.weight
        self.register_buffer("rope", rope_table(config) if config.arch == "llama" else None, persistent=False)
        self.cache: KVCache | None = None

    @classmethod
    def from_state_dict(cls, config: ModelConfig, state: dict[str, Tensor]) -> Transformer:
        """Build without random initialisation; tensors are used as given (device, dtype)."""
        with torch.device("meta"):
            model = cls(config)
        if config.tied_head:
            state = {**state, "output.weight": state["tok_embeddings.weight"]}
        model.load_state_dict(state, strict=True, assign=True)
        if config.tied_head:
            model.output.weight = model.tok_embeddings.weight
        device = state["tok_embeddings.weight"].device
        model.rope = rope_table(config, device) if config.arch == "llama" else None
        return model.eval()

    @property
    def device(self) -> torch.device:
        return self.tok_embeddings.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.tok_embeddings.weight.dtype

    def setup_cache(self, max_batch: int, max_context: int | None = None) -> KVCache:
        """Allocate the KV cache once; prefill/decode then never reallocate it."""
        max_context = min(max_context or self.config.max_context, self.config.max_context)
        self.cache = KVCache(self.config, max_batch, max_context, self.device, self.dtype)
        return self.cache

    def _embed(self, tokens: Tensor, positions: Tensor) -> tuple[Tensor, tuple[Tensor, Tensor] | None]:
        """tokens, positions: (B, T) -> hidden states (B, T, dim) and the RoPE (cos, sin) to use."""
        x = self.tok_embeddings(tokens)
        if self.pos_embeddings is not None:
            return x + self.pos_embeddings(positions), None
        table = self.rope[positions]  # (B, T, 2, head_dim)
        return x, (table[:, None, :, 0], table[:, None, :, 1])

    @torch.inference_mode()
    def forward(self, tokens: Tensor) -> Tensor:
        """(B, T) tokens -> (B, T, vocab) logits, causal, without the cache."""
        positions = torch.arange(tokens.shape[1], device=tokens.device).expand_as(tokens)
        x, rope = self._embed(tokens, positions)
        for block in self.layers:
            x = block(x, rope)
        return self.output(self.norm(x)).float()

    @torch.inference_mode()
    def prefill(self, tokens: Tensor, slot: int) -> Tensor:
        """Run a prompt (T,) into cache slot `slot` from position 0; returns the last logits (vocab,)."""
        if self.cache is None:
            raise RuntimeError("call setup_cache() before prefill()")
        tokens = tokens.view(1, -1)
        positions = torch.arange(tokens.shape[1], device=tokens.device).view(1, -1)
        x, rope = self._embed(tokens, positions)
        for block in self.layers:
            x = block(x, rope, prefill=(self.cache, slot))
        return self.output(self.norm(x[0, -1])).float()

    @torch.inference_mode()
    def decode(self, tokens: Tensor, slots: Sequence[int], positions: Sequence[int]) -> Tensor:
        """One step for B sequences at once: tokens (B,) on the model's device, placed at
        `positions[b]` of cache slot `slots[b]`; each attends over its own prefix. -> (B, vocab)."""
        if self.cache is None:
            raise RuntimeError("call setup_cache() before decode()")
        slots, positions = list(slots), list(positions)
        device = tokens.device
        kv_len = max(positions) + 1
        consecutive = slots == list(range(slots[0], slots[0] + len(slots)))
        pos = torch.tensor(positions, device=device)
        batch = _DecodeBatch(
            cache=self.cache,
            slots=torch.tensor(slots, device=device),
            positions=pos,
            slot_range=slice(slots[0], slots[0] + len(slots)) if consecutive else None,
            kv_len=kv_len,
            mask=(torch.arange(kv_len, device=device) <= pos[:, None]).view(len(slots), 1, 1, kv_len),
        )
        x, rope = self._embed(tokens.view(-1, 1), pos.view(-1, 1))
        for block in self.layers:
            x = block(x, rope, decode=batch)
        return self.output(self.norm(x[:, 0])).float()
