"""Sample grids: one row per validation prompt, `numImagesPerPrompt` columns.

`samples_before.png` is drawn before the first step and `samples.png` after the last one, with the
same prompts and the same noise, so the two grids differ only by what training changed."""

from __future__ import annotations

from pathlib import Path

import torch
from PIL import Image

from personalize.data import fill_template
from personalize.pipeline_io import Models, sampling_pipeline
from personalize.spec import PersonalizationJobSpec

SAMPLES_FILE = "samples.png"
SAMPLES_BEFORE_FILE = "samples_before.png"


def image_grid(rows: list[list[Image.Image]]) -> Image.Image:
    width, height = rows[0][0].size
    grid = Image.new("RGB", (width * max(len(r) for r in rows), height * len(rows)), "white")
    for r, images in enumerate(rows):
        for c, image in enumerate(images):
            grid.paste(image, (c * width, r * height))
    return grid


def grid_tiles(grid: Image.Image, tile: int) -> list[Image.Image]:
    """The images of a grid written by `image_grid` (row by row), each `tile` pixels square."""
    columns, rows = grid.width // tile, grid.height // tile
    return [grid.crop((c * tile, r * tile, (c + 1) * tile, (r + 1) * tile)) for r in range(rows) for c in range(columns)]


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
    image_grid(rows).save(path)
    return prompts
