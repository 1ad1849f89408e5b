"""Pretrain the tiny world's models from a seed on CPU.

    python tinyworld/pretrain.py --seed 0 --clip-steps 3000 --vae-steps 2500 --unet-steps 9000

Stages (each deterministic given --seed):
  1. tiny CLIP (transformers CLIPModel) trained contrastively on (image, caption) pairs;
  2. AutoencoderKL trained to reconstruct 32x32 images through 8x8x4 latents;
  3. UNet2DConditionModel trained with the epsilon-prediction DDPM loss on VAE latents,
     conditioned on the frozen CLIP text encoder's hidden states (10% caption dropout so
     classifier-free guidance works).
Writes trainer/personalize/assets/tiny_world/ (a diffusers StableDiffusionPipeline folder plus
clip/, all fp16 safetensors) and the loss log tinyworld/pretrain_log.csv.
`--bench` runs a few steps of every stage and prints seconds per step instead.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import shutil
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
from personalize.world.tiny_models import (  # noqa: E402
    MAX_TEXT_LENGTH,
    TINY_WORLD_DIR,
    TinyConfig,
    assemble_pipeline,
    build_clip,
    build_unet,
    build_vae,
    count_parameters,
    load_tokenizer,
    text_encoder_from_clip,
)


class LossLog:
    """Appends (stage, step, loss, lr, elapsed) rows to a CSV and prints progress."""

    def __init__(self, path: Path, print_every: int = 50):
        self.path = path
        self.print_every = print_every
        self.file = path.open("w", newline="")
        self.writer = csv.writer(self.file)
        self.writer.writerow(["stage", "step", "loss", "lr", "elapsed_s"])

    def log(self, stage: str, step: int, loss: float, lr: float, started: float) -> None:
        elapsed = time.time() - started
        self.writer.writerow([stage, step, f"{loss:.6f}", f"{lr:.3e}", f"{elapsed:.1f}"])
        if step % self.print_every == 0:
            self.file.flush()
            print(f"[{stage}] step {step} loss {loss:.4f} lr {lr:.2e} {elapsed:.0f}s", flush=True)


def cosine_lr(step: int, total: int, peak: float, warmup: int) -> float:
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return peak * (0.1 + 0.9 * 0.5 * (1.0 + math.cos(math.pi * progress)))


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr


# ----------------------------------------------------------------------------- data


class WorldPool:
    """A fixed pool of rendered pretraining images with their attributes (never held out).

    Rendering is the slow part of the data pipeline, so images are drawn once; captions are
    re-sampled from the attributes every time an image is used (template variety)."""

    def __init__(self, size: int, image_size: int, seed: int):
        rng = np.random.default_rng([seed, 1])
        self.images = np.empty((size, image_size, image_size, 3), dtype=np.uint8)
        self.attributes: list[shapes.Attributes] = []
        for index in range(size):
            image, attrs = shapes.sample_labelled(rng, image_size)
            self.images[index] = np.asarray(image)
            self.attributes.append(attrs)

    def __len__(self) -> int:
        return len(self.attributes)

    def captions(self, indices: np.ndarray, rng: np.random.Generator) -> list[str]:
        return [shapes.caption_for(self.attributes[i], rng) for i in indices]


def tokenize(tokenizer, captions: list[str], max_length: int | None) -> torch.Tensor:
    """(B, L) token ids. max_length=None pads to the longest caption (pooled output unaffected:
    CLIP's text tower is causal and pools at the first EOS)."""
    if max_length is None:
        return tokenizer(captions, padding=True, return_tensors="pt").input_ids
    return tokenizer(captions, padding="max_length", max_length=max_length, truncation=True, return_tensors="pt").input_ids


class TextStateCache:
    """Frozen text encoder outputs per caption string. Captions come from a few thousand
    templated strings, so each is encoded once instead of every step."""

    def __init__(self, tokenizer, text_encoder):
        self.tokenizer = tokenizer
        self.text_encoder = text_encoder
        self.cache: dict[str, torch.Tensor] = {}

    @torch.no_grad()
    def states(self, captions: list[str]) -> torch.Tensor:
        missing = sorted(set(captions) - self.cache.keys())
        if missing:
            ids = tokenize(self.tokenizer, missing, MAX_TEXT_LENGTH)
            hidden = self.text_encoder(ids)[0]  # (M, 77, text_hidden)
            self.cache.update(zip(missing, hidden))
        return torch.stack([self.cache[c] for c in captions])


# ----------------------------------------------------------------------------- stages


def train_clip(cfg, pool, tokenizer, steps, batch, seed, log, lr=1e-3):
    torch.manual_seed(seed)
    rng = np.random.default_rng([seed, 2])
    clip = build_clip(cfg, seed)
    clip.train()
    optimizer = torch.optim.AdamW(clip.parameters(), lr=lr, weight_decay=0.05)
    started = time.time()
    for step in range(steps):
        indices = rng.integers(len(pool), size=batch)
        pixels = uint8_batch_to_pixels(pool.images[indices])
        ids = tokenize(tokenizer, pool.captions(indices, rng), None)
        set_lr(optimizer, cosine_lr(step, steps, lr, warmup=min(200, steps // 10 + 1)))
        loss = clip(input_ids=ids, pixel_values=pixels, return_loss=True).loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(clip.parameters(), 1.0)
        optimizer.step()
        with torch.no_grad():  # CLIP paper: cap the temperature at 100
            clip.logit_scale.clamp_(0, math.log(100))
        log.log("clip", step, loss.item(), optimizer.param_groups[0]["lr"], started)
    return clip.eval(), time.time() - started


def train_vae(cfg, pool, steps, batch, seed, log, lr=1e-3, kl_weight=1e-6):
    torch.manual_seed(seed)
    rng = np.random.default_rng([seed, 3])
    vae = build_vae(cfg, seed)
    vae.train()
    optimizer = torch.optim.AdamW(vae.parameters(), lr=lr, weight_decay=0.0)
    started = time.time()
    for step in range(steps):
        indices = rng.integers(len(pool), size=batch)
        pixels = uint8_batch_to_pixels(pool.images[indices])
        posterior = vae.encode(pixels).latent_dist
        reconstruction = vae.decode(posterior.sample()).sample
        # Per-pixel reconstruction (MSE for colours + L1 for edges) and a weak KL, as in LDM.
        reconstruction_loss = F.mse_loss(reconstruction, pixels) + 0.5 * F.l1_loss(reconstruction, pixels)
        loss = reconstruction_loss + kl_weight * posterior.kl().mean()
        set_lr(optimizer, cosine_lr(step, steps, lr, warmup=min(100, steps // 10 + 1)))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
        optimizer.step()
        log.log("vae", step, reconstruction_loss.item(), optimizer.param_groups[0]["lr"], started)
    return vae.eval(), time.time() - started


@torch.no_grad()
def encode_pool(vae, pool, chunk=512) -> tuple[torch.Tensor, torch.Tensor, float]:
    """Posterior means and stds of every pool image, and the latent scaling factor (1/std)."""
    means, stds = [], []
    for start in range(0, len(pool), chunk):
        posterior = vae.encode(uint8_batch_to_pixels(pool.images[start : start + chunk])).latent_dist
        means.append(posterior.mean)
        stds.append(posterior.std)
    mean, std = torch.cat(means), torch.cat(stds)
    scaling_factor = float(1.0 / mean.std())
    return mean, std, scaling_factor


def train_unet(cfg, pool, latents, tokenizer, text_encoder, scheduler, steps, batch, seed, log,
               lr=1e-3, caption_dropout=0.1, ema_decay=0.999, snr_gamma=5.0, max_seconds=None):
    torch.manual_seed(seed)
    rng = np.random.default_rng([seed, 4])
    latent_mean, latent_std, scaling_factor = latents
    unet = build_unet(cfg, seed)
    unet.train()
    text_cache = TextStateCache(tokenizer, text_encoder)
    params = list(unet.parameters())
    ema_params = [p.detach().clone() for p in params]
    optimizer = torch.optim.AdamW(unet.parameters(), lr=lr, weight_decay=0.01)
    alphas_cumprod = scheduler.alphas_cumprod
    snr = alphas_cumprod / (1.0 - alphas_cumprod)
    # min-SNR-gamma weighting (Hang et al. 2023): faster convergence for epsilon prediction.
    loss_weight = torch.clamp(snr, max=snr_gamma) / snr
    started = time.time()
    steps_done = 0
    for step in range(steps):
        if max_seconds is not None and time.time() - started > max_seconds:
            print(f"[unet] time cap reached after {step} of {steps} steps", flush=True)
            break
        steps_done = step + 1
        indices = rng.integers(len(pool), size=batch)
        captions = pool.captions(indices, rng)
        captions = ["" if rng.random() < caption_dropout else c for c in captions]
        with torch.no_grad():
            text_states = text_cache.states(captions)  # (B, 77, text_hidden)
            clean = (latent_mean[indices] + latent_std[indices] * torch.randn_like(latent_std[indices])) * scaling_factor
        noise = torch.randn_like(clean)
        timesteps = torch.randint(0, scheduler.config.num_train_timesteps, (batch,))
        noisy = scheduler.add_noise(clean, noise, timesteps)
        prediction = unet(noisy, timesteps, encoder_hidden_states=text_states).sample
        per_example = F.mse_loss(prediction, noise, reduction="none").mean(dim=(1, 2, 3))
        loss = (per_example * loss_weight[timesteps]).mean()
        # With a time cap the schedule follows whichever runs out first, steps or time, so a
        # capped run still anneals its learning rate (step-only when uncapped: reproducible).
        schedule_step = step
        if max_seconds is not None and step > 0:
            schedule_step = max(step, int(steps * (time.time() - started) / max_seconds))
        set_lr(optimizer, cosine_lr(min(schedule_step, steps - 1), steps, lr, warmup=min(300, steps // 10 + 1)))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(unet.parameters(), 1.0)
        optimizer.step()
        with torch.no_grad():
            decay = min(ema_decay, (1 + step) / (10 + step))
            torch._foreach_mul_(ema_params, decay)
            torch._foreach_add_(ema_params, [p.detach() for p in params], alpha=1 - decay)
        log.log("unet", step, per_example.mean().item(), optimizer.param_groups[0]["lr"], started)
    with torch.no_grad():
        for p, ema_p in zip(params, ema_params):
            p.copy_(ema_p)
    return unet.eval(), time.time() - started, steps_done


# ----------------------------------------------------------------------------- saving


def folder_megabytes(path: Path) -> float:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file()) / 1e6


def save_world(out: Path, clip, vae, unet, tokenizer, scaling_factor: float) -> None:
    if out.exists():
        shutil.rmtree(out)
    vae.register_to_config(scaling_factor=scaling_factor)
    text_encoder = text_encoder_from_clip(clip)
    pipeline = assemble_pipeline(unet, vae, text_encoder, tokenizer)
    pipeline.to(torch.float16)
    pipeline.save_pretrained(out, safe_serialization=True)
    clip.to(torch.float16).save_pretrained(out / "clip", safe_serialization=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--pool-size", type=int, default=30000)
    parser.add_argument("--clip-steps", type=int, default=2500)
    parser.add_argument("--clip-batch", type=int, default=128)
    parser.add_argument("--vae-steps", type=int, default=2000)
    parser.add_argument("--vae-batch", type=int, default=16)
    parser.add_argument("--unet-steps", type=int, default=7000)
    parser.add_argument("--unet-batch", type=int, default=64)
    parser.add_argument("--unet-max-minutes", type=float, default=None,
                        help="safety cap: stop the UNet stage early (EMA weights are kept)")
    parser.add_argument("--finish-by-unix", type=float, default=None,
                        help="safety cap: UNet stage stops so that weights are written before this time")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path, default=TINY_WORLD_DIR)
    parser.add_argument("--log", type=Path, default=REPO_ROOT / "tinyworld" / "pretrain_log.csv")
    parser.add_argument("--bench", action="store_true", help="time a few steps per stage and exit")
    args = parser.parse_args()

    torch.set_num_threads(args.threads)
    if args.bench:
        args.pool_size, args.clip_steps, args.vae_steps, args.unet_steps = 1000, 12, 12, 12
        args.log = Path("/tmp/pretrain_bench.csv")
    cfg = TinyConfig.pretrained()
    tokenizer = load_tokenizer()
    log = LossLog(args.log, print_every=5 if args.bench else 50)
    timings: dict[str, float] = {}

    started = time.time()
    pool = WorldPool(args.pool_size, cfg.image_size, args.seed)
    timings["render_pool_s"] = time.time() - started
    print(f"rendered {len(pool)} images in {timings['render_pool_s']:.0f}s", flush=True)

    clip, timings["clip_s"] = train_clip(cfg, pool, tokenizer, args.clip_steps, args.clip_batch, args.seed, log)
    vae, timings["vae_s"] = train_vae(cfg, pool, args.vae_steps, args.vae_batch, args.seed, log)
    started = time.time()
    latents = encode_pool(vae, pool)
    timings["encode_pool_s"] = time.time() - started
    print(f"latent scaling factor {latents[2]:.4f}", flush=True)

    text_encoder = text_encoder_from_clip(clip).eval()
    scheduler = assemble_pipeline(build_unet(TinyConfig.test()), vae, text_encoder, tokenizer).scheduler
    max_seconds = args.unet_max_minutes * 60 if args.unet_max_minutes else None
    if args.finish_by_unix:  # leave ~2 minutes for saving
        until_deadline = args.finish_by_unix - time.time() - 120
        max_seconds = until_deadline if max_seconds is None else min(max_seconds, until_deadline)
    unet, timings["unet_s"], unet_steps_done = train_unet(
        cfg, pool, latents, tokenizer, text_encoder, scheduler, args.unet_steps, args.unet_batch, args.seed, log,
        max_seconds=max_seconds,
    )
    log.file.close()

    if args.bench:
        for stage, steps in (("clip", args.clip_steps), ("vae", args.vae_steps), ("unet", args.unet_steps)):
            print(f"{stage}: {timings[stage + '_s'] / steps:.3f} s/step")
        print(f"render: {timings['render_pool_s'] / args.pool_size * 1000:.2f} ms/image")
        return

    save_world(args.out, clip, vae, unet, tokenizer, latents[2])
    summary = {
        "seed": args.seed,
        "steps": {"clip": args.clip_steps, "vae": args.vae_steps, "unet": unet_steps_done},
        "unet_steps_planned": args.unet_steps,
        "batch": {"clip": args.clip_batch, "vae": args.vae_batch, "unet": args.unet_batch},
        "pool_size": args.pool_size,
        # A wall-clock cap makes the UNet's LR schedule follow elapsed time while it runs slow.
        "time_capped": max_seconds is not None,
        "threads": args.threads,
        "wall_seconds": {k: round(v, 1) for k, v in timings.items()},
        "parameters": {
            "clip": count_parameters(clip),
            "clip_text": count_parameters(clip.text_model),
            "clip_vision": count_parameters(clip.vision_model),
            "vae": count_parameters(vae),
            "unet": count_parameters(unet),
        },
        "latent_scaling_factor": latents[2],
        "size_mb": round(folder_megabytes(args.out), 2),
    }
    (REPO_ROOT / "tinyworld" / "pretrain_summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    print(json.dumps(summary, indent=2), flush=True)


if __name__ == "__main__":
    main()
