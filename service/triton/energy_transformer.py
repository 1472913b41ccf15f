"""The `energy_transformer` Triton model: its wire format and its request handling.

One request is one image, a batch item of size 1 (so Triton's `max_batch_size` counts requests).
Inputs, without the batch dimension (names and types in service/triton/spec.py):

    IMAGE         FP32  [H, W]   pixels in [0, 1]; values under the mask are ignored (ragged)
    MISSING       BOOL  [H, W]   True = unknown pixel, to be completed (ragged)
    STEPS         INT32 [1]      dynamics steps (optional; the model's default when absent)
    EXPLAIN       BOOL  [1]      answer the frames too (optional)

Outputs: IMAGE FP32 [H, W] (known pixels copied, missing ones completed) and ENERGY_TRACE FP32
[steps + 1]; with EXPLAIN, FRAMES FP32 [steps + 1, H, W] (the image after every step, the start
included), ATTENTION_ENERGY and HOPFIELD_ENERGY FP32 [steps + 1] (the trace's two parts). Shapes are checked by the model, not by Triton, so a wrong size fails with the engine's
own message naming the field (the JSON error of service/triton/wire.py), as over the embedded backend.

`ImageCompletion.execute` is everything model.py's execute does, without pb_utils: like the embedded
backend's micro-batcher it checks every request alone, then runs ONE `complete` per distinct steps
value over all checked images, in float32 on the instance's device.

Without its weights files the model still loads and answers every request 503 Unavailable, as the
embedded backend does: a missing Energy Transformer does not take the banks and the LM down with it.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from service.engines import energy_transformer
from service.engines.energy_transformer import EnergyTransformer
from service.errors import InvalidArgument, Unavailable

Outputs = dict[str, np.ndarray]


class ImageCompletion:
    """Answers a batch of requests, each given as its inputs without the batch dimension."""

    def __init__(self, model: EnergyTransformer | None, missing: str = ""):
        self.model = model
        self.missing = missing  # why there is no model

    @classmethod
    def load(cls, directory: str | Path, device: str) -> ImageCompletion:
        """The weights beside model.py; without them, an instance that answers 503 (see `missing`)."""
        directory = Path(directory)
        if not all((directory / name).is_file() for name in (energy_transformer.CONFIG_FILE,
                                                              energy_transformer.WEIGHTS_FILE)):
            return cls(None, f"energy-transformer weights not found under {directory}")
        return cls(energy_transformer.load(directory, device))

    def execute(self, requests: list[dict[str, np.ndarray | None]]) -> list[Outputs | Exception]:
        """One answer per request, in order: its outputs, or the exception it failed with (a
        ServiceError, or any other exception for a bug, which model.py logs)."""
        if self.model is None:
            return [Unavailable(self.missing) for _ in requests]
        answers: list[Outputs | Exception | None] = [None] * len(requests)
        groups: dict[tuple[int | None, bool], list[tuple[int, torch.Tensor, torch.Tensor]]] = {}
        for index, inputs in enumerate(requests):
            try:
                images, missing, steps = _request(inputs)
                explain = inputs.get("EXPLAIN") is not None and bool(inputs["EXPLAIN"].reshape(-1)[0])
                self.model.check_inputs(images, missing, steps)  # a bad request fails alone, not its batch
                groups.setdefault((steps, explain), []).append((index, images, missing))
            except Exception as exc:
                answers[index] = exc
        for (steps, explain), members in groups.items():
            try:
                images, missing = torch.cat([m[1] for m in members]), torch.cat([m[2] for m in members])
                for (index, _, _), outputs in zip(members, self._outputs(images, missing, steps, explain)):
                    answers[index] = outputs
            except Exception as exc:  # as in the embedded backend, a failed batch fails all its requests
                for index, _, _ in members:
                    answers[index] = exc
        return answers


    def _outputs(self, images: torch.Tensor, missing: torch.Tensor, steps: int | None, explain: bool) -> list[Outputs]:
        if not explain:
            completed, trace = self.model.complete(images, missing, steps=steps)
            return [{"IMAGE": image, "ENERGY_TRACE": energies}
                    for image, energies in zip(completed.cpu().numpy(), trace.cpu().numpy())]
        explained = self.model.explain(images, missing, steps=steps)
        parts = zip(explained.frames.cpu().numpy(), explained.attention_energy.cpu().numpy(),
                    explained.hopfield_energy.cpu().numpy())
        return [{"IMAGE": frames[-1], "ENERGY_TRACE": attention + hopfield, "FRAMES": frames,
                 "ATTENTION_ENERGY": attention, "HOPFIELD_ENERGY": hopfield} for frames, attention, hopfield in parts]


def _request(inputs: dict[str, np.ndarray | None]) -> tuple[torch.Tensor, torch.Tensor, int | None]:
    """One request's images (1×H×W float32), mask (1×H×W bool) and steps."""
    image, missing, steps = inputs["IMAGE"], inputs["MISSING"], inputs["STEPS"]
    if image is None:
        raise InvalidArgument("image is required", field="image")
    if missing is None:
        raise InvalidArgument("mask is required", field="mask")
    if steps is not None:
        if steps.size != 1:
            raise InvalidArgument("steps must be one integer", field="steps")
        steps = int(steps.reshape(-1)[0])
    images = torch.from_numpy(np.ascontiguousarray(image, dtype=np.float32)[None])
    return images, torch.from_numpy(np.ascontiguousarray(missing)[None]), steps


# ----- the gateway's side ---------------------------------------------------------------------


def request_arrays(image: np.ndarray, missing: np.ndarray, steps: int | None, explain: bool = False
                   ) -> dict[str, np.ndarray]:
    """The inputs of one request, batch dimension included, as the model reads them."""
    arrays = {"IMAGE": np.ascontiguousarray(image, dtype=np.float32)[None],
              "MISSING": np.ascontiguousarray(missing, dtype=np.bool_)[None]}
    if steps is not None:
        arrays["STEPS"] = np.array([[steps]], dtype=np.int32)
    if explain:
        arrays["EXPLAIN"] = np.array([[True]])
    return arrays

