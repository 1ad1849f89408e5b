"""Measure what the pretrained tiny world learned and write the model card.

    python tinyworld/evaluate.py            # after tinyworld/pretrain.py

Measures, with the tiny CLIP as a zero-shot classifier (shape, colour, pattern, background):
  (a) real held-in world images: the ceiling;
  (b) images the pipeline generates for held-in prompts, at a few guidance scales;
  (c) real images of the held-out concepts (combinations CLIP never saw).
Writes tinyworld/evaluation.json, tinyworld/pretrain_loss.png, tinyworld/samples.png and
tinyworld/MODEL_CARD.md (numbers filled from the measurements and pretrain_summary.json).
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT / "trainer"))

from diffusers import DDIMScheduler, StableDiffusionPipeline  # noqa: E402
from PIL import Image  # noqa: E402

from personalize.world import shapes  # noqa: E402
from personalize.world.provenance import held_out_by  # noqa: E402
from personalize.world.scoring import (  # noqa: E402
    ZERO_SHOT_CLASSES,
    chance_level,
    clip_t_score,
    load_tiny_clip,
    zero_shot_accuracy,
)
from personalize.world.tiny_models import TINY_WORLD_DIR, count_parameters  # noqa: E402

HERE = REPO_ROOT / "tinyworld"
ATTRIBUTES = tuple(ZERO_SHOT_CLASSES)  # shape, colour, background, pattern
EVAL_SEED = 12345  # different from every pretraining seed stream


def accuracies(clip, tokenizer, images, attrs_list) -> dict[str, float]:
    return {
        a: round(zero_shot_accuracy(clip, tokenizer, images, [getattr(x, a) for x in attrs_list], a), 4)
        for a in ATTRIBUTES
    }


def real_images(n: int, seed: int):
    rng = np.random.default_rng([seed, 0])
    pairs = [shapes.sample_labelled(rng) for _ in range(n)]
    return [p[0] for p in pairs], [p[1] for p in pairs]


def held_out_images(per_concept: int, seed: int, world: Path):
    """Renders of the concepts the world at `world` never saw in pretraining."""
    unseen = held_out_by(world)
    rng = np.random.default_rng([seed, 1])
    images, attrs_list = [], []
    for concept in (c for c in shapes.HELD_OUT_CONCEPTS if c.name in unseen):
        for _ in range(per_concept):
            attrs = shapes.concept_attributes(concept, rng)
            images.append(shapes.render(attrs, rng))
            attrs_list.append(attrs)
    return images, attrs_list


def load_pipeline(path: Path) -> StableDiffusionPipeline:
    pipe = StableDiffusionPipeline.from_pretrained(path, dtype=torch.float32)
    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@torch.no_grad()
def generate(pipe, prompts: list[str], guidance: float, seed: int, steps: int, batch: int = 64) -> list[Image.Image]:
    images: list[Image.Image] = []
    for start in range(0, len(prompts), batch):
        generator = torch.Generator().manual_seed(seed + start)
        out = pipe(
            prompts[start : start + batch], num_inference_steps=steps, guidance_scale=guidance,
            height=32, width=32, generator=generator,
        )
        images.extend(out.images)
    return images


def held_in_prompt_attributes(n: int, seed: int) -> list[shapes.Attributes]:
    rng = np.random.default_rng([seed, 2])
    return [shapes.sample_attributes(rng) for _ in range(n)]


def text_separation(clip, tokenizer) -> dict[str, float]:
    """Mean cosine between captions that differ only in one attribute (lower = better separated)."""
    from personalize.world.scoring import text_embeddings

    base = {"shape": "triangle", "colour": "red", "pattern": "striped", "background": "grass"}
    out = {}
    for attribute in ATTRIBUTES:
        values = ZERO_SHOT_CLASSES[attribute]
        captions = [shapes.FULL_CAPTION_TEMPLATES[0].format(**{**base, attribute: v}) for v in values]
        emb = text_embeddings(clip, tokenizer, captions)
        n = len(values)
        out[attribute] = round(float(((emb @ emb.T).sum() - n) / (n * n - n)), 4)
    return out


def clip_report(clip_dir: Path, n_real: int) -> dict:
    """Zero-shot accuracy on real renders (held-in and held-out) and text separation of one CLIP."""
    clip, tokenizer = load_tiny_clip(clip_dir)
    clip.float()
    images, attrs_list = real_images(n_real, EVAL_SEED)
    report = {"clip": str(clip_dir), "real_held_in": {"n": len(images), "accuracy": accuracies(clip, tokenizer, images, attrs_list)}}
    images, attrs_list = held_out_images(40, EVAL_SEED, clip_dir.parent)
    report["real_held_out_concepts"] = {"n": len(images), "accuracy": accuracies(clip, tokenizer, images, attrs_list)}
    report["text_cosine_between_attribute_values"] = text_separation(clip, tokenizer)
    return report


def plot_losses(log_path: Path, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    series: dict[str, list[tuple[int, float]]] = {}
    with log_path.open() as f:
        for row in csv.DictReader(f):
            series.setdefault(row["stage"], []).append((int(row["step"]), float(row["loss"])))
    fig, axes = plt.subplots(1, len(series), figsize=(4.2 * len(series), 3.2))
    titles = {"clip": "CLIP contrastive loss", "vae": "VAE reconstruction loss", "unet": "UNet epsilon MSE"}
    for ax, (stage, points) in zip(np.atleast_1d(axes), series.items()):
        steps, losses = np.array(points).T
        window = max(1, len(losses) // 50)
        smooth = np.convolve(losses, np.ones(window) / window, mode="valid")
        ax.plot(steps, losses, alpha=0.25, lw=0.6)
        ax.plot(steps[window - 1 :], smooth, lw=1.5)
        ax.set_title(titles.get(stage, stage))
        ax.set_xlabel("step")
        if stage != "clip":
            ax.set_yscale("log")
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)


def sample_grid(pipe, out: Path, guidance: float, steps: int, seed: int, per_row: int = 6, scale: int = 3) -> list[str]:
    """Rows: a real example, then `per_row` generated samples for that row's caption."""
    rng = np.random.default_rng([seed, 3])
    rows = [shapes.sample_attributes(rng) for _ in range(8)]
    prompts = [shapes.caption_for(a) for a in rows]
    generated = generate(pipe, [p for p in prompts for _ in range(per_row)], guidance, seed, steps)
    tile = 32
    grid = Image.new("RGB", ((per_row + 1) * tile + 4, len(rows) * tile), "white")
    for r, attrs in enumerate(rows):
        grid.paste(shapes.render(attrs, rng), (0, r * tile))
        for c in range(per_row):
            grid.paste(generated[r * per_row + c], ((c + 1) * tile + 4, r * tile))
    grid.resize((grid.width * scale, grid.height * scale), Image.NEAREST).save(out)
    return prompts


