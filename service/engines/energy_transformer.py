"""Energy Transformer (Hoover et al., "Energy Transformer", NeurIPS 2023) for masked image completion.

Tokens x (B×N×D) are normalised by an energy layer norm g = ∇_x L(x). One energy

    E(g) = E_att(g) + E_hn(g)
    E_att = −(1/β) Σ_h Σ_C log Σ_{B≠C} exp(β K_hB·Q_hC),   K_hB = W_K^h g_B, Q_hC = W_Q^h g_C, β = 1/√Y
    E_hn  = −½ Σ_B Σ_μ ReLU(ξ_μ·g_B)²

drives the tokens by x ← x − α ∂E/∂g, with ∂E/∂g from autograd. Because g is the gradient of a
convex Lagrangian, dE/dt = −(∂E/∂g)ᵀ ∇²L (∂E/∂g) ≤ 0: the energy descends (for a small enough α).
Images are cut into patches, masked patches are replaced by a learned MASK token, the dynamics
run, and the final tokens are decoded back to pixels.
"""

import json
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from service.errors import InvalidArgument, NotFound

CONFIG_FILE = "et_config.json"
WEIGHTS_FILE = "model.safetensors"


@dataclass(frozen=True)
class ETConfig:
    image_size: int = 8
    patch_size: int = 2
    dim: int = 64
    heads: int = 4
    head_dim: int = 16
    hopfield_mult: int = 4  # Hopfield memories = hopfield_mult · dim
    steps: int = 12
    alpha: float = 0.1
    eps: float = 1e-5  # layer-norm variance floor

    def __post_init__(self) -> None:
        if self.image_size % self.patch_size:
            raise ValueError(f"image_size {self.image_size} is not a multiple of patch_size {self.patch_size}")
        if self.num_patches < 2:
            raise ValueError("energy attention needs at least two patches (it excludes B = C)")
        if min(self.dim, self.heads, self.head_dim, self.hopfield_mult) < 1 or self.steps < 0 or self.alpha <= 0:
            raise ValueError(f"invalid Energy Transformer configuration: {self}")

    @property
    def patches_per_side(self) -> int:
        return self.image_size // self.patch_size

    @property
    def num_patches(self) -> int:
        return self.patches_per_side**2

    @property
    def patch_dim(self) -> int:
        return self.patch_size**2

    @property
    def memories(self) -> int:
        return self.hopfield_mult * self.dim


# --- energies: plain functions of tensors ---------------------------------------------------


def layer_norm_lagrangian(x: Tensor, gamma: Tensor, delta: Tensor, eps: float) -> Tensor:
    """L(x) = D·γ·sqrt(var(x) + ε) + δ·x per token, summed over tokens: B×N×D → B. Convex for γ ≥ 0."""
    dim = x.shape[-1]
    var = x.var(dim=-1, unbiased=False)
    return (dim * gamma * torch.sqrt(var + eps) + x @ delta).sum(-1)


def energy_layer_norm(x: Tensor, gamma: Tensor, delta: Tensor, eps: float) -> Tensor:
    """g = ∂L/∂x = γ (x − mean(x)) / sqrt(var(x) + ε) + δ, in closed form."""
    centred = x - x.mean(dim=-1, keepdim=True)
    return gamma * centred / torch.sqrt(centred.pow(2).mean(dim=-1, keepdim=True) + eps) + delta


def attention_energy(g: Tensor, keys: Tensor, queries: Tensor) -> Tensor:
    """E_att for g (B×N×D), keys and queries (heads×Y×D): B."""
    beta = keys.shape[1] ** -0.5
    k = torch.einsum("bnd,hyd->bhny", g, keys)
    q = torch.einsum("bnd,hyd->bhny", g, queries)
    scores = beta * k @ q.transpose(-1, -2)  # [b, h, B, C] = β K_hB·Q_hC
    n = g.shape[1]
    self_pairs = torch.eye(n, dtype=torch.bool, device=g.device)
    scores = scores.masked_fill(self_pairs, float("-inf"))
    return -(1 / beta) * torch.logsumexp(scores, dim=-2).sum(dim=(-1, -2))


def hopfield_energy(g: Tensor, memories: Tensor) -> Tensor:
    """E_hn for g (B×N×D) and memories ξ (M×D): B."""
    return -0.5 * torch.relu(g @ memories.T).pow(2).sum(dim=(-1, -2))


