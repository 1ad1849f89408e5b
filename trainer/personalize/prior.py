"""Prior preservation (DreamBooth): class images from the frozen base model, generated before
training, cached in `<output>/class_images/` and reused by a restarted run."""

from __future__ import annotations

from pathlib import Path

import torch

from personalize.data import ConceptExamples, load_image
from personalize.pipeline_io import Models, sampling_pipeline
from personalize.spec import PersonalizationJobSpec

CLASS_IMAGES_DIR = "class_images"
PROMPT_FILE = "prompt.txt"
GENERATION_BATCH = 4


def class_prompt(spec: PersonalizationJobSpec) -> str:
    return spec.prior_preservation.class_prompt or f"a photo of a {spec.concept.class_noun}"


@torch.no_grad()
def prepare_class_images(
    spec: PersonalizationJobSpec, models: Models, output_dir: Path, resolution: int, device: torch.device
) -> ConceptExamples:
    """Generate the missing class images (cached ones are kept if the prompt is unchanged)."""
    options = spec.prior_preservation
    prompt = class_prompt(spec)
    folder = output_dir / CLASS_IMAGES_DIR
    folder.mkdir(parents=True, exist_ok=True)
    prompt_file = folder / PROMPT_FILE
    if prompt_file.exists() and prompt_file.read_text() != prompt:
        for stale in folder.glob("class_*.png"):  # a different class: the cache does not apply
            stale.unlink()
    prompt_file.write_text(prompt)

    wanted = [folder / f"class_{i:05d}.png" for i in range(options.num_class_images)]
    missing = [p for p in wanted if not p.exists()]
    if missing:
        pipe = sampling_pipeline(models).to(device)
        generator = torch.Generator(device="cpu").manual_seed(spec.training.seed)
        for start in range(0, len(missing), GENERATION_BATCH):
            batch = missing[start : start + GENERATION_BATCH]
            images = pipe(
                [prompt] * len(batch),
                height=resolution,
                width=resolution,
                num_inference_steps=options.inference_steps,
                generator=generator,
            ).images
            for path, image in zip(batch, images):
                image.save(path)
    images = torch.stack([load_image(p, resolution) for p in wanted])
    return ConceptExamples(images, wanted, [prompt])
