"""What the CLIP criterion scores on a CLIPModel folder with a real-style image processor, before
and after the criterion used the folder's own processor.

The model is a tiny, randomly initialised CLIPModel with ViT-B/32's input geometry (224 pixels,
patch 32); its processor is `CLIPImageProcessor()`'s defaults, which are OpenAI ViT-B/32's
(shortest edge 224, center crop 224, bicubic, CLIP's mean and std). Images are tiny-world renders
at 256 pixels: 4 references of one concept, 4 more of it and 4 of another concept as the
"generated" samples.

- before: the tiny world's preprocessing (plain resize to 224, scaled to [-1, 1]), what the
  criterion applied to any CLIP folder;
- after: `personalize.clip_check.load_clip_scorer`, the folder's processor.

Random weights: the numbers show how far the criterion's input moved, not how well a CLIP tells
concepts apart.

    python benchmarks/clip_preprocessing.py

Writes benchmarks/results/clip_preprocessing.{json,md}.
"""

from __future__ import annotations

import dataclasses
import json
import tempfile
from pathlib import Path

import numpy as np
import torch
from transformers import CLIPImageProcessor

from personalize.clip_check import load_clip_scorer
from personalize.world.scoring import clip_i_score, image_embeddings
from personalize.world.shapes import concept_attributes, concept_by_name, render
from personalize.world.tiny_models import TinyConfig, build_clip

RESULTS = Path(__file__).parent / "results"
SIZE, COUNT = 256, 4
CONCEPT, OTHER = "red_striped_triangle", "blue_dotted_star"


def renders(name: str, seed: int) -> list:
    rng = np.random.default_rng(seed)
    concept = concept_by_name(name)
    return [render(concept_attributes(concept, rng), rng, SIZE) for _ in range(COUNT)]


def main() -> dict:
    torch.manual_seed(0)
    references, same, other = renders(CONCEPT, 0), renders(CONCEPT, 1), renders(OTHER, 2)
    with tempfile.TemporaryDirectory() as folder:
        build_clip(dataclasses.replace(TinyConfig.test(), image_size=224, vision_patch=32)).save_pretrained(folder)
        processor = CLIPImageProcessor()
        processor.save_pretrained(folder)
        clip, preprocess = load_clip_scorer(Path(folder))

        def after(generated):
            gen, ref = image_embeddings(clip, preprocess(generated)), image_embeddings(clip, preprocess(references))
            return float((gen @ ref.T).mean())

        rows = {f"{name} vs {CONCEPT}": {"before": clip_i_score(clip, generated, references), "after": after(generated)}
                for name, generated in ((CONCEPT, same), (OTHER, other))}
        everything = references + same + other  # one image's embedding under the two preprocessings
        agreement = (image_embeddings(clip, everything) * image_embeddings(clip, preprocess(everything))).sum(-1)
    report = {
        "world": None,  # no tiny-world weights: a random CLIP on rendered images
        "model": "CLIPModel, TinyConfig.test() towers, vision image_size 224, patch 32, random init (seed 0)",
        "processor": {k: json.loads(processor.to_json_string())[k]
                      for k in ("size", "crop_size", "image_mean", "image_std", "resample")},
        "images": f"{COUNT} renders at {SIZE}px per set (references {CONCEPT} seed 0)",
        "clip_i": {k: {kk: round(vv, 4) for kk, vv in v.items()} for k, v in rows.items()},
        "same_image_cosine_before_vs_after": {"mean": round(float(agreement.mean()), 4),
                                              "min": round(float(agreement.min()), 4)},
        "command": "python benchmarks/clip_preprocessing.py",
    }
    (RESULTS / "clip_preprocessing.json").write_text(json.dumps(report, indent=1) + "\n")
    lines = ["# CLIP criterion: scores on a real-style processor, before and after the fix", "",
             f"`{report['command']}`; {report['model']}; processor {report['processor']}; {report['images']}.", "",
             "| generated vs references | before (tiny-world preprocessing) | after (the folder's processor) |",
             "|---|---|---|"]
    lines += [f"| {k} | {v['before']:.4f} | {v['after']:.4f} |" for k, v in report["clip_i"].items()]
    same_image = report["same_image_cosine_before_vs_after"]
    lines += ["", f"One image's embedding under the two preprocessings: cosine {same_image['mean']:.4f} "
              f"on average, {same_image['min']:.4f} at least (1 would mean the preprocessing did not matter)."]
    (RESULTS / "clip_preprocessing.md").write_text("\n".join(lines) + "\n")
    return report


if __name__ == "__main__":
    print(json.dumps(main()["clip_i"], indent=1))
