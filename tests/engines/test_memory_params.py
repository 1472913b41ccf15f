"""Parameter normalisation and value checks name the offending field."""

from __future__ import annotations

import pytest
import torch

from service.engines.memory import KINDS, make_engine, normalize_params
from service.errors import InvalidArgument


def test_every_kind_is_registered() -> None:
    assert set(KINDS) == {"classical", "dense", "modern", "rbf", "drdam"}
    for kind, engine in KINDS.items():
        assert engine.kind == kind


@pytest.mark.parametrize(
    ("kind", "params", "expected"),
    [
        ("classical", {}, {}),
        ("dense", {}, {"energy": "poly", "n": 3}),
        ("dense", {"energy": "exp"}, {"energy": "exp", "beta": 1.0}),
        ("dense", {"n": 5.0}, {"energy": "poly", "n": 5}),
        ("modern", {}, {"beta": 1.0}),
        ("modern", {"beta": 8}, {"beta": 8.0}),
        ("rbf", {}, {"beta": 1.0}),
        (
            "drdam",
            {"seed": 7},
            {"beta": 1.0, "features": 4096, "feature_map": "sincos", "seed": 7, "keep_patterns": True},
        ),
    ],
)
def test_defaults_are_filled_in(kind: str, params: dict, expected: dict) -> None:
    normalized = normalize_params(kind, 8, params)
    assert normalized == expected
    assert normalize_params(kind, 8, normalized) == normalized  # idempotent: safe to store and reload
    assert make_engine(kind, 8, normalized).params == normalized


def test_drdam_draws_and_returns_a_seed() -> None:
    first, second = normalize_params("drdam", 8, {}), normalize_params("drdam", 8, {})
    assert isinstance(first["seed"], int) and 0 <= first["seed"] < 2**63
    assert first["seed"] != second["seed"]


@pytest.mark.parametrize(
    ("kind", "dim", "params", "field"),
    [
        ("hopfield", 8, {}, "kind"),
        ("modern", 0, {}, "dim"),
        ("modern", True, {}, "dim"),
        ("modern", 8, [], "params"),
        ("classical", 8, {"beta": 1.0}, "params.beta"),
        ("classical", 20_000, {}, "dim"),
        ("dense", 8, {"energy": "cubic"}, "params.energy"),
        ("dense", 8, {"n": 1}, "params.n"),
        ("dense", 8, {"n": 2.5}, "params.n"),
        ("dense", 8, {"n": True}, "params.n"),
        ("dense", 8, {"beta": 2.0}, "params.beta"),
        ("dense", 8, {"energy": "exp", "n": 3}, "params.n"),
        ("dense", 8, {"energy": "exp", "beta": 0}, "params.beta"),
        ("modern", 8, {"beta": -1.0}, "params.beta"),
        ("modern", 8, {"beta": float("inf")}, "params.beta"),
        ("modern", 8, {"beta": "1"}, "params.beta"),
        ("modern", 8, {"temperature": 1.0}, "params.temperature"),
        ("rbf", 8, {"beta": None}, "params.beta"),
        ("drdam", 8, {"features": 0}, "params.features"),
        ("drdam", 8, {"features": 1_000_001}, "params.features"),
        ("drdam", 1024, {"features": 1_000_000}, "params.features"),
        ("drdam", 8, {"feature_map": "relu"}, "params.feature_map"),
        ("drdam", 8, {"seed": -1}, "params.seed"),
        ("drdam", 8, {"seed": 1.5}, "params.seed"),
        ("drdam", 8, {"keep_patterns": "yes"}, "params.keep_patterns"),
    ],
)
def test_invalid_params_name_the_field(kind: str, dim: int, params: dict, field: str) -> None:
    with pytest.raises(InvalidArgument) as error:
        normalize_params(kind, dim, params)
    assert error.value.field == field
    assert error.value.message


@pytest.mark.parametrize(
    ("kind", "values", "valid"),
    [
        ("classical", [[1.0, -1.0, 1.0, -1.0]], True),
        ("classical", [[1.0, 0.0, 1.0, -1.0]], False),
        ("dense", [[1.0, 0.5, 1.0, -1.0]], False),
        ("modern", [[0.3, -2.0, 0.0, 7.0]], True),
        ("rbf", [[0.3, -2.0, 0.0, 7.0]], True),
    ],
)
def test_check_values_suits_the_kind(kind: str, values: list, valid: bool) -> None:
    engine = make_engine(kind, 4, normalize_params(kind, 4, {}))
    x = torch.tensor(values)
    if valid:
        engine.check_values(x, "patterns")
        return
    with pytest.raises(InvalidArgument) as error:
        engine.check_values(x, "patterns")
    assert error.value.field == "patterns"
