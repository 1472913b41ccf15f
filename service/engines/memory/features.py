"""Random feature maps for the Gaussian kernel k(x, y) = exp(−β/2 ‖x − y‖²) (DrDAM).

With S (Y×D, N(0,1) entries) and b (Y, uniform on [0, 2π)), each map satisfies
E_S,b[⟨φ(x), φ(y)⟩] = k(x, y):

    sincos  φ = Y^-½ [cos(√β Sx + b), sin(√β Sx + b)]               (2Y features)
    cos     φ = √(2/Y) cos(√β Sx + b)                               (Y)
    exp     φ = Y^-½ exp(√β Sx − β‖x‖²)                              (Y, positive)
    expexp  φ = (2Y)^-½ [exp(√β Sx − β‖x‖²), exp(−√β Sx − β‖x‖²)]    (2Y, positive)

The trigonometric maps follow Rahimi & Recht (2007); the exponential ones use
E[exp(wᵀ(x + y))] = exp(½‖x + y‖²) for w ~ N(0, I). √β is folded into the stored projection
P = √β S. S and b are regenerated from a seed, never stored.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

FEATURE_MAPS = ("sincos", "cos", "exp", "expexp")

# Feature matrices are built in row chunks of about this many elements (32 MiB of float32):
# 500 patterns × 200k sincos features at once would be 800 MB.
CHUNK_ELEMENTS = 1 << 23


def feature_size(feature_map: str, features: int) -> int:
    """Length of φ(x) for `features` random directions."""
    return 2 * features if feature_map in ("sincos", "expexp") else features


def random_basis(features: int, dim: int, beta: float, seed: int, device: str | torch.device) -> tuple[Tensor, Tensor]:
    """(√β S, b) drawn from `seed` on the CPU generator, so every device gets the same basis."""
    generator = torch.Generator(device="cpu").manual_seed(seed)
    projection = torch.randn(features, dim, generator=generator).mul_(math.sqrt(beta))
    offset = torch.rand(features, generator=generator).mul_(2 * math.pi)
    return projection.to(device), offset.to(device)


def random_features(x: Tensor, projection: Tensor, offset: Tensor, beta: float, feature_map: str) -> Tensor:
    """φ(x) for each row of x (B×D → B×feature_size)."""
    features = projection.shape[0]
    angles = x @ projection.T
    if feature_map == "sincos":
        angles = angles + offset
        return torch.cat([torch.cos(angles), torch.sin(angles)], dim=-1) / math.sqrt(features)
    if feature_map == "cos":
        return torch.cos(angles + offset) * math.sqrt(2 / features)
    damping = beta * x.square().sum(dim=-1, keepdim=True)
    if feature_map == "exp":
        return torch.exp(angles - damping) / math.sqrt(features)
    if feature_map == "expexp":
        return torch.cat([torch.exp(angles - damping), torch.exp(-angles - damping)], dim=-1) / math.sqrt(2 * features)
    raise ValueError(f"unknown feature map {feature_map!r}")


def chunk_rows(feature_map: str, features: int) -> int:
    """Rows of x per chunk so that a chunk's feature matrix stays near CHUNK_ELEMENTS."""
    return max(1, CHUNK_ELEMENTS // feature_size(feature_map, features))


def feature_sum(x: Tensor, projection: Tensor, offset: Tensor, beta: float, feature_map: str) -> Tensor:
    """Σ_rows φ(x), computed chunk by chunk."""
    total = torch.zeros(feature_size(feature_map, projection.shape[0]), dtype=x.dtype, device=x.device)
    for chunk in x.split(chunk_rows(feature_map, projection.shape[0])):
        total += random_features(chunk, projection, offset, beta, feature_map).sum(dim=0)
    return total
