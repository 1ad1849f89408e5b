"""Sample grids: one row per validation prompt, `numImagesPerPrompt` columns, each row under a
strip that names its prompt.

`samples_before.png` is drawn before the first step and `samples.png` after the last one, with the
same prompts and the same noise, so the two grids differ only by what training changed
(validation.everySteps adds grids while training: reporting/step_samples.py)."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import torch
from PIL import Image, ImageDraw, ImageFont

from personalize.data import fill_template
from personalize.pipeline_io import Models, sampling_pipeline
from personalize.spec import PersonalizationJobSpec

SAMPLES_FILE = "samples.png"
SAMPLES_BEFORE_FILE = "samples_before.png"


def label_height(width: int) -> int:
    """The height of the strip above each row that names its prompt."""
    return max(12, min(width // 24, 28))


def image_grid(rows: list[list[Image.Image]], labels: Optional[list[str]] = None) -> Image.Image:
    """The images row by row; with `labels`, each row under a strip that names it (its prompt)."""
    width, height = rows[0][0].size
    columns = max(len(r) for r in rows)
    strip = label_height(width * columns) if labels else 0
    grid = Image.new("RGB", (width * columns, (strip + height) * len(rows)), "white")
    draw = ImageDraw.Draw(grid)
    font = ImageFont.load_default(size=max(strip - 4, 8)) if labels else None
    for r, images in enumerate(rows):
        top = r * (strip + height)
        if labels:
            draw.text((2, top + 1), _fit(draw, labels[r], font, grid.width - 4), fill="black", font=font)
        for c, image in enumerate(images):
            grid.paste(image, (c * width, top + strip))
    return grid


def _fit(draw: ImageDraw.ImageDraw, text: str, font, width: int) -> str:
    """`text`, cut with an ellipsis where it is wider than `width` pixels."""
    if draw.textlength(text, font=font) <= width:
        return text
    while text and draw.textlength(text + "...", font=font) > width:
        text = text[:-1]
    return text + "..."


def grid_tiles(grid: Image.Image, tile: int, labelled: bool = True) -> list[Image.Image]:
    """The images of a grid written by `image_grid` (row by row), each `tile` pixels square."""
    columns = grid.width // tile
    strip = label_height(grid.width) if labelled else 0
    rows = grid.height // (tile + strip)
    return [grid.crop((c * tile, r * (tile + strip) + strip, (c + 1) * tile, r * (tile + strip) + strip + tile))
            for r in range(rows) for c in range(columns)]


@torch.no_grad()
def write_samples(
    spec: PersonalizationJobSpec, models: Models, prompt_token: str, resolution: int, device: torch.device, path: Path
) -> list[str]:
    """Generate the validation grid with the models as they are now; returns the prompts used
    (none: `validation.prompts: []` asks for no samples, and no grid is written)."""
    options = spec.validation
    prompts = [fill_template(p, prompt_token, spec.concept.class_noun) for p in options.prompts]
    if not prompts:
        return []
    pipe = sampling_pipeline(models).to(device)
    generator = torch.Generator(device="cpu").manual_seed(spec.training.seed)
    rows = []
    for prompt in prompts:
        rows.append(
            pipe(
                prompt,
                num_images_per_prompt=options.num_images_per_prompt,
                height=resolution,
                width=resolution,
                num_inference_steps=options.inference_steps,
                guidance_scale=options.guidance_scale,
                generator=generator,
            ).images
        )
    path.parent.mkdir(parents=True, exist_ok=True)
    image_grid(rows, prompts).save(path)
    return prompts
