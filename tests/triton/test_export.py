"""The model repository export: the checked-in repository is its output, and configs say what we meant."""

from __future__ import annotations

import filecmp
from pathlib import Path

import pytest

from service.config import Settings
from service.triton.export import export, read_batching_config, read_config
from tritonclient.grpc import model_config_pb2 as pb

CHECKED_IN = Path(__file__).resolve().parents[2] / "model_repository"


def test_checked_in_repository_is_the_default_export(tmp_path):
    """Regenerate with: export("model_repository", data_dir="data", <Settings() batching>, device_kind="cpu")."""
    settings = Settings()
    written = export(tmp_path, data_dir=settings.data_dir, max_batch_size=settings.max_batch_size,
                     max_queue_delay_us=settings.max_queue_delay_us, max_queue_size=settings.max_queue_size,
                     device_kind="cpu")
    assert written
    for path in written:
        relative = path.relative_to(tmp_path)
        assert filecmp.cmp(path, CHECKED_IN / relative, shallow=False), f"model_repository/{relative} is stale"


def test_batching_knobs_round_trip(tmp_path):
    export(tmp_path, data_dir="/srv/banks", max_batch_size=7, max_queue_delay_us=1234, max_queue_size=99,
           device_kind="gpu")
    assert read_batching_config(tmp_path) == (7, 1234, 99)
    config = read_config(tmp_path, "associative_memory")
    assert config.backend == "python"
    assert [(g.count, g.kind) for g in config.instance_group] == [(1, pb.ModelInstanceGroup.KIND_GPU)]
    assert config.parameters["data_dir"].string_value == "/srv/banks"
    inputs = {tensor.name: tensor for tensor in config.input}
    assert inputs["VECTORS"].allow_ragged_batch and inputs["VECTORS"].optional
    assert not inputs["OP"].allow_ragged_batch and not inputs["OP"].optional


def test_unknown_device_kind_is_refused(tmp_path):
    with pytest.raises(ValueError, match="device_kind"):
        export(tmp_path, data_dir="data", max_batch_size=1, max_queue_delay_us=0, max_queue_size=1,
               device_kind="tpu")
