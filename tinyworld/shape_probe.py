"""Supervised shape probe: can a tiny CLIP vision tower of a given configuration learn shape?

    python tinyworld/shape_probe.py --steps 300 --batch 64 --patch 4 --lr 2e-3 --threads 1
    python tinyworld/shape_probe.py --save-inputs <dir>   # a few CLIP input tensors as PNG

A fresh CLIPVisionModel (the tiny world's vision tower, with the given overrides) plus a linear
head on its pooled output is trained with cross-entropy on shape labels alone, on rendered
pretraining images (the same renderer and the same [-1, 1] pixels the CLIP is pretrained on).
Accuracy is measured on a separate set of renders every --eval-every steps. If a configuration
cannot learn shape even with labels, contrastive pretraining will not teach it either.

Prints one JSON line per evaluation and a final summary line (config, accuracy per step,
seconds per step).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT / "trainer"))

from personalize.world import shapes  # noqa: E402
from personalize.world.scoring import uint8_batch_to_pixels  # noqa: E402
from personalize.world.tiny_models import TinyConfig, vision_config  # noqa: E402


CLASSES = {"shape": shapes.SHAPES, "colour": tuple(shapes.COLOURS)}  # both 8 classes: one head size


def plain_labelled(rng: np.random.Generator, size: int):
    """A pretraining example with the distractors removed: solid fill on a plain sand background
    (shape, colour and geometry drawn as usual). Shows whether texture is what slows shape down."""
    attrs = dataclasses.replace(shapes.sample_attributes(rng), pattern="solid", background="sand")
    return shapes.render(attrs, rng, size), attrs


def render_pool(n: int, size: int, seed: int, cache: Path | None, plain: bool = False,
                attribute: str = "shape") -> tuple[np.ndarray, np.ndarray]:
    """(N, size, size, 3) uint8 renders and their `attribute` class indices; cached as .npz."""
    path = cache / f"shape_pool_{n}_{size}_{seed}{'_plain' if plain else ''}_{attribute}.npz" if cache else None
    if path is not None and path.exists():
        data = np.load(path)
        return data["images"], data["labels"]
    classes = CLASSES[attribute]
    rng = np.random.default_rng([seed, 7])
    images = np.empty((n, size, size, 3), dtype=np.uint8)
    labels = np.empty(n, dtype=np.int64)
    for i in range(n):
        image, attrs = plain_labelled(rng, size) if plain else shapes.sample_labelled(rng, size)
        images[i] = np.asarray(image)
        labels[i] = classes.index(getattr(attrs, attribute))
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        np.savez(path, images=images, labels=labels)
    return images, labels


def sincos_positions(grid: int, dim: int) -> torch.Tensor:
    """(1 + grid*grid, dim) fixed 2-D sine-cosine position codes (MAE style), the class token's
    row zero: half the channels encode the row, half the column, at geometric frequencies."""
    quarter = dim // 4
    frequencies = 1.0 / (10000 ** (torch.arange(quarter, dtype=torch.float32) / quarter))
    ys, xs = torch.meshgrid(torch.arange(grid, dtype=torch.float32), torch.arange(grid, dtype=torch.float32), indexing="ij")

    def code(values: torch.Tensor) -> torch.Tensor:
        angles = values.reshape(-1, 1) * frequencies
        return torch.cat([angles.sin(), angles.cos()], dim=1)

    codes = torch.cat([code(ys), code(xs)], dim=1)
    codes = torch.nn.functional.pad(codes, (0, dim - codes.shape[1]))
    return torch.cat([torch.zeros(1, dim), codes])


class ShapeProbe(torch.nn.Module):
    """The CLIP vision tower (pooled class token) with a linear shape head. `position_scale` > 0
    starts the learned position embeddings from 2-D sine-cosine codes times that scale instead of
    N(0, 0.02) noise (same parameters: a CLIPModel initialised so still saves and loads as one)."""

    def __init__(self, cfg: TinyConfig, position_scale: float = 0.0):
        super().__init__()
        from transformers import CLIPVisionModel

        self.tower = CLIPVisionModel(vision_config(cfg))
        if position_scale > 0:
            embedding = getattr(self.tower, "vision_model", self.tower).embeddings.position_embedding
            with torch.no_grad():
                embedding.weight.copy_(position_scale * sincos_positions(cfg.image_size // cfg.vision_patch, cfg.vision_hidden))
        self.head = torch.nn.Linear(cfg.vision_hidden, len(shapes.SHAPES))

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.head(self.tower(pixel_values=pixels).pooler_output)


class ResNetProbe(torch.nn.Module):
    """A tiny transformers ResNetModel (batch norm, 3 basic stages) with a linear head: a
    convolutional tower that a transformers dual encoder (VisionTextDualEncoderModel) could hold
    next to the CLIP text tower, saved and loaded with from_pretrained like the CLIP."""

    def __init__(self, widths: tuple[int, ...] = (32, 64, 128)):
        super().__init__()
        from transformers import ResNetConfig, ResNetModel

        self.tower = ResNetModel(ResNetConfig(embedding_size=widths[0], hidden_sizes=list(widths), depths=[1] * len(widths),
                                              layer_type="basic", downsample_in_first_stage=False))
        self.head = torch.nn.Linear(widths[-1], len(shapes.SHAPES))

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.head(self.tower(pixel_values=pixels).pooler_output.flatten(1))


class ConvProbe(torch.nn.Module):
    """A small CNN of about the same size: is shape learnable from these renders at all?"""

    def __init__(self, batch_norm: bool = False):
        super().__init__()
        layers, channels = [], 3

        def norm(width: int) -> torch.nn.Module:
            return torch.nn.BatchNorm2d(width) if batch_norm else torch.nn.Identity()

        for width in (32, 64, 128):
            layers += [torch.nn.Conv2d(channels, width, 3, padding=1), norm(width), torch.nn.GELU(),
                       torch.nn.Conv2d(width, width, 3, padding=1), norm(width), torch.nn.GELU(), torch.nn.MaxPool2d(2)]
            channels = width
        self.features = torch.nn.Sequential(*layers)
        self.head = torch.nn.Linear(channels, len(shapes.SHAPES))

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(pixels).mean(dim=(2, 3)))


def lr_at(step: int, steps: int, peak: float, warmup: int) -> float:
    if step < warmup:
        return peak * (step + 1) / warmup
    return 0.5 * peak * (1 + math.cos(math.pi * (step - warmup) / max(1, steps - warmup)))


@torch.no_grad()
def accuracy(model: torch.nn.Module, images: np.ndarray, labels: np.ndarray, chunk: int = 200) -> float:
    model.eval()
    correct = 0
    for start in range(0, len(images), chunk):
        logits = model(uint8_batch_to_pixels(images[start:start + chunk]))
        correct += int((logits.argmax(-1).numpy() == labels[start:start + chunk]).sum())
    model.train()
    return correct / len(images)


def save_inputs(out: Path, n: int, size: int, seed: int) -> None:
    """The CLIP's input tensors, mapped back from [-1, 1] to pixels and enlarged 8x (nearest)."""
    from PIL import Image

    images, labels = render_pool(n, size, seed, None)
    pixels = uint8_batch_to_pixels(images)
    out.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        array = ((pixels[i].permute(1, 2, 0).numpy() + 1.0) * 127.5).round().clip(0, 255).astype(np.uint8)
        Image.fromarray(array).resize((size * 8, size * 8), Image.NEAREST).save(out / f"{i:02d}_{shapes.SHAPES[labels[i]]}.png")
    print(f"wrote {n} input tensors as PNG to {out} (range {pixels.min():.2f}..{pixels.max():.2f}, shape {tuple(pixels.shape[1:])})")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--warmup", type=int, default=30)
    parser.add_argument("--weight-decay", type=float, default=0.05)
    parser.add_argument("--image-size", type=int, default=32, help="render and input resolution")
    parser.add_argument("--patch", type=int, default=8)
    parser.add_argument("--hidden", type=int, default=96)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--train-images", type=int, default=8000)
    parser.add_argument("--eval-images", type=int, default=800)
    parser.add_argument("--eval-every", type=int, default=100)
    parser.add_argument("--position-scale", type=float, default=0.0,
                        help="> 0: start the position embeddings from 2-D sine-cosine codes times this")
    parser.add_argument("--cnn", action="store_true", help="a small CNN instead of the vision tower (sanity check)")
    parser.add_argument("--resnet", action="store_true", help="a tiny transformers ResNetModel instead of the vision tower")
    parser.add_argument("--batch-norm", action="store_true", help="with --cnn: batch norm after every convolution")
    parser.add_argument("--attribute", choices=tuple(CLASSES), default="shape",
                        help="what the head learns (colour: a control that the tower learns at all)")
    parser.add_argument("--plain", action="store_true", help="solid shapes on a plain background (no texture distractors)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--cache", type=Path, default=Path("/tmp/shape_probe_cache"))
    parser.add_argument("--save-inputs", type=Path, default=None, help="only write a few input tensors as PNG")
    args = parser.parse_args()
    if args.image_size % args.patch or args.hidden % args.heads or args.steps < 1:
        parser.error("--image-size must be a multiple of --patch, --hidden of --heads, --steps >= 1")
    torch.set_num_threads(args.threads)
    if args.save_inputs is not None:
        save_inputs(args.save_inputs, 16, args.image_size, args.seed + 100)
        return 0

    cfg = dataclasses.replace(TinyConfig(), image_size=args.image_size, vision_patch=args.patch,
                              vision_hidden=args.hidden, vision_layers=args.layers, vision_heads=args.heads)
    train_x, train_y = render_pool(args.train_images, args.image_size, args.seed, args.cache, args.plain, args.attribute)
    test_x, test_y = render_pool(args.eval_images, args.image_size, args.seed + 1, args.cache, args.plain, args.attribute)
    torch.manual_seed(args.seed)
    if args.resnet:
        model: torch.nn.Module = ResNetProbe()
    else:
        model = ConvProbe(args.batch_norm) if args.cnn else ShapeProbe(cfg, args.position_scale)
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=args.weight_decay)
    rng = np.random.default_rng(args.seed)
    config = {k: getattr(args, k) for k in ("steps", "batch", "lr", "warmup", "image_size", "patch", "hidden", "layers",
                                            "heads", "position_scale", "cnn", "resnet", "batch_norm", "plain", "attribute")}
    curve, train_seconds = {}, 0.0
    for step in range(1, args.steps + 1):
        started = time.perf_counter()
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step - 1, args.steps, args.lr, args.warmup)
        indices = rng.integers(len(train_x), size=args.batch)
        loss = F.cross_entropy(model(uint8_batch_to_pixels(train_x[indices])), torch.from_numpy(train_y[indices]))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        train_seconds += time.perf_counter() - started
        if step % args.eval_every == 0 or step == args.steps:
            curve[step] = accuracy(model, test_x, test_y)
            print(json.dumps({"step": step, "loss": round(loss.item(), 4), "shape_accuracy": curve[step],
                              "s_per_step": round(train_seconds / step, 4)}), flush=True)
    print("SUMMARY " + json.dumps({"config": config, "accuracy": curve, "s_per_step": round(train_seconds / args.steps, 4),
                                   "parameters": sum(p.numel() for p in model.parameters())}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
