"""The model repository export: the checked-in repository is its output, and configs say what we meant."""

from __future__ import annotations

import filecmp
from pathlib import Path

import pytest
from tritonclient.grpc import model_config_pb2 as pb

from service.config import Settings
from service.triton.export import ET_WEIGHTS, LLM_FILES, export, export_llm, llm_exported, read_config

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
    config = read_config(tmp_path, "associative_memory")
    assert (config.max_batch_size, config.dynamic_batching.max_queue_delay_microseconds,
            config.dynamic_batching.default_queue_policy.max_queue_size) == (7, 1234, 99)
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


def test_image_and_text_models(tmp_path):
    export(tmp_path, data_dir="data", max_batch_size=8, max_queue_delay_us=100, max_queue_size=16, device_kind="cpu",
           served_model_name="my-lm", max_running_sequences=3, max_waiting_sequences=5, max_context=512)
    image = read_config(tmp_path, "energy_transformer")
    assert (image.max_batch_size, image.dynamic_batching.max_queue_delay_microseconds) == (8, 100)
    assert not image.model_transaction_policy.decoupled
    inputs = {tensor.name: tensor for tensor in image.input}
    assert inputs["IMAGE"].allow_ragged_batch and inputs["MISSING"].allow_ragged_batch
    assert inputs["STEPS"].optional and not inputs["IMAGE"].optional
    assert inputs["EXPLAIN"].optional
    assert [tensor.name for tensor in image.output] == ["IMAGE", "ENERGY_TRACE", "FRAMES", "ATTENTION_ENERGY",
                                                        "HOPFIELD_ENERGY"]
    # The shipped weights are copied along, and their image size is published for the gateway.
    assert all((tmp_path / "energy_transformer" / "1" / name).is_file() for name in ET_WEIGHTS)
    assert image.parameters["image_size"].string_value == "8"
    text = read_config(tmp_path, "llm")
    assert text.model_transaction_policy.decoupled
    assert [(g.count, g.kind) for g in text.instance_group] == [(1, pb.ModelInstanceGroup.KIND_CPU)]
    assert {key: value.string_value for key, value in text.parameters.items()} == {
        "served_model_name": "my-lm", "max_running_sequences": "3", "max_waiting_sequences": "5",
        "max_context": "512", "dtype": "auto", "kv_dtype": "auto"}


def fake_conversion(monkeypatch) -> list[Path]:
    """Replaces the GGUF conversion (seconds for the real model) by one writing placeholder files."""
    from service.engines.lm import weights

    calls = []

    def convert(gguf, out_dir, progress=True):
        calls.append(Path(gguf))
        for name in LLM_FILES:
            (Path(out_dir) / name).write_text(f"{name} from {Path(gguf).name}")
        return Path(out_dir)

    monkeypatch.setattr(weights, "convert_gguf", convert)
    monkeypatch.setattr(weights, "default_gguf_path", lambda: Path("/models/default.gguf"))
    return calls


def test_export_llm_converts_once_into_the_version_folder(tmp_path, monkeypatch):
    calls = fake_conversion(monkeypatch)
    assert not llm_exported(tmp_path)
    version = export_llm(tmp_path, progress=False)
    assert version == tmp_path / "llm" / "1" and llm_exported(tmp_path)
    assert sorted(p.name for p in version.iterdir()) == sorted(LLM_FILES)  # no scratch folder left behind
    assert (version / "config.json").read_text() == "config.json from default.gguf"
    export_llm(tmp_path, progress=False)
    assert calls == [Path("/models/default.gguf")]
    export_llm(tmp_path, Path("/models/other.gguf"), progress=False, force=True)
    assert (version / "config.json").read_text() == "config.json from other.gguf"


def test_amserve_export_writes_the_repository_and_the_llm_unless_skipped(tmp_path, monkeypatch, capsys):
    from service.cli import main

    calls = fake_conversion(monkeypatch)
    assert main(["export", "--model-repository", str(tmp_path / "a"), "--device-kind", "cpu", "--skip-llm"]) == 0
    assert (tmp_path / "a" / "llm" / "config.pbtxt").is_file() and not llm_exported(tmp_path / "a")
    assert main(["export", "--model-repository", str(tmp_path / "b"), "--device-kind", "cpu"]) == 0
    assert llm_exported(tmp_path / "b") and len(calls) == 1
    assert main(["export", "--model-repository", str(tmp_path / "b"), "--device-kind", "cpu"]) == 0
    assert len(calls) == 1 and "already converted" in capsys.readouterr().out


def test_no_image_size_is_published_without_weights(tmp_path, monkeypatch):
    from service.triton import export as module

    monkeypatch.setattr(module, "SHIPPED_REPOSITORY", tmp_path / "nothing-shipped")
    export(tmp_path, data_dir="data", max_batch_size=1, max_queue_delay_us=0, max_queue_size=1, device_kind="cpu")
    assert "image_size" not in read_config(tmp_path, "energy_transformer").parameters
