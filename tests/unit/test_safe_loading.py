"""Weights load only from safetensors or GGUF: a pickle checkpoint is refused without being unpickled,
and no code path of the service unpickles anything."""

from __future__ import annotations

import json
import pickle
import re
from pathlib import Path

import pytest

from service.engines import energy_transformer
from service.engines.lm.weights import load_model
from service.errors import ServiceError

ROOT = Path(__file__).resolve().parents[2]


class Exploit:
    """Unpickling this writes a marker file: proof that someone called pickle.load."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (Path.write_text, (self.marker, "unpickled"))


def test_pickle_checkpoint_is_refused_and_never_unpickled(tmp_path):
    marker = tmp_path / "marker"
    model_dir = tmp_path / "model"
    model_dir.mkdir()
    (model_dir / "config.json").write_text(json.dumps({
        "model_type": "gpt2", "architectures": ["GPT2LMHeadModel"], "vocab_size": 50257, "n_embd": 8,
        "n_layer": 1, "n_head": 2, "n_positions": 16}))
    (model_dir / "pytorch_model.bin").write_bytes(pickle.dumps(Exploit(marker)))
    with pytest.raises((ServiceError, FileNotFoundError, ValueError)):
        load_model(model_dir)
    assert not marker.exists()


def test_energy_transformer_needs_its_safetensors(tmp_path):
    (tmp_path / "et_config.json").write_text("{}")
    (tmp_path / "model.pt").write_bytes(b"not loaded")
    with pytest.raises(ServiceError):
        energy_transformer.load(tmp_path)


def test_no_service_code_unpickles():
    offenders = []
    for path in (ROOT / "service").rglob("*.py"):
        if "/pb/" in str(path):
            continue
        text = path.read_text()
        if re.search(r"^\s*import pickle|^\s*from pickle import|pickle\.loads?\(", text, re.M):
            offenders.append(f"{path}: pickle")
        for call in re.findall(r"torch\.load\([^)]*\)", text):
            if "weights_only=True" not in call:
                offenders.append(f"{path}: {call}")
    assert offenders == []
