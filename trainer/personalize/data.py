"""The concept's training examples: images from a folder and the captions that go with them.

Images are turned upright (EXIF orientation), resized (shorter side to `resolution`) and scaled to
[-1, 1], the range Stable Diffusion's VAE expects. `images` holds their central squares: what the
reference batch uses, always the same. Training batches may be augmented as the method's diffusers
script does (`Augment`: a random instead of the central square, a horizontal flip); those draws
come from the training generator, so the reference batch never sees them. Captions come from the
job's templates with `{token}` / `{class_noun}` substituted, or, for an image with a caption file
beside it (`photo.txt`), from that file (captions.py: which images, and how the identifier gets in).

Each example also carries its geometry: the image's size before resizing and the top-left corner
of the square cut from the resized image (original height, width, crop top, crop left), what
SDXL's micro-conditioning reads (the family decides whether its denoiser uses it).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import numpy as np
import torch
from PIL import Image

from personalize.captions import fill_caption, image_captions, without_identifier
from personalize.preflight import concept_folder, list_image_files, open_rgb
from personalize.spec import DEFAULT_CAPTION_TEMPLATE, Concept, Crop, PersonalizationJobSpec


def fill_template(template: str, identifier: str, class_noun: Optional[str]) -> str:
    """Substitute `{token}` and `{class_noun}`; collapse the double space an empty noun leaves."""
    text = template.replace("{token}", identifier).replace("{class_noun}", class_noun or "")
    return " ".join(text.split())


def caption_templates(concept: Concept) -> list[str]:
    """A concept's own templates (the spec's `caption_templates` adds the method's defaults)."""
    return [concept.caption_template or DEFAULT_CAPTION_TEMPLATE, *concept.captions]


def load_resized(path: Path, resolution: int) -> torch.Tensor:
    """One upright image, shorter side resized to `resolution`: [3, H, W] in [-1, 1], min(H, W) = resolution."""
    return load_resized_with_size(path, resolution)[0]


def load_resized_with_size(path: Path, resolution: int) -> tuple[torch.Tensor, tuple[int, int]]:
    """`load_resized`, and the upright image's (height, width) before resizing."""
    rgb = open_rgb(path)
    width, height = rgb.size
    scale = resolution / min(width, height)
    new_size = (max(resolution, round(width * scale)), max(resolution, round(height * scale)))
    rgb = rgb.resize(new_size, Image.Resampling.BICUBIC)
    pixels = np.asarray(rgb, dtype=np.float32) / 127.5 - 1.0  # [H, W, 3] in [-1, 1]
    return torch.from_numpy(pixels).permute(2, 0, 1).contiguous(), (height, width)


def center_corner(image: torch.Tensor, resolution: int) -> tuple[int, int]:
    """Top-left corner (top, left) of the central square of an image [3, H, W]."""
    return (image.shape[1] - resolution) // 2, (image.shape[2] - resolution) // 2


def center_square(image: torch.Tensor, resolution: int) -> torch.Tensor:
    top, left = center_corner(image, resolution)
    return image[:, top:top + resolution, left:left + resolution]


def load_image(path: Path, resolution: int) -> torch.Tensor:
    """One image as a float tensor [3, resolution, resolution] in [-1, 1]: its central square."""
    return center_square(load_resized(path, resolution), resolution).contiguous()


def load_images(folder: Path, resolution: int) -> tuple[torch.Tensor, list[Path]]:
    """All images of a folder as one tensor [N, 3, resolution, resolution] in [-1, 1]."""
    files = list_image_files(folder)
    return torch.stack([load_image(p, resolution) for p in files]), files


@dataclass(frozen=True)
class Augment:
    """What training batches (never the reference batch) change at random."""

    flip: float = 0.0  # probability of a horizontal flip
    random_crop: bool = False  # a random square of the resized image instead of the central one

    @classmethod
    def of(cls, spec: PersonalizationJobSpec) -> "Augment":
        return cls(flip=spec.flip_probability, random_crop=spec.crop == Crop.random)


