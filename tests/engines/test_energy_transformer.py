"""Energy Transformer: energies against their formulas, dynamics against finite differences,
the committed weights against the training-mean baseline, and the trainer's determinism."""

import argparse
import itertools
import json
import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from service.engines.energy_transformer import (
    ETConfig,
    EnergyTransformer,
    attention_energy,
    energy_layer_norm,
    hopfield_energy,
    layer_norm_lagrangian,
    load,
    save,
)
from service.errors import InvalidArgument, NotFound
from service.training import energy_transformer as training

COMMITTED = Path(__file__).resolve().parents[2] / "model_repository" / "energy_transformer" / "1"


def tiny_model(seed: int = 0) -> EnergyTransformer:
    """A float64 model on 4×4 images (four 2×2 patches) with weights large enough to matter."""
    torch.manual_seed(seed)
    model = EnergyTransformer(ETConfig(image_size=4, patch_size=2, dim=6, heads=2, head_dim=3, hopfield_mult=2))
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.normal_(0, 0.5)
        model.norm_gamma.fill_(1.3)
    return model.double()


@pytest.fixture(scope="module")
def committed() -> EnergyTransformer:
    return load(COMMITTED)


@pytest.fixture(scope="module")
def metrics() -> dict:
    return json.loads((COMMITTED / training.METRICS_FILE).read_text())


@pytest.fixture(scope="module")
def held_out(committed: EnergyTransformer, metrics: dict) -> dict:
    """The held-out digits with the recorded split and 50% of patches masked with the recorded seed."""
    train, test = training.digits_split(metrics["split_seed"], metrics["test_fraction"])
    missing = training.random_patch_mask(
        len(test), committed.config, metrics["eval_mask_ratio"], torch.Generator().manual_seed(metrics["eval_mask_seed"])
    )
    return {"train": train, "test": test, "missing": missing}


# --- energies against their formulas ------------------------------------------------------------


def test_layer_norm_is_the_gradient_of_its_lagrangian():
    torch.manual_seed(1)
    x = torch.randn(3, 5, 7, dtype=torch.float64, requires_grad=True)
    gamma, delta = torch.tensor(1.7, dtype=torch.float64), torch.randn(7, dtype=torch.float64)
    (by_autograd,) = torch.autograd.grad(layer_norm_lagrangian(x, gamma, delta, 1e-5).sum(), x)
    torch.testing.assert_close(energy_layer_norm(x, gamma, delta, 1e-5), by_autograd, rtol=1e-12, atol=1e-12)
    by_definition = gamma * (x - x.mean(-1, keepdim=True)) / torch.sqrt(x.var(-1, unbiased=False, keepdim=True) + 1e-5)
    torch.testing.assert_close(energy_layer_norm(x, gamma, delta, 1e-5), by_definition + delta)


def test_attention_energy_matches_a_loop_over_the_formula():
    torch.manual_seed(2)
    batch, tokens, dim, heads, head_dim = 2, 5, 4, 3, 2
    g = torch.randn(batch, tokens, dim, dtype=torch.float64)
    keys, queries = torch.randn(2, heads, head_dim, dim, dtype=torch.float64)
    beta = 1 / math.sqrt(head_dim)
    expected = []
    for b in range(batch):
        total = 0.0
        for h, c in itertools.product(range(heads), range(tokens)):
            query = queries[h] @ g[b, c]
            others = [math.exp(beta * float((keys[h] @ g[b, k]) @ query)) for k in range(tokens) if k != c]
            total += -(1 / beta) * math.log(sum(others))
        expected.append(total)
    torch.testing.assert_close(attention_energy(g, keys, queries), torch.tensor(expected, dtype=torch.float64))


def test_hopfield_energy_matches_a_loop_over_the_formula():
    torch.manual_seed(3)
    g = torch.randn(2, 4, 3, dtype=torch.float64)
    memories = torch.randn(5, 3, dtype=torch.float64)
    expected = [
        -0.5 * sum(max(float(memories[m] @ g[b, t]), 0.0) ** 2 for t in range(4) for m in range(5)) for b in range(2)
    ]
    torch.testing.assert_close(hopfield_energy(g, memories), torch.tensor(expected, dtype=torch.float64))


def test_energy_gradient_matches_finite_differences():
    model = tiny_model()
    g = model.norm(torch.randn(2, model.config.num_patches, model.config.dim, dtype=torch.float64))
    gradient, energies = model.energy_gradient(g)
    torch.testing.assert_close(energies, model.energy(g))
    step = 1e-6
    finite = torch.zeros_like(g)
    for index in itertools.product(*map(range, g.shape)):
        bump = torch.zeros_like(g)
        bump[index] = step
        finite[index] = (model.energy(g + bump) - model.energy(g - bump))[index[0]] / (2 * step)
    torch.testing.assert_close(gradient, finite, rtol=1e-6, atol=1e-7)
    assert gradient.abs().max() > 1e-2  # the comparison is not between two zeros


