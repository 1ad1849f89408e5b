"""The README's pictures, made from what `bash demo.sh` leaves in demo-output/:

    docs/images/demo_strip.png        the concept photos, then each validation prompt's samples
                                      before and after training, every row labelled
    docs/images/demo_convergence.png  the run's convergence plot, reduced to a palette

    .venv/bin/python tools/demo_strip.py [--demo demo-output] [--config demo/job.yaml] [--images docs/images]

The prompts are the job's validation prompts with the run's identifier (result.json), exactly as
the trainer wrote them above the rows of its grids.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import yaml
from PIL import Image, ImageDraw, ImageFont

from personalize.data import fill_template
from personalize.samples import SAMPLES_BEFORE_FILE, SAMPLES_FILE, grid_tiles
from personalize.spec import parse_job

SCALE = 3  # the tiny world's 32-px images, enlarged pixel for pixel so they can be seen
GAP = 16
TEXT = 18
FONT = 13


def prompt_rows(grid: Image.Image, per_prompt: int) -> list[list[Image.Image]]:
    """A trainer grid (one labelled row per prompt) as its rows of images."""
    tiles = grid_tiles(grid, grid.width // per_prompt)
    return [tiles[i:i + per_prompt] for i in range(0, len(tiles), per_prompt)]


def make_strip(photos: list[Image.Image], prompts: list[str], before: list[list[Image.Image]],
               after: list[list[Image.Image]], after_label: str) -> Image.Image:
    """Photos in one row; then per prompt its label, and its before and after images side by side."""
    tile = photos[0].width * SCALE
    per_prompt = len(before[0])
    width = max(len(photos) * tile, 2 * per_prompt * tile + GAP)
    height = TEXT + tile + len(prompts) * (2 * TEXT + tile + GAP // 2)
    strip = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(strip)
    font = ImageFont.load_default(size=FONT)

    def row(images: list[Image.Image], left: int, top: int) -> None:
        for i, image in enumerate(images):
            strip.paste(image.resize((tile, tile), Image.NEAREST), (left + i * tile, top))

    draw.text((2, 2), f"the {len(photos)} concept photos the job trains on", fill="black", font=font)
    row(photos, 0, TEXT)
    top = TEXT + tile
    right = per_prompt * tile + GAP
    for prompt, old, new in zip(prompts, before, after):
        top += GAP // 2
        draw.text((2, top + 2), f'prompt: "{prompt}"', fill="black", font=font)
        draw.text((2, top + TEXT + 2), "before training", fill="dimgray", font=font)
        draw.text((right + 2, top + TEXT + 2), after_label, fill="dimgray", font=font)
        row(old, 0, top + 2 * TEXT)
        row(new, right, top + 2 * TEXT)
        top += 2 * TEXT + tile
    return strip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--demo", type=Path, default=Path("demo-output"))
    parser.add_argument("--config", type=Path, default=Path("demo/job.yaml"))
    parser.add_argument("--images", type=Path, default=Path("docs/images"))
    args = parser.parse_args()

    spec = parse_job(yaml.safe_load(args.config.read_text())).spec
    result = json.loads((args.demo / "result.json").read_text())
    prompts = [fill_template(p, result["identifier"], spec.concept.class_noun) for p in spec.validation.prompts]
    photos = [Image.open(p).convert("RGB") for p in sorted((args.demo / "concept-images").glob("*.png"))]
    per_prompt = spec.validation.num_images_per_prompt
    before, after = (prompt_rows(Image.open(args.demo / name).convert("RGB"), per_prompt)
                     for name in (SAMPLES_BEFORE_FILE, SAMPLES_FILE))
    stop = result["earlyStop"]
    after_label = f"after: stopped at step {stop['step']} of {result['progress']['maxSteps']} ({stop['reason']})"

    args.images.mkdir(parents=True, exist_ok=True)
    make_strip(photos, prompts, before, after, after_label).save(args.images / "demo_strip.png", optimize=True)
    # A palette keeps the plot's lines and text and makes the file a fraction of matplotlib's RGBA.
    plot = Image.open(args.demo / "convergence.png").convert("RGB")
    plot.quantize(colors=64).save(args.images / "demo_convergence.png", optimize=True)
    for name in ("demo_strip.png", "demo_convergence.png"):
        print(f"wrote {args.images / name} ({(args.images / name).stat().st_size // 1024} KiB)")


if __name__ == "__main__":
    main()
