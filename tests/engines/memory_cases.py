"""One engine of every memory kind and configuration the engine tests run, by case name."""

from __future__ import annotations

import torch

from service.engines.memory import make_engine, normalize_params

CASES = {
    "classical": ("classical", {}),
    "dense-poly": ("dense", {"energy": "poly", "n": 3}),
    "dense-exp": ("dense", {"energy": "exp", "beta": 0.3}),
    "modern": ("modern", {"beta": 2.0}),
    "rbf": ("rbf", {"beta": 4.0}),
    "drdam-sincos": ("drdam", {"beta": 4.0, "features": 4096, "feature_map": "sincos", "seed": 11}),
    "drdam-cos": ("drdam", {"beta": 4.0, "features": 4096, "feature_map": "cos", "seed": 12}),
    "drdam-exp": ("drdam", {"beta": 4.0, "features": 4096, "feature_map": "exp", "seed": 13}),
    "drdam-expexp": ("drdam", {"beta": 4.0, "features": 4096, "feature_map": "expexp", "seed": 14}),
}


def build(case: str, patterns: torch.Tensor):
    """The engine of `case`, holding `patterns` (their width is its dim)."""
    kind, params = CASES[case]
    dim = patterns.shape[-1]
    engine = make_engine(kind, dim, normalize_params(kind, dim, params))
    engine.add(patterns)
    return engine