# --- model ----------------------------------------------------------------------------------


@dataclass
class Frames:
    """An explained completion, per image and step (the start included)."""

    frames: Tensor  # B×(S+1)×H×W the completed image after each step (the last one is `complete`'s)
    attention_energy: Tensor  # B×(S+1) E_att
    hopfield_energy: Tensor  # B×(S+1) E_hn; E = E_att + E_hn is the trace


class EnergyTransformer(nn.Module):
    def __init__(self, config: ETConfig):
        super().__init__()
        self.config = config
        c = config
        self.patch_embed = nn.Linear(c.patch_dim, c.dim)
        # unit-scale positions, as large as patch content, so attention can pick out neighbours
        self.position = nn.Parameter(torch.randn(c.num_patches, c.dim))
        self.mask_token = nn.Parameter(0.02 * torch.randn(c.dim))
        self.norm_gamma = nn.Parameter(torch.ones(()))
        self.norm_delta = nn.Parameter(torch.zeros(c.dim))
        # keys and queries large enough that the untrained dynamics already carry image content
        # into masked tokens; from a near-zero start training sits long on the mean-image plateau
        self.keys = nn.Parameter(0.1 * torch.randn(c.heads, c.head_dim, c.dim))
        self.queries = nn.Parameter(0.1 * torch.randn(c.heads, c.head_dim, c.dim))
        self.memories = nn.Parameter(torch.randn(c.memories, c.dim) / c.dim)
        self.patch_decode = nn.Linear(c.dim, c.patch_dim)

    def norm(self, x: Tensor) -> Tensor:
        return energy_layer_norm(x, self.norm_gamma, self.norm_delta, self.config.eps)

    def energy(self, g: Tensor) -> Tensor:
        """Total energy of normalised tokens g (B×N×D), one value per image: B."""
        return attention_energy(g, self.keys, self.queries) + hopfield_energy(g, self.memories)

    def energy_gradient(self, g: Tensor) -> tuple[Tensor, Tensor]:
        """∂E/∂g by autograd (B×N×D) and the energy per image (B).

        torch.func.grad differentiates even under an outer torch.no_grad, and stays differentiable
        with respect to the parameters when training backpropagates through the dynamics.
        """

        def total_energy(g: Tensor) -> tuple[Tensor, Tensor]:
            per_image = self.energy(g)
            return per_image.sum(), per_image.detach()

        return torch.func.grad(total_energy, has_aux=True)(g)

    def descend(self, x: Tensor, steps: int, path: list[Tensor] | None = None) -> tuple[Tensor, Tensor]:
        """x ← x − α ∂E/∂g for `steps` steps. Returns the final tokens and the energy trace B×(steps+1);
        with `path` (a list), the tokens at the start and after every step are appended to it."""
        trace = []
        for _ in range(steps):
            if path is not None:
                path.append(x)
            grad, energies = self.energy_gradient(self.norm(x))
            trace.append(energies)
            x = x - self.config.alpha * grad
        if path is not None:
            path.append(x)
        trace.append(self.energy(self.norm(x)).detach())
        return x, torch.stack(trace, dim=1)

    def to_patches(self, images: Tensor) -> Tensor:
        """B×H×W → B×N×P, patches in row-major order, pixels row-major inside a patch."""
        p, s = self.config.patch_size, self.config.patches_per_side
        return images.reshape(-1, s, p, s, p).transpose(2, 3).reshape(-1, s * s, p * p)

    def from_patches(self, patches: Tensor) -> Tensor:
        p, s = self.config.patch_size, self.config.patches_per_side
        return patches.reshape(-1, s, s, p, p).transpose(2, 3).reshape(-1, s * p, s * p)

    def forward(self, images: Tensor, missing: Tensor, steps: int | None = None,
                path: list[Tensor] | None = None) -> tuple[Tensor, Tensor]:
        """Differentiable reconstruction: decoded pixels B×H×W (unclamped) and the energy trace.

        A patch with any missing pixel is replaced by the MASK token; missing pixels' values are ignored.
        `path` collects the tokens of every step (see `descend`).
        """
        steps = self.config.steps if steps is None else steps
        masked_patches = self.to_patches(missing).any(dim=-1, keepdim=True)
        tokens = self.patch_embed(self.to_patches(images))
        tokens = torch.where(masked_patches, self.mask_token, tokens) + self.position
        tokens, trace = self.descend(tokens, steps, path)
        return self.decode(tokens), trace

    def decode(self, tokens: Tensor) -> Tensor:
        """Pixels B×H×W (unclamped) of tokens B×N×D."""
        return self.from_patches(self.patch_decode(self.norm(tokens)))

    @torch.no_grad()
    def complete(self, images: Tensor, missing: Tensor, *, steps: int | None = None) -> tuple[Tensor, Tensor]:
        """Fill the missing pixels of images (B×H×W in [0,1]; missing True = unknown).

        Returns the completed images (known pixels copied from the input, all in [0,1]) and the
        energy per step B×(steps+1), both on the input's device.
        """
        self.check_inputs(images, missing, steps)
        device, dtype = self.position.device, self.position.dtype
        missing_here = missing.to(device)
        images_here = images.to(device, dtype).masked_fill(missing_here, 0.0)  # values under the mask are unknown
        decoded, trace = self(images_here, missing_here, steps)
        completed = torch.where(missing_here, decoded.clamp(0.0, 1.0), images_here)
        return completed.to(images.device), trace.to(images.device)

    @torch.no_grad()
    def explain(self, images: Tensor, missing: Tensor, *, steps: int | None = None) -> Frames:
        """`complete`, with the image after every step (the start included) and the energy of each split
        into its attention and Hopfield parts."""
        self.check_inputs(images, missing, steps)
        device, dtype = self.position.device, self.position.dtype
        missing_here = missing.to(device)
        images_here = images.to(device, dtype).masked_fill(missing_here, 0.0)
        path: list[Tensor] = []
        self(images_here, missing_here, steps, path)
        tokens = torch.stack(path, dim=1)  # B×(S+1)×N×D
        per_step = tokens.shape[:2]
        g = self.norm(tokens.flatten(0, 1))
        decoded = self.decode(tokens.flatten(0, 1)).reshape(*per_step, *images.shape[1:])
        frames = torch.where(missing_here[:, None], decoded.clamp(0.0, 1.0), images_here[:, None])
        return Frames(frames=frames.to(images.device),
                      attention_energy=attention_energy(g, self.keys, self.queries).reshape(per_step).to(images.device),
                      hopfield_energy=hopfield_energy(g, self.memories).reshape(per_step).to(images.device))

    def check_inputs(self, images: Tensor, missing: Tensor, steps: int | None) -> None:
        size = self.config.image_size
        if images.ndim != 3 or tuple(images.shape[1:]) != (size, size):
            raise InvalidArgument(f"image must be B×{size}×{size}, got {tuple(images.shape)}", field="image")
        if tuple(missing.shape) != tuple(images.shape):
            raise InvalidArgument(
                f"mask shape {tuple(missing.shape)} differs from image shape {tuple(images.shape)}", field="mask"
            )
        if missing.dtype != torch.bool:
            raise InvalidArgument("mask must be boolean", field="mask")
        known = images[~missing]
        if not torch.isfinite(known).all() or (known < 0).any() or (known > 1).any():
            raise InvalidArgument("known pixels must be finite and in [0, 1]", field="image")
        if steps is not None and steps < 0:
            raise InvalidArgument(f"steps must be ≥ 0, got {steps}", field="steps")


# --- loading --------------------------------------------------------------------------------


def save(model: EnergyTransformer, directory: str | Path) -> None:
    """Write et_config.json and model.safetensors into directory."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    (directory / CONFIG_FILE).write_text(json.dumps(asdict(model.config), indent=2) + "\n")
    state = {name: tensor.detach().contiguous().cpu() for name, tensor in model.state_dict().items()}
    save_file(state, directory / WEIGHTS_FILE, metadata={"format": "pt"})


def load(directory: str | Path, device: str | torch.device = "cpu") -> EnergyTransformer:
    """Read et_config.json and model.safetensors from directory onto device, in eval mode."""
    directory = Path(directory)
    for name in (CONFIG_FILE, WEIGHTS_FILE):
        if not (directory / name).is_file():
            raise NotFound(f"Energy Transformer weights incomplete: {directory / name} is missing")
    config = ETConfig(**json.loads((directory / CONFIG_FILE).read_text()))
    model = EnergyTransformer(config)
    model.load_state_dict(load_file(directory / WEIGHTS_FILE))
    if not model.norm_gamma.item() >= 0:
        raise ValueError("energy layer norm needs γ ≥ 0 for a convex Lagrangian")
    return model.to(device).eval()
