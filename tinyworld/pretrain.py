"""Pretrain the tiny world's models from a seed on CPU.

    python tinyworld/pretrain.py --seed 0 --clip-steps 3000 --vae-steps 2500 --unet-steps 9000

Stages (each deterministic given --seed):
  1. tiny CLIP (ConvClip: CLIP text tower + small ResNet image tower) trained contrastively on
     (image, caption) pairs, with a shape/pattern swap loss and attribute heads on the image tower;
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
import copy
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
from diffusers import AutoencoderKL

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT / "trainer"))

from personalize.world import provenance, shapes  # noqa: E402
from personalize.world.scoring import ZERO_SHOT_CLASSES, load_tiny_clip, uint8_batch_to_pixels  # noqa: E402
from personalize.world.tiny_models import (  # noqa: E402
    MAX_TEXT_LENGTH,
    TINY_WORLD_DIR,
    TinyConfig,
    assemble_pipeline,
    build_conv_clip,
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


def features(output) -> torch.Tensor:
    """The projected embedding tensor (some transformers versions wrap it in an output object)."""
    return getattr(output, "pooler_output", output)


def swap_captions(attrs: shapes.Attributes, attribute: str, values: tuple[str, ...], rng: np.random.Generator) -> list[str]:
    """One caption template filled once per value of `attribute`, everything else as in `attrs`:
    captions that differ only in that attribute (the hardest negatives for it)."""
    template = shapes.caption_template(rng, need=attribute)
    fields = {"shape": attrs.shape, "colour": attrs.colour, "pattern": attrs.pattern, "background": attrs.background}
    return [template.format(**{**fields, attribute: value}) for value in values]


def contrastive_targets(captions: list[str]) -> torch.Tensor:
    """Identical captions in a batch are true matches, not negatives: spread the target over them."""
    same = torch.tensor([[a == b for b in captions] for a in captions], dtype=torch.float32)
    return same / same.sum(dim=1, keepdim=True)


# Attributes the text tower must tell apart, with the values the swap loss contrasts.
SWAP_ATTRIBUTES: dict[str, tuple[str, ...]] = {"shape": shapes.SHAPES, "pattern": shapes.PATTERNS}


def schedule_position(step: int, steps: int, started: float, max_seconds: float | None) -> int:
    """The step the learning-rate schedule is at: with a time cap, whichever of steps or time
    has run out further, so a capped run still anneals (step-only when uncapped: reproducible)."""
    if max_seconds is None or step == 0:
        return step
    return min(max(step, int(steps * (time.time() - started) / max_seconds)), steps - 1)


class AttributeHeads(torch.nn.Module):
    """Linear classifiers of every attribute on the image embedding: a supervised signal that
    makes the image tower separate shapes within a few hundred steps (docs/tiny_world.md, probes),
    which the contrastive and swap losses then align the text tower with. Pretraining only."""

    def __init__(self, dim: int):
        super().__init__()
        self.heads = torch.nn.ModuleDict({name: torch.nn.Linear(dim, len(values)) for name, values in ATTRIBUTE_VALUES.items()})

    def loss(self, image_embeddings: torch.Tensor, attributes: list[shapes.Attributes]) -> torch.Tensor:
        total = torch.zeros(())
        for name, head in self.heads.items():
            values = ATTRIBUTE_VALUES[name]
            truth = torch.tensor([values.index(getattr(a, name)) for a in attributes])
            total = total + F.cross_entropy(head(image_embeddings), truth)
        return total / len(self.heads)


# The zero-shot classes, in the heads' order (their initial weights are drawn in this order).
ATTRIBUTE_VALUES: dict[str, tuple[str, ...]] = {name: ZERO_SHOT_CLASSES[name] for name in ("shape", "colour", "pattern", "background")}


def train_clip(cfg, pool, tokenizer, steps, batch, seed, log, lr=1e-3, swap_images=32, swap_weight=1.0,
               attribute_weight=1.0, checkpoint=None, checkpoint_every=250, max_seconds=None, init=None, model=None):
    """Contrastive CLIP training plus, for `swap_images` images per batch, a cross-entropy over
    captions that differ from the image's own only in its shape (or pattern), plus
    `attribute_weight` x the attribute heads' loss. Colour and background are easy, so random
    negatives alone hardly teach the towers shape.
    `model`: train this instead (anything with get_image_features / get_text_features /
    logit_scale); otherwise a new ConvClip or the `init` CLIP folder."""
    torch.manual_seed(seed)
    rng = np.random.default_rng([seed, 2])
    if model is not None:
        clip = model
    else:
        clip = build_conv_clip(cfg, seed) if init is None else load_tiny_clip(init)[0]
    clip.train()
    heads = AttributeHeads(cfg.projection_dim)
    optimizer = torch.optim.AdamW(list(clip.parameters()) + list(heads.parameters()), lr=lr, weight_decay=0.05)
    started = time.time()
    steps_done = 0
    for step in range(steps):
        if max_seconds is not None and time.time() - started > max_seconds:
            print(f"[clip] time cap reached after {step} of {steps} steps", flush=True)
            break
        steps_done = step + 1
        indices = rng.integers(len(pool), size=batch)
        pixels = uint8_batch_to_pixels(pool.images[indices])
        captions = pool.captions(indices, rng)
        position = schedule_position(step, steps, started, max_seconds)
        set_lr(optimizer, cosine_lr(position, steps, lr, warmup=min(200, steps // 10 + 1)))
        image_raw = features(clip.get_image_features(pixel_values=pixels))
        image = F.normalize(image_raw, dim=-1)
        text = F.normalize(features(clip.get_text_features(input_ids=tokenize(tokenizer, captions, None))), dim=-1)
        scale = clip.logit_scale.exp()
        logits = scale * image @ text.T
        targets = contrastive_targets(captions)
        contrastive = 0.5 * (F.cross_entropy(logits, targets) + F.cross_entropy(logits.T, targets))
        swap = torch.zeros(())
        if swap_images and swap_weight:
            for attribute, values in SWAP_ATTRIBUTES.items():
                chosen = range(min(swap_images, batch))
                swapped = [c for i in chosen for c in swap_captions(pool.attributes[indices[i]], attribute, values, rng)]
                swap_text = F.normalize(features(clip.get_text_features(input_ids=tokenize(tokenizer, swapped, None))), dim=-1)
                swap_text = swap_text.view(len(chosen), len(values), -1)  # (n, values, D)
                swap_logits = scale * torch.einsum("nd,nvd->nv", image[: len(chosen)], swap_text)
                truth = torch.tensor([values.index(getattr(pool.attributes[indices[i]], attribute)) for i in chosen])
                swap = swap + F.cross_entropy(swap_logits, truth)
        attribute = heads.loss(image_raw, [pool.attributes[i] for i in indices]) if attribute_weight else torch.zeros(())
        loss = contrastive + swap_weight * swap + attribute_weight * attribute
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(clip.parameters(), 1.0)
        optimizer.step()
        with torch.no_grad():  # CLIP paper: cap the temperature at 100
            clip.logit_scale.clamp_(0, math.log(100))
        log.log("clip", step, contrastive.item(), optimizer.param_groups[0]["lr"], started)
        log.log("clip_swap", step, swap.item(), optimizer.param_groups[0]["lr"], started)
        log.log("clip_attributes", step, attribute.item(), optimizer.param_groups[0]["lr"], started)
        if checkpoint is not None and (step + 1) % checkpoint_every == 0 and step + 1 < steps:
            save_clip(clip, checkpoint)
            print(f"[clip] checkpoint at step {step + 1}", flush=True)
    return clip.eval(), time.time() - started, steps_done


def save_clip(clip, out: Path) -> None:
    """fp32 copy of the whole CLIP (a stage checkpoint; the shipped world is fp16)."""
    tmp = out.with_name(out.name + ".tmp")
    clip.save_pretrained(tmp, safe_serialization=True)
    if out.exists():
        shutil.rmtree(out)
    tmp.rename(out)
    provenance.write_record(out.parent)


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
               lr=1e-3, caption_dropout=0.1, ema_decay=0.999, snr_gamma=5.0, max_seconds=None,
               on_checkpoint=None, checkpoint_every=1000):
    """`on_checkpoint(steps_done, ema_unet)` is called every `checkpoint_every` steps with a copy
    holding the EMA weights, so a run stopped early still leaves a usable model."""
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
        position = schedule_position(step, steps, started, max_seconds)
        set_lr(optimizer, cosine_lr(position, steps, lr, warmup=min(300, steps // 10 + 1)))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(unet.parameters(), 1.0)
        optimizer.step()
        with torch.no_grad():
            decay = min(ema_decay, (1 + step) / (10 + step))
            torch._foreach_mul_(ema_params, decay)
            torch._foreach_add_(ema_params, [p.detach() for p in params], alpha=1 - decay)
        log.log("unet", step, per_example.mean().item(), optimizer.param_groups[0]["lr"], started)
        if on_checkpoint is not None and steps_done % checkpoint_every == 0 and steps_done < steps:
            snapshot = copy.deepcopy(unet).eval()
            with torch.no_grad():
                for p, ema_p in zip(snapshot.parameters(), ema_params):
                    p.copy_(ema_p)
            on_checkpoint(steps_done, snapshot)
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
    provenance.write_record(out)  # the concepts this world never saw


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
    parser.add_argument("--clip-lr", type=float, default=1e-3)
    parser.add_argument("--swap-images", type=int, default=32,
                        help="images per CLIP batch that also get the shape/pattern swap loss (0: off)")
    parser.add_argument("--swap-weight", type=float, default=1.0)
    parser.add_argument("--attribute-weight", type=float, default=1.0,
                        help="weight of the attribute heads' loss on the CLIP image embedding (0: off)")
    parser.add_argument("--clip-max-minutes", type=float, default=None,
                        help="safety cap: stop the CLIP stage early (its LR schedule then follows time)")
    parser.add_argument("--clip-from", type=Path, default=None, help="skip the CLIP stage: load this CLIP folder")
    parser.add_argument("--clip-init", type=Path, default=None,
                        help="train the CLIP stage starting from this CLIP folder (a continuation, new LR schedule)")
    parser.add_argument("--vae-from", type=Path, default=None,
                        help="skip the VAE stage: load this VAE folder (waits for it to appear, so a"
                             " concurrent --vae-only process can train it)")
    parser.add_argument("--vae-only", action="store_true", help="train and save only the VAE stage")
    parser.add_argument("--stop-after", choices=("clip", "vae", "unet"), default="unet")
    parser.add_argument("--checkpoint-every", type=int, default=1000,
                        help="UNet steps between snapshots of the whole world into --out (CLIP: every 500 steps)")
    parser.add_argument("--out", type=Path, default=TINY_WORLD_DIR)
    parser.add_argument("--stages", type=Path, default=None,
                        help="where finished stages are saved (default: <out>_stages next to --out)")
    parser.add_argument("--log", type=Path, default=REPO_ROOT / "tinyworld" / "pretrain_log.csv")
    parser.add_argument("--summary", type=Path, default=REPO_ROOT / "tinyworld" / "pretrain_summary.json")
    parser.add_argument("--bench", action="store_true", help="time a few steps per stage and exit")
    args = parser.parse_args()

    torch.set_num_threads(args.threads)
    if args.bench:
        args.pool_size, args.clip_steps, args.vae_steps, args.unet_steps = 1000, 12, 12, 12
        args.log = Path("/tmp/pretrain_bench.csv")
    stages = args.stages or args.out.with_name(args.out.name + "_stages")
    stages.mkdir(parents=True, exist_ok=True)
    cfg = TinyConfig.pretrained()
    tokenizer = load_tokenizer()
    log = LossLog(args.log, print_every=5 if args.bench else 50)
    timings: dict[str, float] = {}

    started = time.time()
    pool = WorldPool(args.pool_size, cfg.image_size, args.seed)
    timings["render_pool_s"] = time.time() - started
    print(f"rendered {len(pool)} images in {timings['render_pool_s']:.0f}s", flush=True)

    if args.vae_only:
        vae, seconds = train_vae(cfg, pool, args.vae_steps, args.vae_batch, args.seed, log)
        vae.save_pretrained(stages / "vae.tmp", safe_serialization=True)
        (stages / "vae.tmp").rename(stages / "vae")
        (stages / "vae_summary.json").write_text(json.dumps(
            {"steps": args.vae_steps, "batch": args.vae_batch, "pool_size": args.pool_size, "threads": args.threads,
             "render_pool_s": round(timings["render_pool_s"], 1), "vae_s": round(seconds, 1)}, indent=2) + "\n")
        log.file.close()
        return
    clip_steps_done = args.clip_steps
    if args.clip_from:
        clip = load_tiny_clip(args.clip_from)[0]
        timings["clip_s"] = 0.0
    else:
        clip, timings["clip_s"], clip_steps_done = train_clip(
            cfg, pool, tokenizer, args.clip_steps, args.clip_batch, args.seed, log, lr=args.clip_lr,
            swap_images=args.swap_images, swap_weight=args.swap_weight, attribute_weight=args.attribute_weight,
            checkpoint=None if args.bench else stages / "clip",
            max_seconds=args.clip_max_minutes * 60 if args.clip_max_minutes else None, init=args.clip_init,
        )
        if not args.bench:
            save_clip(clip, stages / "clip")
            (stages / "clip_steps.txt").write_text(f"{clip_steps_done}\n")
    if args.stop_after == "clip":
        log.file.close()
        return
    if args.vae_from:
        waited = time.time()
        while not args.vae_from.exists():
            time.sleep(15)
        if time.time() - waited > 1:
            print(f"waited {time.time() - waited:.0f}s for {args.vae_from}", flush=True)
        vae = AutoencoderKL.from_pretrained(args.vae_from, torch_dtype=torch.float32).eval()
        timings["vae_s"] = 0.0
    else:
        vae, timings["vae_s"] = train_vae(cfg, pool, args.vae_steps, args.vae_batch, args.seed, log)
        if not args.bench:
            vae.save_pretrained(stages / "vae", safe_serialization=True)
    if args.stop_after == "vae":
        log.file.close()
        return
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

    def snapshot(steps_done: int, ema_unet) -> None:
        save_world(args.out, copy.deepcopy(clip), copy.deepcopy(vae), ema_unet, tokenizer, latents[2])
        (args.out / "unet_steps.txt").write_text(f"{steps_done}\n")
        print(f"[unet] world snapshot at step {steps_done} -> {args.out}", flush=True)

    unet, timings["unet_s"], unet_steps_done = train_unet(
        cfg, pool, latents, tokenizer, text_encoder, scheduler, args.unet_steps, args.unet_batch, args.seed, log,
        max_seconds=max_seconds, on_checkpoint=None if args.bench else snapshot, checkpoint_every=args.checkpoint_every,
    )
    log.file.close()

    if args.bench:
        for stage, steps in (("clip", args.clip_steps), ("vae", args.vae_steps), ("unet", args.unet_steps)):
            print(f"{stage}: {timings[stage + '_s'] / steps:.3f} s/step")
        print(f"render: {timings['render_pool_s'] / args.pool_size * 1000:.2f} ms/image")
        return

    save_world(args.out, clip, vae, unet, tokenizer, latents[2])
    (args.out / "unet_steps.txt").unlink(missing_ok=True)
    summary = {
        "seed": args.seed,
        "steps": {"clip": clip_steps_done, "vae": args.vae_steps, "unet": unet_steps_done},
        "clip_steps_planned": args.clip_steps,
        "unet_steps_planned": args.unet_steps,
        "batch": {"clip": args.clip_batch, "vae": args.vae_batch, "unet": args.unet_batch},
        "clip_swap": {"images_per_batch": args.swap_images, "weight": args.swap_weight,
                      "attributes": list(SWAP_ATTRIBUTES)},
        "clip_attribute_heads_weight": args.attribute_weight,
        "clip_init": str(args.clip_init) if args.clip_init else None,
        "stages_loaded": {"clip": str(args.clip_from) if args.clip_from else None,
                          "vae": str(args.vae_from) if args.vae_from else None},
        "pool_size": args.pool_size,
        # A wall-clock cap makes the UNet's LR schedule follow elapsed time while it runs slow.
        "time_capped": max_seconds is not None,
        "threads": args.threads,
        "wall_seconds": {k: round(v, 1) for k, v in timings.items()},
        "parameters": {
            "clip": count_parameters(clip),
            "clip_text": count_parameters(clip.text_model),
            "clip_image": count_parameters(clip.image_tower) + count_parameters(clip.image_projection),
            "vae": count_parameters(vae),
            "unet": count_parameters(unet),
        },
        "latent_scaling_factor": latents[2],
        "size_mb": round(folder_megabytes(args.out), 2),
    }
    args.summary.write_text(json.dumps(summary, indent=2) + "\n")
    print(json.dumps(summary, indent=2), flush=True)


if __name__ == "__main__":
    main()