def test_descent_steps_on_the_normalised_tokens():
    model = tiny_model()
    x = torch.randn(2, model.config.num_patches, model.config.dim, dtype=torch.float64)
    x_after, trace = model.descend(x, steps=2)
    expected = x
    for _ in range(2):
        expected = expected - model.config.alpha * model.energy_gradient(model.norm(expected))[0]
    torch.testing.assert_close(x_after, expected)
    torch.testing.assert_close(trace[:, 0], model.energy(model.norm(x)))
    torch.testing.assert_close(trace[:, -1], model.energy(model.norm(x_after)))


def test_patches_cover_the_image_in_row_major_blocks():
    model = EnergyTransformer(ETConfig())
    images = torch.arange(2 * 64, dtype=torch.float32).reshape(2, 8, 8)
    patches = model.to_patches(images)
    assert patches.shape == (2, 16, 4)
    torch.testing.assert_close(patches[1, 5], images[1, 2:4, 2:4].reshape(-1))  # patch row 1, column 1
    torch.testing.assert_close(model.from_patches(patches), images)


# --- the committed weights on the held-out digits -------------------------------------------------


def test_energy_never_increases_on_the_held_out_digits(committed: EnergyTransformer, held_out: dict):
    _, trace = committed.complete(held_out["test"], held_out["missing"])
    assert trace.shape == (len(held_out["test"]), committed.config.steps + 1)
    increases = trace.diff(dim=1)
    tolerance = 1e-6 * trace.abs().amax(dim=1, keepdim=True)  # float32 rounding of an energy of that size
    assert (increases <= tolerance).all(), f"largest increase {increases.max().item():.3g}"
    assert (trace[:, -1] < trace[:, 0]).all()  # the dynamics move


def test_energy_never_increases_in_float64(committed: EnergyTransformer, held_out: dict):
    exact = load(COMMITTED).double()
    _, trace = exact.complete(held_out["test"].double(), held_out["missing"])
    assert (trace.diff(dim=1) <= 0).all()


def test_committed_weights_beat_the_training_mean_by_30_percent(
    committed: EnergyTransformer, held_out: dict, metrics: dict
):
    test, missing = held_out["test"], held_out["missing"]
    assert missing.float().mean().item() == pytest.approx(0.5)
    completed, _ = committed.complete(test, missing)
    model_mse = ((completed - test) ** 2)[missing].mean().item()
    mean_image = held_out["train"].mean(dim=0)
    mean_mse = ((mean_image - test) ** 2)[missing].mean().item()
    assert model_mse <= 0.7 * mean_mse, f"model {model_mse:.4f} vs training mean {mean_mse:.4f}"
    assert metrics["masked_pixel_mse"] == pytest.approx(model_mse, rel=1e-4)
    assert metrics["mean_image_mse"] == pytest.approx(mean_mse, rel=1e-6)
    assert metrics["test_images"] == len(test)


def test_committed_files_are_small_and_consistent(committed: EnergyTransformer):
    assert (COMMITTED / "model.safetensors").stat().st_size < 5 * 2**20
    config = json.loads((COMMITTED / "et_config.json").read_text())
    assert ETConfig(**config) == committed.config
    assert set(load_file(COMMITTED / "model.safetensors")) == set(committed.state_dict())


# --- serving behaviour ----------------------------------------------------------------------------


def test_complete_keeps_known_pixels_and_stays_in_range(committed: EnergyTransformer, held_out: dict):
    images, missing = held_out["test"][:16], held_out["missing"][:16]
    completed, trace = committed.complete(images, missing, steps=5)
    assert completed.shape == images.shape and completed.dtype == images.dtype
    assert trace.shape == (16, 6)
    assert torch.equal(completed[~missing], images[~missing])
    assert completed.min() >= 0 and completed.max() <= 1
    assert not torch.equal(completed[missing], images[missing])


def test_explained_frames_end_at_the_completion_and_split_the_traced_energy(committed: EnergyTransformer,
                                                                             held_out: dict):
    images, missing = held_out["test"][:4], held_out["missing"][:4]
    completed, trace = committed.complete(images, missing, steps=6)
    explained = committed.explain(images, missing, steps=6)
    assert explained.frames.shape == (4, 7, *images.shape[1:])
    torch.testing.assert_close(explained.frames[:, -1], completed)
    torch.testing.assert_close(explained.attention_energy + explained.hopfield_energy, trace)
    # The start is the input with the decoded MASK tokens under the mask; known pixels never move.
    assert torch.equal(explained.frames[:, :, ~missing[0]][0], images[0][~missing[0]].expand(7, -1))
    assert not torch.equal(explained.frames[:, 0], explained.frames[:, -1])
    # Step 0's parts from the starting tokens built here: MASK token on every patch with a missing pixel.
    masked_patches = committed.to_patches(missing).any(dim=-1, keepdim=True)
    start = torch.where(masked_patches, committed.mask_token,
                        committed.patch_embed(committed.to_patches(images.masked_fill(missing, 0.0)))) + committed.position
    with torch.no_grad():
        g = committed.norm(start)
        torch.testing.assert_close(explained.attention_energy[:, 0], attention_energy(g, committed.keys, committed.queries))
        torch.testing.assert_close(explained.hopfield_energy[:, 0], hopfield_energy(g, committed.memories))


