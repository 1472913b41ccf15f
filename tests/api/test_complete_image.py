"""POST /v1/complete and gRPC CompleteImage: the served Energy Transformer answers exactly like the
engine called in-process, validates its inputs, and shows up in /v1/models."""

from __future__ import annotations

import grpc
import numpy as np
import pytest
import torch
from sklearn.datasets import load_digits

from service.api.pb import amserve_pb2 as pb
from service.engines import energy_transformer
from tests.harness import ROOT

WEIGHTS = ROOT / "model_repository" / "energy_transformer" / "1"


@pytest.fixture(scope="module")
def digit_and_mask():
    image = (load_digits().images[-1] / 16.0).astype(np.float32)
    mask = np.zeros((8, 8), bool)
    mask[4:, :] = True  # bottom half missing
    return image, mask


def test_rest_completion_equals_the_engine(client, digit_and_mask):
    image, mask = digit_and_mask
    r = client.post("/v1/complete", json={"model": "energy-transformer", "image": image.tolist(), "mask": mask.tolist()})
    assert r.status_code == 200, r.text
    body = r.json()
    completed = np.array(body["image"], dtype=np.float32)
    model = energy_transformer.load(WEIGHTS)
    expected, trace = model.complete(torch.from_numpy(image[None]), torch.from_numpy(mask[None]))
    np.testing.assert_allclose(completed, expected[0].numpy(), atol=1e-5)
    np.testing.assert_allclose(body["energy_trace"], trace[0].tolist(), rtol=1e-4, atol=1e-4)
    np.testing.assert_array_equal(completed[~mask], image[~mask])
    assert len(body["energy_trace"]) == model.config.steps + 1
    assert all(b <= a + 1e-4 for a, b in zip(body["energy_trace"], body["energy_trace"][1:]))


def test_explained_frames_end_at_the_plain_answer(client, digit_and_mask):
    image, mask = digit_and_mask
    body = {"image": image.tolist(), "mask": mask.tolist(), "steps": 6}
    plain = client.post("/v1/complete", json=body).json()
    r = client.post("/v1/complete", json={**body, "explain": True})
    assert r.status_code == 200, r.text
    explained = r.json()
    frames = explained["frames"]
    assert len(frames) == 7
    np.testing.assert_allclose(frames[-1]["image"], plain["image"], atol=1e-6)
    np.testing.assert_allclose(explained["image"], plain["image"], atol=1e-6)
    np.testing.assert_allclose([f["attention_energy"] + f["hopfield_energy"] for f in frames], plain["energy_trace"],
                               rtol=1e-5, atol=1e-4)
    for frame in frames:  # known pixels stay, the missing ones move
        np.testing.assert_array_equal(np.array(frame["image"], dtype=np.float32)[~mask], image[~mask])
    assert frames[0]["image"] != frames[-1]["image"]
    assert "frames" not in plain or plain["frames"] is None


def test_grpc_completion_equals_rest(client, stub, digit_and_mask):
    image, mask = digit_and_mask
    rest = client.post("/v1/complete", json={"image": image.tolist(), "mask": mask.tolist(), "steps": 4}).json()
    reply = stub.CompleteImage(pb.CompleteImageRequest(
        image=[pb.Vector(values=row) for row in image.tolist()], mask=[pb.Mask(values=row) for row in mask.tolist()],
        steps=4))
    np.testing.assert_allclose([list(row.values) for row in reply.image], rest["image"], atol=1e-6)
    np.testing.assert_allclose(list(reply.energy_trace), rest["energy_trace"], rtol=1e-6)
    assert len(reply.energy_trace) == 5


@pytest.mark.parametrize("change, field", [
    (lambda b: b.update(image=[[0.5] * 7] * 7, mask=[[False] * 7] * 7), "image"),
    (lambda b: b.update(mask=[[False] * 8] * 7), "mask"),
    (lambda b: b["image"][0].__setitem__(0, 1.5), "image[0][0]"),  # the pixel itself
    (lambda b: b["image"][0].__setitem__(0, -0.1), "image[0][0]"),  # the pixel itself
    (lambda b: b.update(model="other"), "model"),
    (lambda b: b.update(steps=-1), "steps"),
])
def test_bad_images_are_422_naming_the_field(client, change, field):
    body = {"model": "energy-transformer", "image": [[0.5] * 8 for _ in range(8)], "mask": [[False] * 8 for _ in range(8)]}
    change(body)
    r = client.post("/v1/complete", json=body)
    assert r.status_code == 422, r.text
    assert r.json()["error"]["field"] == field


def test_grpc_bad_image_is_invalid_argument(stub):
    with pytest.raises(grpc.RpcError) as info:
        stub.CompleteImage(pb.CompleteImageRequest(image=[pb.Vector(values=[0.5] * 3)] * 3,
                                                   mask=[pb.Mask(values=[False] * 3)] * 3))
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert info.value.details().startswith("image")


def test_models_lists_memory_kinds_and_the_energy_transformer(client, stub):
    cards = {m["id"]: m for m in client.get("/v1/models").json()["data"]}
    assert cards["energy-transformer"]["ready"] is True
    assert set(cards["associative-memory"]["details"]["kinds"]) == {"classical", "dense", "modern", "rbf", "drdam"}
    assert {m.id for m in stub.ListModels(pb.ListModelsRequest()).models} >= {"energy-transformer", "associative-memory"}
