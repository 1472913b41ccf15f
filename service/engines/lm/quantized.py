"""Weight-only quantized layers: int8 per output row, int4 in groups along the input dimension.

Both run on PyTorch's CPU kernels (`_weight_int8pack_mm`, `_weight_int4pack_mm_for_cpu`), which
multiply by the integer weights without materialising a float copy. Their fp32-activation paths are
~10x slower than their bf16 ones on this CPU (loadtest/bench_quantized.py), so activations enter the
kernels in `compute_dtype` (bf16 by default) and leave in the caller's dtype.

Dequantised, an int8 weight is `q * scale[row]`; an int4 one is `q * scale + min` per group of
`group_size` inputs, q in 0..15 (GGUF Q4_1's form; Q4_0 is min = -8 * scale).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

aten = torch.ops.aten

INT4_GROUP_SIZE = 32  # GGUF's block size: Q4_0/Q4_1 blocks map onto int4 groups one to one


class Int8Linear(nn.Module):
    def __init__(self, weight: Tensor, scales: Tensor, bias: Tensor | None = None,
                 compute_dtype: torch.dtype = torch.bfloat16):
        """weight: (out, in) int8; scales: (out,)."""
        super().__init__()
        self.compute_dtype = compute_dtype
        self.register_buffer("weight", weight)
        self.register_buffer("scales", scales.to(compute_dtype))
        self.register_buffer("bias", bias)

    @classmethod
    def quantize(cls, weight: Tensor, bias: Tensor | None = None,
                 compute_dtype: torch.dtype = torch.bfloat16) -> Int8Linear:
        """Round to nearest with one symmetric scale per output row."""
        scales = weight.abs().amax(dim=1).clamp_min(1e-12) / 127
        q = torch.round(weight / scales[:, None]).clamp_(-127, 127).to(torch.int8)
        return cls(q, scales, bias, compute_dtype)

    def dequantized(self) -> Tensor:
        return self.weight.float() * self.scales.float()[:, None]

    def forward(self, x: Tensor) -> Tensor:
        y = aten._weight_int8pack_mm(x.reshape(-1, x.shape[-1]).to(self.compute_dtype), self.weight, self.scales)
        y = y.view(*x.shape[:-1], -1).to(x.dtype)
        return y if self.bias is None else y + self.bias


class Int8Embedding(nn.Module):
    """Rows of an int8 table times their scale; shares its tensors with the tied `Int8Linear` head."""

    def __init__(self, table: Int8Linear, dtype: torch.dtype = torch.float32):
        super().__init__()
        self.dtype = dtype
        self.weight, self.scales = table.weight, table.scales

    def forward(self, tokens: Tensor) -> Tensor:
        return self.weight[tokens].to(self.dtype) * self.scales[tokens, None].to(self.dtype)


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
        """Round to nearest on each group's [min, max] in 16 steps (as GGUF Q4_1 does)."""
        groups = weight.view(weight.shape[0], -1, group_size)
        mins, maxs = groups.amin(dim=-1), groups.amax(dim=-1)
        scales = ((maxs - mins) / 15).clamp_min(1e-12)
        q = torch.round((groups - mins[..., None]) / scales[..., None]).clamp_(0, 15).view(weight.shape)
        return cls(q, scales, mins, bias, compute_dtype)

    def forward(self, x: Tensor) -> Tensor:
        y = aten._weight_int4pack_mm_for_cpu(x.reshape(-1, x.shape[-1]).to(self.compute_dtype), self.weight,
                                             self.group_size, self.scales_and_zeros)
        y = y.view(*x.shape[:-1], self.out_features).to(x.dtype)
        return y if self.bias is None else y + self.bias
