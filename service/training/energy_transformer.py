"""Train the Energy Transformer on masked-patch reconstruction of the scikit-learn 8×8 digits.

`amserve train energy-transformer` writes model.safetensors, et_config.json and metrics.json
(held-out masked-pixel MSE of the model against filling with the training-mean image).
"""

import argparse
import json
import math
import time
from dataclasses import asdict
from pathlib import Path

import torch
from sklearn.datasets import load_digits
from torch import Tensor
from tqdm import tqdm

from service.engines.energy_transformer import ETConfig, EnergyTransformer, save

DEFAULT_OUT = "model_repository/energy_transformer/1"
METRICS_FILE = "metrics.json"


def digits_split(seed: int, test_fraction: float) -> tuple[Tensor, Tensor]:
    """The 1797 digits as float32 N×8×8 in [0,1], split into (train, test) by a seeded permutation."""
    images = torch.from_numpy(load_digits().images).float() / 16.0
    order = torch.randperm(len(images), generator=torch.Generator().manual_seed(seed))
    n_test = round(test_fraction * len(images))
    return images[order[n_test:]], images[order[:n_test]]


def random_patch_mask(count: int, config: ETConfig, ratio: float, generator: torch.Generator) -> Tensor:
    """count×H×W bool, True on the pixels of round(ratio·N) patches drawn uniformly per image."""
    n, s, p = config.num_patches, config.patches_per_side, config.patch_size
    ranks = torch.rand(count, n, generator=generator).argsort(dim=1).argsort(dim=1)
    masked_patches = (ranks < round(ratio * n)).reshape(count, s, 1, s, 1)
    return masked_patches.expand(count, s, p, s, p).reshape(count, s * p, s * p)


def masked_pixel_mse(predicted: Tensor, target: Tensor, missing: Tensor) -> float:
    return ((predicted - target)[missing] ** 2).mean().item()


def evaluate(model: EnergyTransformer, train: Tensor, test: Tensor, mask_ratio: float, mask_seed: int) -> dict:
    """Held-out figures at a fixed, seeded masking: model vs the training-mean image."""
    missing = random_patch_mask(len(test), model.config, mask_ratio, torch.Generator().manual_seed(mask_seed))
    completed, trace = model.complete(test, missing)
    mean_fill = train.mean(dim=0).expand_as(test)
    model_mse = masked_pixel_mse(completed, test, missing)
    mean_mse = masked_pixel_mse(mean_fill, test, missing)
    return {
        "masked_pixel_mse": model_mse,
        "mean_image_mse": mean_mse,
        "relative_reduction": 1 - model_mse / mean_mse,
        "energy_non_increasing_fraction": (trace.diff(dim=1) <= 0).all(dim=1).float().mean().item(),
    }


def add_arguments(parser: argparse.ArgumentParser) -> None:
    defaults = ETConfig()
    parser.add_argument("--out", default=DEFAULT_OUT, help="directory for the weights, config and metrics")
    parser.add_argument("--epochs", type=int, default=100)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--lr", type=float, default=1e-2)
    parser.add_argument("--weight-decay", type=float, default=1e-4)
    parser.add_argument("--seed", type=int, default=0, help="initialisation, shuffling and training masks")
    parser.add_argument("--split-seed", type=int, default=0, help="train/test split of the digits")
    parser.add_argument("--test-fraction", type=float, default=0.2)
    parser.add_argument("--mask-ratio", type=float, default=0.5, help="fraction of patches masked in training")
    parser.add_argument("--eval-mask-ratio", type=float, default=0.5)
    parser.add_argument("--eval-mask-seed", type=int, default=1234)
    parser.add_argument("--train-limit", type=int, default=None, help="use only the first N training images")
    parser.add_argument("--patch-size", type=int, default=defaults.patch_size)
    parser.add_argument("--dim", type=int, default=defaults.dim)
    parser.add_argument("--heads", type=int, default=defaults.heads)
    parser.add_argument("--head-dim", type=int, default=defaults.head_dim)
    parser.add_argument("--hopfield-mult", type=int, default=defaults.hopfield_mult)
    parser.add_argument("--steps", type=int, default=defaults.steps)
    parser.add_argument("--alpha", type=float, default=defaults.alpha, help="descent step size α")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")


def run(args: argparse.Namespace) -> int:
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    device = torch.device(args.device)
    config = ETConfig(
        patch_size=args.patch_size,
        dim=args.dim,
        heads=args.heads,
        head_dim=args.head_dim,
        hopfield_mult=args.hopfield_mult,
        steps=args.steps,
        alpha=args.alpha,
    )
    train, test = digits_split(args.split_seed, args.test_fraction)
    if args.train_limit is not None:
        train = train[: args.train_limit]

    model = EnergyTransformer(config).to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=args.weight_decay)
    batches_per_epoch = math.ceil(len(train) / args.batch_size)
    schedule = torch.optim.lr_scheduler.OneCycleLR(
        optimizer, max_lr=args.lr, total_steps=args.epochs * batches_per_epoch, pct_start=0.1
    )
    generator = torch.Generator().manual_seed(args.seed)
    started = time.perf_counter()
    progress = tqdm(range(args.epochs), desc="energy-transformer", unit="epoch")
    for _ in progress:
        model.train()
        order = torch.randperm(len(train), generator=generator)
        total = 0.0
        for batch in order.split(args.batch_size):
            images = train[batch]
            missing = random_patch_mask(len(images), config, args.mask_ratio, generator)
            images, missing = images.to(device), missing.to(device)
            decoded, _ = model(images, missing)
            loss = ((decoded - images)[missing] ** 2).mean()
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            schedule.step()
            with torch.no_grad():
                model.norm_gamma.clamp_(min=0.0)  # keeps the layer-norm Lagrangian convex
            total += loss.item() * len(images)
        progress.set_postfix(loss=f"{total / len(train):.4f}")
    train_seconds = time.perf_counter() - started

    model.eval()
    figures = evaluate(model, train.to(device), test.to(device), args.eval_mask_ratio, args.eval_mask_seed)
    metrics = {
        "dataset": "sklearn.datasets.load_digits, pixels/16",
        "split_seed": args.split_seed,
        "test_fraction": args.test_fraction,
        "test_images": len(test),
        "train_images": len(train),
        "eval_mask_ratio": args.eval_mask_ratio,
        "eval_mask_seed": args.eval_mask_seed,
        **figures,
        "training": {
            "epochs": args.epochs,
            "batch_size": args.batch_size,
            "lr": args.lr,
            "weight_decay": args.weight_decay,
            "seed": args.seed,
            "mask_ratio": args.mask_ratio,
            "device": str(device),
            "seconds": round(train_seconds, 1),
        },
        "config": asdict(config),
    }
    out = Path(args.out)
    save(model.cpu(), out)
    (out / METRICS_FILE).write_text(json.dumps(metrics, indent=2) + "\n")
    print(json.dumps(figures, indent=2))
    return 0


if __name__ == "__main__":
    cli = argparse.ArgumentParser(description=__doc__)
    add_arguments(cli)
    raise SystemExit(run(cli.parse_args()))
