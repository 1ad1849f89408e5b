"""Stage 4 of the tiny world: keep training the tiny CLIP's image tower against its frozen text tower.

    python tinyworld/refine_clip_vision.py --seed 0 --steps 1500     # after tinyworld/pretrain.py

Why: after pretraining, the tiny CLIP recognised colour and background almost perfectly but shape
only a little above chance (tinyworld/MODEL_CARD.md). The text tower is also the diffusion
model's frozen text encoder, so it must not change; only the vision tower, its projection and
the temperature are trained (the text side is locked, as in "LiT" with the roles swapped).
Rewrites assets/tiny_world/clip/ (fp16) and appends 'clip_vision' rows to pretrain_log.csv.
"""

from __future__ import annotations

import argparse
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
sys.path.insert(0, str(REPO_ROOT / "tinyworld"))

from transformers import CLIPModel  # noqa: E402

from personalize.world.scoring import uint8_batch_to_pixels  # noqa: E402
from personalize.world.tiny_models import TINY_WORLD_DIR, load_tokenizer  # noqa: E402
from pretrain import WorldPool, cosine_lr, set_lr, tokenize  # noqa: E402


@torch.no_grad()
def text_features(clip: CLIPModel, tokenizer, captions: list[str], cache: dict[str, torch.Tensor]) -> torch.Tensor:
    """(B, projection_dim) normalised text embeddings from the frozen text tower (cached)."""
    missing = sorted(set(captions) - cache.keys())
    if missing:
        out = clip.get_text_features(input_ids=tokenize(tokenizer, missing, None))
        out = getattr(out, "pooler_output", out)
        cache.update(zip(missing, F.normalize(out.float(), dim=-1)))
    return torch.stack([cache[c] for c in captions])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--steps", type=int, default=1500)
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--lr", type=float, default=5e-4)
    parser.add_argument("--pool-size", type=int, default=20000)
    parser.add_argument("--max-minutes", type=float, default=None, help="safety cap on training time")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--world", type=Path, default=TINY_WORLD_DIR)
    parser.add_argument("--log", type=Path, default=REPO_ROOT / "tinyworld" / "pretrain_log.csv")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)

    clip = CLIPModel.from_pretrained(args.world / "clip", dtype=torch.float32)
    tokenizer = load_tokenizer()
    clip.requires_grad_(False)
    trainable = list(clip.vision_model.parameters()) + list(clip.visual_projection.parameters()) + [clip.logit_scale]
    for p in trainable:
        p.requires_grad_(True)
    clip.train()
    clip.text_model.eval()

    started = time.time()
    pool = WorldPool(args.pool_size, clip.config.vision_config.image_size, args.seed + 1000)
    print(f"rendered {len(pool)} images in {time.time() - started:.0f}s", flush=True)
    rng = np.random.default_rng([args.seed, 5])
    optimizer = torch.optim.AdamW(trainable, lr=args.lr, weight_decay=0.05)
    cache: dict[str, torch.Tensor] = {}
    log = args.log.open("a")
    started = time.time()
    max_seconds = args.max_minutes * 60 if args.max_minutes else None
    steps_done = 0
    for step in range(args.steps):
        if max_seconds is not None and time.time() - started > max_seconds:
            print(f"time cap reached after {step} steps", flush=True)
            break
        indices = rng.integers(len(pool), size=args.batch)
        captions = pool.captions(indices, rng)
        text = text_features(clip, tokenizer, captions, cache)  # (B, D), frozen
        image = clip.get_image_features(pixel_values=uint8_batch_to_pixels(pool.images[indices]))
        image = F.normalize(getattr(image, "pooler_output", image), dim=-1)
        logits = clip.logit_scale.exp() * image @ text.T  # (B, B)
        # Identical captions in a batch are true matches, not negatives: soft targets over them.
        same = torch.tensor([[a == b for b in captions] for a in captions], dtype=torch.float32)
        targets = same / same.sum(dim=1, keepdim=True)
        loss = 0.5 * (F.cross_entropy(logits, targets) + F.cross_entropy(logits.T, targets))
        set_lr(optimizer, cosine_lr(step, args.steps, args.lr, warmup=50))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(trainable, 1.0)
        optimizer.step()
        with torch.no_grad():
            clip.logit_scale.clamp_(0, math.log(100))
        steps_done = step + 1
        log.write(f"clip_vision,{step},{loss.item():.6f},{optimizer.param_groups[0]['lr']:.3e},{time.time() - started:.1f}\n")
        if step % 50 == 0:
            log.flush()
            print(f"[clip_vision] step {step} loss {loss.item():.4f} {time.time() - started:.0f}s", flush=True)
    log.close()

    tmp = args.world / "clip.tmp"
    clip.eval().to(torch.float16).save_pretrained(tmp, safe_serialization=True)
    shutil.rmtree(args.world / "clip")
    tmp.rename(args.world / "clip")
    print(f"clip_vision: {steps_done} steps in {(time.time() - started) / 60:.1f} min", flush=True)


if __name__ == "__main__":
    main()