def test_missing_pixel_values_are_ignored(committed: EnergyTransformer, held_out: dict):
    images, missing = held_out["test"][:8], held_out["missing"][:8]
    scrambled = torch.where(missing, torch.full_like(images, float("nan")), images)
    torch.testing.assert_close(committed.complete(scrambled, missing)[0], committed.complete(images, missing)[0])


def test_one_missing_pixel_masks_its_whole_patch(committed: EnergyTransformer, held_out: dict):
    image = held_out["test"][:1]
    one_pixel = torch.zeros_like(image, dtype=torch.bool)
    one_pixel[0, 3, 4] = True
    whole_patch = torch.zeros_like(one_pixel)
    whole_patch[0, 2:4, 4:6] = True
    from_one, trace_one = committed.complete(image, one_pixel)
    from_patch, trace_patch = committed.complete(image, whole_patch)
    assert from_one[0, 3, 4] == from_patch[0, 3, 4]
    torch.testing.assert_close(trace_one, trace_patch)
    assert torch.equal(from_one[~one_pixel], image[~one_pixel])


def test_steps_override_the_configured_count(committed: EnergyTransformer, held_out: dict):
    images, missing = held_out["test"][:4], held_out["missing"][:4]
    _, full = committed.complete(images, missing)
    _, none = committed.complete(images, missing, steps=0)
    _, three = committed.complete(images, missing, steps=3)
    assert none.shape == (4, 1) and three.shape == (4, 4)
    torch.testing.assert_close(none[:, 0], full[:, 0])
    torch.testing.assert_close(three, full[:, :4])


@pytest.mark.parametrize(
    ("images", "missing", "steps", "field"),
    [
        (torch.zeros(8, 8), torch.zeros(8, 8, dtype=torch.bool), None, "image"),
        (torch.zeros(1, 6, 6), torch.zeros(1, 6, 6, dtype=torch.bool), None, "image"),
        (torch.zeros(1, 8, 8), torch.zeros(2, 8, 8, dtype=torch.bool), None, "mask"),
        (torch.zeros(1, 8, 8), torch.zeros(1, 8, 8), None, "mask"),
        (torch.full((1, 8, 8), 1.5), torch.zeros(1, 8, 8, dtype=torch.bool), None, "image"),
        (torch.zeros(1, 8, 8), torch.zeros(1, 8, 8, dtype=torch.bool), -1, "steps"),
    ],
)
def test_invalid_inputs_name_the_field(committed, images, missing, steps, field):
    with pytest.raises(InvalidArgument) as raised:
        committed.complete(images, missing, steps=steps)
    assert raised.value.field == field


def test_save_and_load_round_trip(tmp_path: Path):
    model = tiny_model().float()
    save(model, tmp_path)
    loaded = load(tmp_path)
    images = torch.rand(3, 4, 4)
    missing = torch.rand(3, 4, 4) < 0.4
    torch.testing.assert_close(loaded.complete(images, missing), model.complete(images, missing), rtol=0, atol=0)


def test_load_reports_missing_files(tmp_path: Path):
    with pytest.raises(NotFound):
        load(tmp_path)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_matches_cpu(held_out: dict):
    images, missing = held_out["test"][:32], held_out["missing"][:32]
    on_cpu = load(COMMITTED).complete(images, missing)
    on_gpu = load(COMMITTED, device="cuda").complete(images, missing)
    assert on_gpu[0].device == images.device
    torch.testing.assert_close(on_gpu[0], on_cpu[0], rtol=1e-4, atol=1e-4)


# --- training -------------------------------------------------------------------------------------


def train_tiny(out: Path, seed: int) -> dict[str, torch.Tensor]:
    parser = argparse.ArgumentParser()
    training.add_arguments(parser)
    args = parser.parse_args(
        ["--out", str(out), "--epochs", "1", "--seed", str(seed), "--train-limit", "48", "--batch-size", "16",
         "--dim", "8", "--heads", "2", "--head-dim", "4", "--hopfield-mult", "1", "--steps", "3", "--device", "cpu"]
    )  # fmt: skip
    assert training.run(args) == 0
    return load_file(out / "model.safetensors")


def test_training_is_deterministic_with_a_seed(tmp_path: Path):
    first = train_tiny(tmp_path / "a", seed=5)
    second = train_tiny(tmp_path / "b", seed=5)
    other = train_tiny(tmp_path / "c", seed=6)
    assert first.keys() == second.keys()
    assert all(torch.equal(first[name], second[name]) for name in first)
    assert not torch.equal(first["keys"], other["keys"])
    torch.manual_seed(5)  # the initial weights of the first run
    initial = EnergyTransformer(ETConfig(**json.loads((tmp_path / "a" / "et_config.json").read_text())))
    assert all(not torch.equal(first[name], initial.state_dict()[name]) for name in ("keys", "memories", "position"))
    metrics = json.loads((tmp_path / "a" / training.METRICS_FILE).read_text())
    assert metrics["train_images"] == 48 and metrics["masked_pixel_mse"] > 0
