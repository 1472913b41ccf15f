"""Weight-only quantized layers: int8 per output row, int4 in groups along the input dimension.

Both run on PyTorch's CPU kernels (`_weight_int8pack_mm`, `_weight_int4pack_mm_for_cpu`), which
multiply by the integer weights without materialising a float copy. Their fp32-activation paths are
5-10x slower than their bf16 ones (the model's shapes, 1 and 16 rows), so activations enter the
kernels in `compute_dtype` (bf16 by default) and leave in it, as the kernel wrote them: adding them
into the model's fp32 residual stream promotes them, and the next quantized layer takes them as they
are (converting back and forth cost a tenth of a decode step).

Dequantised, an int8 weight is `q * scale[row]`; an int4 one is `q * scale + min` per group of
`group_size` inputs, q in 0..15 (GGUF Q4_1's form; Q4_0 is min = -8 * scale).

The token embedding and the output head are one vocab x dim table (tied) whose rounding shows in
every logit: one scale per row (what the int8 kernel takes) moves greedy choices at 3% of the
positions of a text on its own (loadtest/results/quantized.json). So the table is also kept in int8
groups of 32 inputs (`Int8Table`: GGUF Q8_0's form, which it holds exactly): the embedding reads its
rows from there, and the head (`RescoredHead`) multiplies by the per-row copy on the fast kernel,
then recomputes the `candidates` highest logits of each row from the grouped table.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial

import torch
from torch import Tensor, nn

aten = torch.ops.aten

INT4_GROUP_SIZE = 32  # GGUF's block size: Q4_0/Q4_1 blocks map onto int4 groups one to one
TABLE_GROUP_SIZE = 32  # GGUF Q8_0's block size
HEAD_CANDIDATES = 32  # logits of each row recomputed from the grouped table


class Int8Linear(nn.Module):
    def __init__(self, weight: Tensor, scales: Tensor, bias: Tensor | None = None,
                 compute_dtype: torch.dtype = torch.bfloat16):
        """weight: (out, in) int8; scales: (out,)."""
        super().__init__()
        self.compute_dtype = compute_dtype
        self.register_buffer("weight", weight.contiguous())  # as the kernel takes it (GPT-2's come transposed)
        self.register_buffer("scales", scales.to(compute_dtype))
        self.register_buffer("bias", bias)

    @classmethod
    def quantize(cls, weight: Tensor, bias: Tensor | None = None,
                 compute_dtype: torch.dtype = torch.bfloat16) -> Int8Linear:
        """Round to nearest with one symmetric scale per output row, on the grid of the scale as the
        kernel takes it (in `compute_dtype`): rounded from the fp32 scale after the weights, each row
        would be off by a gain of up to 2^-9 in bf16, the same for all its weights."""
        scales = (weight.abs().amax(dim=1).clamp_min(1e-12) / 127).to(compute_dtype).float()
        q = torch.round(weight / scales[:, None]).clamp_(-127, 127).to(torch.int8)
        return cls(q, scales, bias, compute_dtype)

    def dequantized(self) -> Tensor:
        return self.weight.float() * self.scales.float()[:, None]

    def forward(self, x: Tensor) -> Tensor:
        y = _int8_rows(x.reshape(-1, x.shape[-1]), self.weight, self.scales, self.bias, self.compute_dtype)
        return y.view(*x.shape[:-1], -1)

    def matmul_rows(self) -> Callable[[Tensor], Tensor]:
        """The product for (rows, in) inputs, its tensors bound (what the decode step calls)."""
        return partial(_int8_rows, weight=self.weight, scales=self.scales, bias=self.bias, dtype=self.compute_dtype)


def _int8_rows(x: Tensor, weight: Tensor, scales: Tensor, bias: Tensor | None, dtype: torch.dtype) -> Tensor:
    y = aten._weight_int8pack_mm(x.to(dtype), weight, scales)
    return y if bias is None else y + bias


class Int8Table(nn.Module):
    """A (rows, dim) table in int8 groups of `group_size` along dim, one symmetric fp32 scale per
    group: row r is `q[r] * scales[r]` (repeated over its group). Rounded from float values as GGUF
    Q8_0 does, so a Q8_0 tensor (dequantised) comes back exactly."""

    def __init__(self, q: Tensor, scales: Tensor):
        """q: (rows, dim) int8; scales: (rows, dim // group_size)."""
        super().__init__()
        self.register_buffer("weight", q)
        self.register_buffer("scales", scales.float())

    @classmethod
    def quantize(cls, table: Tensor, group_size: int = TABLE_GROUP_SIZE) -> Int8Table:
        rows, dim = table.shape
        if dim % group_size:
            raise ValueError(f"dim {dim} is not a multiple of the group size {group_size}")
        groups = table.float().view(rows, dim // group_size, group_size)
        scales = groups.abs().amax(dim=-1) / 127
        q = torch.round(groups / scales.clamp_min(1e-30)[..., None]).clamp_(-127, 127).to(torch.int8)
        return cls(q.view(rows, dim), scales)

    @property
    def group_size(self) -> int:
        return self.weight.shape[1] // self.scales.shape[1]

    def rows(self, index: Tensor, dtype: torch.dtype = torch.float32) -> Tensor:
        """Dequantised rows: index (...) -> (..., dim)."""
        q = self.weight[index].to(dtype)
        return (q.view(*q.shape[:-1], -1, self.group_size) * self.scales[index][..., None].to(dtype)).view(q.shape)

    def dequantized(self) -> Tensor:
        return self.rows(torch.arange(self.weight.shape[0], device=self.weight.device))


class Int8Embedding(nn.Module):
    """Rows of an `Int8Table` (shared with the tied head's rescoring)."""

    def __init__(self, table: Int8Table, dtype: torch.dtype = torch.float32):
        super().__init__()
        self.dtype = dtype
        self.table = table

    @property
    def weight(self) -> Tensor:
        return self.table.weight

    def forward(self, tokens: Tensor) -> Tensor:
        return self.table.rows(tokens, self.dtype)


class RescoredHead(nn.Module):
    """The output head: every logit from a per-row int8 copy on the fast kernel (`fast`), then each
    row's `candidates` highest recomputed from the grouped table (`table`, in fp32). Greedy choices,
    top logprobs and the head of the sampling distribution are then those of the grouped table
    whenever its top token is among the fast copy's `candidates` best (the two differ by about a
    logit at most on the default model); the tail keeps the fast copy's logits."""

    def __init__(self, fast: Int8Linear, table: Int8Table, bias: Tensor | None = None,
                 candidates: int = HEAD_CANDIDATES, chunk_rows: int = 256):
        super().__init__()
        self.fast, self.table = fast, table
        self.register_buffer("bias", bias)
        self.candidates = min(candidates, table.weight.shape[0])
        self.chunk_rows = chunk_rows  # rescoring gathers rows x candidates x dim floats at a time

    @classmethod
    def quantize(cls, weight: Tensor, bias: Tensor | None = None, table: Int8Table | None = None,
                 compute_dtype: torch.dtype = torch.bfloat16) -> RescoredHead:
        """From a float (vocab, dim) weight; `table` when the grouped copy exists already (tied)."""
        return cls(Int8Linear.quantize(weight, compute_dtype=compute_dtype),
                   table if table is not None else Int8Table.quantize(weight), bias)

    @property
    def weight(self) -> Tensor:
        return self.table.weight

    def forward(self, x: Tensor) -> Tensor:
        logits = self.fast(x).float()
        if self.bias is not None:
            logits = logits + self.bias
        flat, rows = logits.view(-1, logits.shape[-1]), x.reshape(-1, x.shape[-1]).float()
        for start in range(0, flat.shape[0], self.chunk_rows):
            part = flat[start:start + self.chunk_rows]
            index = part.topk(self.candidates, dim=-1, sorted=False).indices  # (n, candidates)
            exact = (self.table.rows(index) @ rows[start:start + len(part), :, None])[..., 0]
            if self.bias is not None:
                exact = exact + self.bias[index]
            part.scatter_(-1, index, exact.to(part.dtype))
        return logits


class Int4Linear(nn.Module):
    def __init__(self, q: Tensor, scales: Tensor, mins: Tensor, bias: Tensor | None = None,
                 compute_dtype: torch.dtype = torch.bfloat16):
        """q: (out, in) integers in 0..15; scales, mins: (out, in // group_size)."""
        super().__init__()
        out_features, in_features = q.shape
        self.group_size = in_features // scales.shape[1]
        self.compute_dtype = compute_dtype
        # The kernel dequantises (q - 8) * scale + zero, hence zero = min + 8 * scale.
        self.register_buffer("weight", aten._convert_weight_to_int4pack_for_cpu(q.to(torch.int32).contiguous(), 1))
        self.register_buffer("scales_and_zeros", torch.stack((scales, mins + 8 * scales), dim=-1)
                             .transpose(0, 1).to(compute_dtype).contiguous())  # (groups, out, 2)
        self.register_buffer("bias", bias)
        self.out_features = out_features

    @classmethod
    def quantize(cls, weight: Tensor, bias: Tensor | None = None, group_size: int = INT4_GROUP_SIZE,
                 compute_dtype: torch.dtype = torch.bfloat16) -> Int4Linear:
        """Round to nearest on each group's [min, max] in 16 steps, scale and min in fp16, as GGUF
        Q4_1 does: a Q4_1 tensor, dequantised (its groups hold both q = 0 and 15), comes back exactly."""
        groups = weight.float().view(weight.shape[0], -1, group_size)
        mins, maxs = groups.amin(dim=-1).half().float(), groups.amax(dim=-1)
        scales = ((maxs - mins) / 15).half().float()
        q = torch.round((groups - mins[..., None]) / scales.clamp_min(1e-12)[..., None]).clamp_(0, 15)
        return cls(q.view(weight.shape), scales, mins, bias, compute_dtype)

    def forward(self, x: Tensor) -> Tensor:
        y = _int4_rows(x.reshape(-1, x.shape[-1]), self.weight, self.group_size, self.scales_and_zeros, self.bias,
                       self.compute_dtype)
        return y.view(*x.shape[:-1], self.out_features)

    def matmul_rows(self) -> Callable[[Tensor], Tensor]:
        """The product for (rows, in) inputs, its tensors bound (what the decode step calls)."""
        return partial(_int4_rows, weight=self.weight, group_size=self.group_size,
                       scales_and_zeros=self.scales_and_zeros, bias=self.bias, dtype=self.compute_dtype)


def _int4_rows(x: Tensor, weight: Tensor, group_size: int, scales_and_zeros: Tensor, bias: Tensor | None,
               dtype: torch.dtype) -> Tensor:
    y = aten._weight_int4pack_mm_for_cpu(x.to(dtype), weight, group_size, scales_and_zeros)
    return y if bias is None else y + bias
