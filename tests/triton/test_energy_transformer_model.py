"""The `energy_transformer` model's request handling in-process (no Triton): one engine call per
steps value for all valid requests, per-request failures naming the field, the engine's answers."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from service.engines.energy_transformer import EnergyTransformer, ETConfig
from service.errors import InvalidArgument, Unavailable
from service.triton.energy_transformer import ImageCompletion, request_arrays


class CountingET(EnergyTransformer):
    """Records the batch size and steps of every engine call."""

    def __init__(self, config):
        super().__init__(config)
        self.calls: list[tuple[int, int | None]] = []

    def complete(self, images, missing, *, steps=None):
        self.calls.append((len(images), steps))
        return super().complete(images, missing, steps=steps)


@pytest.fixture(scope="module")
def model() -> CountingET:
    torch.manual_seed(0)
    return CountingET(ETConfig()).eval()


def request(image, missing, steps=None) -> dict:
    """What model.py hands over: the wire arrays without their batch dimension."""
    arrays = request_arrays(image, missing, steps)
    return {"IMAGE": arrays["IMAGE"][0], "MISSING": arrays["MISSING"][0],
            "STEPS": arrays["STEPS"][0] if "STEPS" in arrays else None}


def images(count: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    pixels = rng.random((count, 8, 8), dtype=np.float32)
    missing = np.zeros((count, 8, 8), dtype=bool)
    missing[:, 4:, :] = True
    return pixels, missing


def test_one_engine_call_per_steps_value_and_answers_equal_the_engine(model):
    pixels, missing = images(5)
    requests = [request(pixels[0], missing[0]), request(pixels[1], missing[1], steps=3),
                request(pixels[2], missing[2]), request(pixels[3], missing[3], steps=3),
                request(pixels[4], missing[4])]
    model.calls.clear()
    answers = ImageCompletion(model).execute(requests)
    assert sorted(model.calls, key=str) == sorted([(3, None), (2, 3)], key=str)
    for index, answer in enumerate(answers):
        steps = 3 if index in (1, 3) else None
        expected, trace = model.complete(torch.from_numpy(pixels[index][None]), torch.from_numpy(missing[index][None]),
                                         steps=steps)
        image, energies = answer["IMAGE"], answer["ENERGY_TRACE"]
        assert image.dtype == np.float32 and image.shape == (8, 8)
        np.testing.assert_allclose(image, expected[0].numpy(), atol=1e-6)
        np.testing.assert_allclose(energies, trace[0].numpy(), rtol=1e-6, atol=1e-6)
        assert len(energies) == (steps if steps is not None else model.config.steps) + 1


def test_a_bad_request_fails_alone_naming_its_field(model):
    pixels, missing = images(2)
    bad_values = pixels[1].copy()
    bad_values[0, 0] = 1.5  # a known pixel out of [0, 1]
    requests = [
        request(pixels[0], missing[0]),
        request(np.zeros((7, 7), np.float32), np.zeros((7, 7), bool)),
        request(pixels[1], np.zeros((8, 7), bool)),
        request(bad_values, missing[1]),
        request(pixels[1], missing[1], steps=-1),
        {"IMAGE": pixels[1], "MISSING": None, "STEPS": None},
        request(pixels[1], missing[1]),
    ]
    model.calls.clear()
    answers = ImageCompletion(model).execute(requests)
    assert isinstance(answers[0], dict) and isinstance(answers[6], dict)
    fields = [(type(a), a.field) for a in answers[1:6]]
    assert fields == [(InvalidArgument, "image"), (InvalidArgument, "mask"), (InvalidArgument, "image"),
                      (InvalidArgument, "steps"), (InvalidArgument, "mask")]
    assert model.calls == [(2, None)]


def test_without_weights_every_request_is_unavailable(tmp_path):
    completion = ImageCompletion.load(tmp_path, "cpu")
    pixels, missing = images(2)
    answers = completion.execute([request(pixels[0], missing[0]), request(pixels[1], missing[1])])
    assert all(isinstance(a, Unavailable) and str(tmp_path) in a.message for a in answers)