@dataclass
class ConceptExamples:
    """The training examples: N images and the caption templates (filled per example)."""

    images: torch.Tensor  # [N, 3, H, W] in [-1, 1], central squares (the reference batch's)
    files: list[Path]
    captions: list[str]  # filled caption candidates; one is drawn per example
    augment: Augment = field(default_factory=Augment)
    # The resized images before cropping, kept only when a random crop has room to move.
    resized: Optional[list[torch.Tensor]] = None
    # [N, 4] int64: original height, width, crop top, crop left of each central square; None:
    # images made at the resolution (class images), i.e. (H, W, 0, 0).
    geometry: Optional[torch.Tensor] = None
    # Each image's own filled caption (from its caption file), or None where it draws from
    # `captions`; None: no image has one.
    image_captions: Optional[list[Optional[str]]] = None

    def __post_init__(self):
        if self.geometry is None:
            height, width = self.images.shape[-2:]
            self.geometry = torch.tensor([[height, width, 0, 0]] * len(self), dtype=torch.long).reshape(-1, 4)

    def __len__(self) -> int:
        return self.images.shape[0]

    @property
    def all_captions(self) -> list[str]:
        """Every caption an example may get (to encode them once)."""
        return [*self.captions, *(c for c in self.image_captions or () if c is not None)]

    def captions_for(self, image_ids: list[int], caption_ids: list[int]) -> list[str]:
        """The caption of each (image, drawn template) pair: the image's own caption when it has
        one, else the drawn template. The template is drawn either way, so that a folder without
        caption files draws exactly what it always did."""
        own = self.image_captions or [None] * len(self)
        return [own[i] if own[i] is not None else self.captions[c] for i, c in zip(image_ids, caption_ids)]

    def subset(self, indices: list[int]) -> "ConceptExamples":
        resized = [self.resized[i] for i in indices] if self.resized is not None else None
        own = [self.image_captions[i] for i in indices] if self.image_captions is not None else None
        return ConceptExamples(self.images[indices], [self.files[i] for i in indices], self.captions, self.augment,
                               resized, self.geometry[indices], own)

    def sample(self, batch_size: int, generator: torch.Generator) -> tuple[torch.Tensor, list[str]]:
        """A random batch (with replacement across steps, without within a batch when possible),
        augmented. Without augmentation (or no room to crop) it draws exactly what it always did."""
        images, captions, _ = self.draw(batch_size, generator)
        return images, captions

    def draw(self, batch_size: int, generator: torch.Generator) -> tuple[torch.Tensor, list[str], torch.Tensor]:
        """`sample`, and each drawn example's geometry [B, 4] (the crop actually cut)."""
        n = len(self)
        if batch_size <= n:
            idx = torch.randperm(n, generator=generator)[:batch_size]
        else:
            idx = torch.randint(n, (batch_size,), generator=generator)
        caption_idx = torch.randint(len(self.captions), (batch_size,), generator=generator)
        images, geometry = self.images[idx], self.geometry[idx].clone()
        if self.augment.random_crop and self.resized is not None:
            squares = [self._random_square(int(i), generator) for i in idx]
            images = torch.stack([square for square, _ in squares])
            geometry[:, 2:] = torch.tensor([corner for _, corner in squares], dtype=torch.long)
        if self.augment.flip > 0:
            flip = torch.rand(batch_size, generator=generator) < self.augment.flip
            images = torch.where(flip[:, None, None, None], images.flip(-1), images)
        return images, self.captions_for(idx.tolist(), caption_idx.tolist()), geometry

    def _random_square(self, index: int, generator: torch.Generator) -> tuple[torch.Tensor, tuple[int, int]]:
        image = self.resized[index]
        size = self.images.shape[-1]
        top = int(torch.randint(image.shape[1] - size + 1, (1,), generator=generator))
        left = int(torch.randint(image.shape[2] - size + 1, (1,), generator=generator))
        return image[:, top:top + size, left:left + size], (top, left)


def load_concept_examples(
    concept: Concept,
    identifier: str,
    resolution: int,
    templates: Optional[list[str]] = None,
    augment: Augment = Augment(),
) -> ConceptExamples:
    """Read the concept's images and their caption files; fill the caption templates (default:
    the concept's own) and the captions with the chosen identifier."""
    files = list_image_files(concept_folder(concept))
    loaded = [load_resized_with_size(p, resolution) for p in files]
    resized = [image for image, _ in loaded]
    images = torch.stack([center_square(r, resolution) for r in resized])
    geometry = torch.tensor([[*size, *center_corner(r, resolution)] for r, (_, size) in zip(resized, loaded)],
                            dtype=torch.long)
    room = any(r.shape[1:] != images.shape[2:] for r in resized)
    templates = templates if templates is not None else caption_templates(concept)
    captions = [fill_template(t, identifier, concept.class_noun) for t in templates]
    own = [fill_caption(text, identifier, concept) if text is not None else None
           for text in image_captions(files, concept.caption_source)]
    return ConceptExamples(images, files, captions, augment, resized if augment.random_crop and room else None, geometry,
                           own if any(c is not None for c in own) else None)


def caption_file_words(concept: Concept) -> list[str]:
    """The concept's caption files' texts without the identifier's places: the words the
    identifier must not be (setup_identifier's exclude_texts)."""
    files = list_image_files(concept_folder(concept))
    return [without_identifier(text, concept) for text in image_captions(files, concept.caption_source) if text]


def examples_of(spec: PersonalizationJobSpec, identifier: str, resolution: int) -> ConceptExamples:
    """The job's examples: its caption templates (the method's defaults) and augmentation."""
    return load_concept_examples(spec.concept, identifier, resolution, spec.caption_templates, Augment.of(spec))
