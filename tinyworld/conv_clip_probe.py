"""Contrastive probe: does a convolutional image tower make the tiny CLIP separate shapes?

    python tinyworld/conv_clip_probe.py --minutes 25 --steps 600 --threads 1 --out <dir>

Trains, with pretrain.py's CLIP objective (contrastive + shape/pattern swap loss, its batch and
learning-rate schedule), a model whose text side is the tiny world's CLIP text tower (new, as in
pretraining) and whose image side is a small transformers ResNetModel (batch norm) with a linear
projection, instead of the CLIP ViT (the world's ConvClip, without pretraining's attribute heads:
the contrastive signal alone). Then measures zero-shot accuracy on the same 800 real
renders evaluate.py uses for a CLIP (its EVAL_SEED), so the numbers compare with the card's.
A probe only: the model is not saved. (The recorded results in tinyworld/attempts/ came from an
earlier copy of this class with the text tower inside a whole CLIPModel: same architecture, other
initial weights.)
Writes <out>/conv_clip_probe.json and the loss log <out>/conv_clip_probe_log.csv.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import evaluate  # noqa: E402  (sibling scripts: they put trainer/ on sys.path)
import pretrain  # noqa: E402
from personalize.world.tiny_models import TinyConfig, build_conv_clip, load_tokenizer  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=600, help="the schedule's length (the time cap may end it first)")
    parser.add_argument("--minutes", type=float, default=25.0, help="time cap; the learning rate anneals within it")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--swap-images", type=int, default=32)
    parser.add_argument("--pool-size", type=int, default=8000)
    parser.add_argument("--eval-images", type=int, default=800)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    if args.steps < 1 or args.minutes <= 0:
        parser.error("--steps must be >= 1 and --minutes > 0")
    torch.set_num_threads(args.threads)
    args.out.mkdir(parents=True, exist_ok=True)
    cfg = TinyConfig.pretrained()
    tokenizer = load_tokenizer()
    pool = pretrain.WorldPool(args.pool_size, cfg.image_size, args.seed)
    model = build_conv_clip(cfg, args.seed)  # the world's ConvClip, trained without its attribute heads
    log = pretrain.LossLog(args.out / "conv_clip_probe_log.csv")
    started = time.time()
    model, seconds, steps_done = pretrain.train_clip(
        cfg, pool, tokenizer, args.steps, args.batch, args.seed, log, lr=args.lr, swap_images=args.swap_images, attribute_weight=0.0,
        max_seconds=args.minutes * 60, model=model)
    images, attrs_list = evaluate.real_images(args.eval_images, evaluate.EVAL_SEED)
    report = {
        "image_tower": "ResNetModel 32/64/128, basic blocks, batch norm", "steps": steps_done, "batch": args.batch,
        "lr": args.lr, "swap_images": args.swap_images, "pool_size": args.pool_size, "train_seconds": round(seconds, 1),
        "zero_shot_real_renders": {"n": len(images), "accuracy": evaluate.accuracies(model, tokenizer, images, attrs_list)},
        "text_cosine_between_attribute_values": evaluate.text_separation(model, tokenizer),
        "wall_seconds": round(time.time() - started, 1),
    }
    (args.out / "conv_clip_probe.json").write_text(json.dumps(report, indent=1) + "\n")
    print(json.dumps(report), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