def folder_mb(path: Path) -> float:
    return round(sum(f.stat().st_size for f in path.rglob("*") if f.is_file()) / 1e6, 2)


def _row(name: str, acc: dict[str, float], chance: dict[str, float] | None = None) -> str:
    cells = " | ".join(f"{acc[a]:.1%}" for a in ATTRIBUTES)
    return f"| {name} | {cells} |"


def clip_objective(summary: dict) -> str:
    parts = ["contrastive"]
    if summary.get("clip_swap", {}).get("images_per_batch"):
        parts.append(f"shape/pattern swap on {summary['clip_swap']['images_per_batch']} images per batch")
    if summary.get("clip_attribute_heads_weight"):
        parts.append(f"attribute heads x{summary['clip_attribute_heads_weight']:g}")
    return " + ".join(parts)


def write_model_card(results: dict, summary: dict | None, out: Path) -> None:
    """Markdown card; every number comes from evaluation.json / pretrain_summary.json."""
    chance = results["chance"]
    lines = [
        "# Tiny world: model card",
        "",
        "A tiny text-to-image model trained from scratch on CPU on the synthetic shapes world",
        "(`trainer/personalize/world/shapes.py`), shipped in `trainer/personalize/assets/tiny_world/`",
        "so the trainer, its tests, the demo and the benchmark run on a really trained model without",
        "any download. It is a Stable Diffusion pipeline in miniature: AutoencoderKL (32x32 RGB <->",
        "8x8x4 latents) + UNet2DConditionModel conditioned on the frozen text tower of a tiny CLIP,",
        "the real CLIP BPE tokenizer (49,408 tokens, ids identical to open_clip's), DDPM scheduler",
        "(epsilon prediction, scaled-linear betas). `clip/` holds the whole tiny CLIP, used for",
        "CLIP-I / CLIP-T scores and zero-shot classification (`personalize.world.scoring`): a ConvClip",
        "(`personalize.world.conv_clip`: the CLIP text tower the UNet conditions on, with a small ResNet",
        "image tower) or, in worlds before it, a transformers CLIPModel.",
        "",
        "Held-out concepts (never in pretraining, any background; `held_out_concepts.json`): "
        + ", ".join(f"`{c.name}`" for c in shapes.HELD_OUT_CONCEPTS if c.name in results["held_out"])
        + ".",
        "",
        "## Reproduce",
        "",
        "```",
    ]
    if summary and summary.get("commands"):  # a world made in several runs lists them
        lines += summary["commands"]
    elif summary:
        steps = summary["steps"]
        lines.append(
            f"python tinyworld/pretrain.py --seed {summary['seed']} --clip-steps {steps['clip']} "
            f"--vae-steps {steps['vae']} --unet-steps {steps['unet']} --threads {summary['threads']}"
        )
    lines += ["python tinyworld/evaluate.py", "```", ""]
    if summary and summary.get("time_capped"):
        lines += [
            "Some stages ran under a wall-clock cap (`--clip-max-minutes`, `--unet-max-minutes`: a shared",
            "machine). Under a cap a stage's learning-rate schedule follows elapsed time when it runs slower",
            "than planned, so these commands reproduce the weights closely, not bit-for-bit.",
            "",
        ]
    if summary:
        wall = summary["wall_seconds"]
        params = summary["parameters"]
        lines += [
            "## Training (measured)",
            "",
            "| part | parameters | steps | batch | wall time |",
            "|---|---|---|---|---|",
            f"| world rendering ({summary['pool_size']} images) | - | - | - | {wall['render_pool_s'] / 60:.1f} min |",
            f"| CLIP ({clip_objective(summary)}) | {params['clip']:,} (text {params['clip_text']:,}, "
            f"image {params.get('clip_image', params.get('clip_vision', 0)):,}) "
            f"| {summary['steps']['clip']} | {summary['batch']['clip']} | {wall['clip_s'] / 60:.1f} min |",
            f"| VAE (MSE + L1 + 1e-6 KL) | {params['vae']:,} | {summary['steps']['vae']} | {summary['batch']['vae']} "
            f"| {wall['vae_s'] / 60:.1f} min |",
            f"| UNet (epsilon MSE, min-SNR-5, 10% caption dropout, EMA 0.999) | {params['unet']:,} "
            f"| {summary['steps']['unet']} (planned {summary.get('unet_steps_planned', summary['steps']['unet'])}) "
            f"| {summary['batch']['unet']} | {wall['unet_s'] / 60:.1f} min |",
        ]
        total_seconds = sum(wall.values())
        lines += [
            "",
            f"Total wall time {total_seconds / 60:.1f} min (rendering, training, latent encoding) with torch.set_num_threads({summary['threads']}) on a"
            " 2-core machine shared with other jobs. Latent scaling factor"
            f" {summary['latent_scaling_factor']:.4f} (1/std of the training latents).",
            "",
        ]
    sizes = results["size_mb"]
    lines += [
        "## Size",
        "",
        f"Total {sizes['total']} MB on disk (fp16 safetensors): UNet {sizes['unet']} MB, VAE {sizes['vae']} MB,"
        f" text encoder {sizes['text_encoder']} MB, tokenizer {sizes['tokenizer']} MB, CLIP {sizes['clip']} MB."
        " Most of the text encoder is the 49,408 x hidden token-embedding table.",
        "",
        "![loss curves](pretrain_loss.png)",
        "",
        "## Evidence it learned: zero-shot classification by the tiny CLIP",
        "",
        "Accuracy of the tiny CLIP's zero-shot prediction (prompt-ensembled class texts) of each",
        f"attribute. Generated images: one per held-in prompt (\"{shapes.FULL_CAPTION_TEMPLATES[0]}\"),"
        f" {results['sampling']['scheduler']} {results['sampling']['steps']} steps, 32x32; seed {results['eval_seed']}.",
        "",
        "| images | " + " | ".join(ATTRIBUTES) + " |",
        "|---|" + "---|" * len(ATTRIBUTES),
        _row("chance", chance),
        _row(f"real held-in images (ceiling, n={results['real_held_in']['n']})", results["real_held_in"]["accuracy"]),
        _row(
            f"real held-out concept images (n={results['real_held_out_concepts']['n']})",
            results["real_held_out_concepts"]["accuracy"],
        ),
    ]
    for guidance, entry in results["generated_held_in"].items():
        lines.append(_row(f"generated, guidance {guidance} (n={entry['n']})", entry["accuracy"]))
    lines += [
        "",
        "CLIP-T of generated images with their own prompt vs with another image's prompt:",
        "",
        "| guidance | own prompt | other prompt | generation time |",
        "|---|---|---|---|",
    ]
    for guidance, entry in results["generated_held_in"].items():
        lines.append(
            f"| {guidance} | {entry['clip_t_own_prompt']:.3f} | {entry['clip_t_other_prompt']:.3f}"
            f" | {entry['generation_seconds']} s |"
        )
    ceiling = results["real_held_in"]["accuracy"]
    weakest = min(ATTRIBUTES, key=lambda a: ceiling[a] - chance[a])
    lines += [
        "",
        "## Limitations",
        "",
        f"- The weakest attribute for the tiny CLIP itself is **{weakest}**: {ceiling[weakest]:.1%} on real"
        f" images vs {chance[weakest]:.1%} chance. Generated-image accuracy for an attribute cannot"
        " exceed what this classifier can see, so read the generated rows against the real-image row.",
    ]
    separation = results.get("text_cosine_between_attribute_values")
    if separation:
        lines.append(
            "- The text tower (also the diffusion model's conditioner) separates attribute values unevenly:"
            " mean cosine between captions differing only in "
            + ", ".join(f"{a} {separation[a]:.2f}" for a in ATTRIBUTES)
            + ". A near-1 value means the prompt barely tells the UNet which value is wanted; improving it"
            " needs a longer CLIP pretraining, and then retraining the UNet on the new text tower."
        )
    lines += [
        "- Images are 32x32 and the VAE is small: generated samples are blurrier than the renders;"
        " thin patterns (stripes, dots) survive only partly.",
        "- The pipeline folder's scheduler is DDPM as trained; the numbers above use DDIM sampling.",
    ]
    lines += [
        "",
        f"## Samples (guidance {results['grid_guidance']})",
        "",
        "Each row: a real world image (left) and six generated samples for its caption.",
        "",
        "![samples](samples.png)",
        "",
        "Rows: " + "; ".join(f"{i + 1}. \"{p}\"" for i, p in enumerate(results["grid_prompts"])),
        "",
    ]
    out.write_text("\n".join(lines))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--world", type=Path, default=TINY_WORLD_DIR)
    parser.add_argument("--n-real", type=int, default=800)
    parser.add_argument("--n-generated", type=int, default=256)
    parser.add_argument("--guidance", type=float, nargs="+", default=[1.0, 3.0, 7.5])
    parser.add_argument("--steps", type=int, default=25, help="DDIM sampling steps")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out-dir", type=Path, default=HERE)
    parser.add_argument("--clip-only", type=Path, default=None, metavar="CLIP_DIR",
                        help="only score this CLIP folder (real-image zero-shot accuracy, text separation); print JSON")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    if args.clip_only:
        print(json.dumps(clip_report(args.clip_only, args.n_real), indent=2))
        return

    clip, tokenizer = load_tiny_clip(args.world / "clip")
    pipe = load_pipeline(args.world)
    results: dict = {"eval_seed": EVAL_SEED, "chance": {a: round(chance_level(a), 4) for a in ATTRIBUTES},
                     "held_out": sorted(held_out_by(args.world))}

    started = time.time()
    images, attrs_list = real_images(args.n_real, EVAL_SEED)
    results["real_held_in"] = {"n": len(images), "accuracy": accuracies(clip, tokenizer, images, attrs_list)}
    images, attrs_list = held_out_images(40, EVAL_SEED, args.world)
    results["real_held_out_concepts"] = {"n": len(images), "accuracy": accuracies(clip, tokenizer, images, attrs_list)}

    prompt_attrs = held_in_prompt_attributes(args.n_generated, EVAL_SEED)
    prompts = [shapes.caption_for(a) for a in prompt_attrs]
    results["generated_held_in"] = {}
    for guidance in args.guidance:
        t0 = time.time()
        generated = generate(pipe, prompts, guidance, EVAL_SEED, args.steps)
        matched = np.mean([clip_t_score(clip, tokenizer, [g], p) for g, p in zip(generated, prompts)])
        shuffled = np.mean([clip_t_score(clip, tokenizer, [g], p) for g, p in zip(generated, np.roll(prompts, 1))])
        results["generated_held_in"][str(guidance)] = {
            "n": len(generated),
            "accuracy": accuracies(clip, tokenizer, generated, prompt_attrs),
            "clip_t_own_prompt": round(float(matched), 4),
            "clip_t_other_prompt": round(float(shuffled), 4),
            "generation_seconds": round(time.time() - t0, 1),
        }
        print(guidance, results["generated_held_in"][str(guidance)], flush=True)
    results["text_cosine_between_attribute_values"] = text_separation(clip, tokenizer)
    results["sampling"] = {"scheduler": "DDIM", "steps": args.steps, "size": 32}
    results["evaluation_seconds"] = round(time.time() - started, 1)
    results["parameters"] = {
        "unet": count_parameters(pipe.unet),
        "vae": count_parameters(pipe.vae),
        "text_encoder": count_parameters(pipe.text_encoder),
        "clip": count_parameters(clip),
    }
    results["size_mb"] = {
        "total": folder_mb(args.world),
        **{part: folder_mb(args.world / part) for part in ("unet", "vae", "text_encoder", "tokenizer", "clip")},
    }

    best = max(results["generated_held_in"], key=lambda g: np.mean(list(results["generated_held_in"][g]["accuracy"].values())))
    results["grid_guidance"] = float(best)
    results["grid_prompts"] = sample_grid(pipe, args.out_dir / "samples.png", float(best), args.steps, EVAL_SEED)
    log_path = args.out_dir / "pretrain_log.csv"
    if log_path.exists():
        plot_losses(log_path, args.out_dir / "pretrain_loss.png")
    (args.out_dir / "evaluation.json").write_text(json.dumps(results, indent=2) + "\n")
    summary_path = args.out_dir / "pretrain_summary.json"
    summary = json.loads(summary_path.read_text()) if summary_path.exists() else None
    write_model_card(results, summary, args.out_dir / "MODEL_CARD.md")
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
