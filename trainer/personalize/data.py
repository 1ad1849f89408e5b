"""The concept's training examples: images from a folder and the captions that go with them.

Images are resized (shorter side to `resolution`) and center-cropped to a square, then scaled
to [-1, 1], the range Stable Diffusion's VAE expects. Captions come from the concept's
templates with `{token}` / `{class_noun}` substituted.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np
import torch
from PIL import Image

from personalize.preflight import concept_folder, list_image_files, open_rgb
from personalize.spec import Concept


def fill_template(template: str, identifier: str, class_noun: Optional[str]) -> str:
    """Substitute `{token}` and `{class_noun}`; collapse the double space an empty noun leaves."""
    text = template.replace("{token}", identifier).replace("{class_noun}", class_noun or "")
    return " ".join(text.split())


def caption_templates(concept: Concept) -> list[str]:
    """The caption template plus the extra ones; one is drawn per example."""
    return [concept.caption_template, *concept.captions]


def load_image(path: Path, resolution: int) -> torch.Tensor:
    """One image as a float tensor [3, resolution, resolution] in [-1, 1]."""
    rgb = open_rgb(path)
    # Resize the shorter side to `resolution`, then take the central square.
    width, height = rgb.size
    scale = resolution / min(width, height)
    new_size = (max(resolution, round(width * scale)), max(resolution, round(height * scale)))
    rgb = rgb.resize(new_size, Image.Resampling.BICUBIC)
    left = (new_size[0] - resolution) // 2
    top = (new_size[1] - resolution) // 2
    rgb = rgb.crop((left, top, left + resolution, top + resolution))
    pixels = np.asarray(rgb, dtype=np.float32) / 127.5 - 1.0  # [H, W, 3] in [-1, 1]
    return torch.from_numpy(pixels).permute(2, 0, 1).contiguous()


def load_images(folder: Path, resolution: int) -> tuple[torch.Tensor, list[Path]]:
    """All images of a folder as one tensor [N, 3, resolution, resolution] in [-1, 1]."""
    files = list_image_files(folder)
    return torch.stack([load_image(p, resolution) for p in files]), files


@dataclass
class ConceptExamples:
    """The training examples: N images and the caption templates (filled per example)."""

    images: torch.Tensor  # [N, 3, H, W] in [-1, 1]
    files: list[Path]
    captions: list[str]  # filled caption candidates; one is drawn per example

    def __len__(self) -> int:
        return self.images.shape[0]

    def subset(self, indices: list[int]) -> "ConceptExamples":
        return ConceptExamples(self.images[indices], [self.files[i] for i in indices], self.captions)

    def sample(self, batch_size: int, generator: torch.Generator) -> tuple[torch.Tensor, list[str]]:
        """A random batch (with replacement across steps, without within a batch when possible)."""
        n = len(self)
        if batch_size <= n:
            idx = torch.randperm(n, generator=generator)[:batch_size]
        else:
            idx = torch.randint(n, (batch_size,), generator=generator)
        caption_idx = torch.randint(len(self.captions), (batch_size,), generator=generator)
        return self.images[idx], [self.captions[int(i)] for i in caption_idx]


def load_concept_examples(concept: Concept, identifier: str, resolution: int) -> ConceptExamples:
    """Read the concept's images; fill its caption templates with the chosen identifier."""
    images, files = load_images(concept_folder(concept), resolution)
    captions = [fill_template(t, identifier, concept.class_noun) for t in caption_templates(concept)]
    return ConceptExamples(images, files, captions)
