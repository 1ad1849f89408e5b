"""CLIP-I / CLIP-T scores and zero-shot attribute classification with the tiny world's CLIP.

    clip, tokenizer = load_tiny_clip()
    clip_i = clip_i_score(clip, generated_images, concept_images)       # image-image cosine
    clip_t = clip_t_score(clip, tokenizer, generated_images, "a red striped triangle")
    accuracy = zero_shot_accuracy(clip, tokenizer, images, labels, "shape")

Images are PIL images or uint8 arrays (H, W, 3); they are resized to the CLIP's input size.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from transformers import CLIPModel, CLIPTokenizer

from personalize.world.conv_clip import ConvClip, is_conv_clip_folder
from personalize.world.shapes import BACKGROUNDS, COLOURS, PATTERNS, SHAPES
from personalize.world.tiny_models import TINY_WORLD_DIR, load_tokenizer

ImageLike = Image.Image | np.ndarray

# Prompt templates per attribute for zero-shot classification; class embeddings are averaged
# over templates (prompt ensembling, as in the CLIP paper).
ZERO_SHOT_TEMPLATES: dict[str, tuple[str, ...]] = {
    "shape": ("a {} ", "a photo of a {}"),
    "colour": ("a {} shape", "a {} thing"),
    "background": ("a shape on a {} background", "a photo on a {} background"),
    "pattern": ("a {} shape", "a {} thing"),
}
ZERO_SHOT_CLASSES: dict[str, tuple[str, ...]] = {
    "shape": SHAPES,
    "colour": tuple(COLOURS),
    "background": BACKGROUNDS,
    "pattern": PATTERNS,
}


def images_to_pixels(images: Sequence[ImageLike], size: int) -> torch.Tensor:
    """(N, 3, size, size) float tensor in [-1, 1], the same preprocessing used in pretraining."""
    arrays = []
    for image in images:
        if isinstance(image, np.ndarray):
            image = Image.fromarray(image)
        image = image.convert("RGB")
        if image.size != (size, size):
            image = image.resize((size, size), Image.BICUBIC)
        arrays.append(np.asarray(image, dtype=np.uint8))
    batch = torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).float()
    return batch / 127.5 - 1.0


def uint8_batch_to_pixels(batch: np.ndarray) -> torch.Tensor:
    """(N, H, W, 3) uint8 array -> (N, 3, H, W) float tensor in [-1, 1]."""
    return torch.from_numpy(batch).permute(0, 3, 1, 2).float() / 127.5 - 1.0


def load_tiny_clip(path: str | Path | None = None) -> tuple[CLIPModel | ConvClip, CLIPTokenizer]:
    """The pretrained tiny CLIP (float32, eval mode) and the shipped tokenizer. A folder is
    either a ConvClip (the current world) or a transformers CLIPModel (the first world)."""
    folder = Path(path) if path else TINY_WORLD_DIR / "clip"
    if is_conv_clip_folder(folder):
        clip = ConvClip.from_pretrained(folder, dtype=torch.float32)
    else:
        clip = CLIPModel.from_pretrained(folder, dtype=torch.float32)
    return clip.eval(), load_tokenizer()


def clip_image_size(clip: CLIPModel | ConvClip) -> int:
    return clip.image_size if isinstance(clip, ConvClip) else clip.config.vision_config.image_size


def _model_dtype(clip: CLIPModel) -> torch.dtype:
    return next(clip.parameters()).dtype


@torch.no_grad()
def image_embeddings(clip: CLIPModel, images: Sequence[ImageLike] | torch.Tensor) -> torch.Tensor:
    """(N, projection_dim) L2-normalised image embeddings."""
    if not isinstance(images, torch.Tensor):
        images = images_to_pixels(images, clip_image_size(clip))
    features = clip.get_image_features(pixel_values=images.to(_model_dtype(clip)))
    features = getattr(features, "pooler_output", features)  # transformers 5 may wrap outputs
    return torch.nn.functional.normalize(features.float(), dim=-1)


@torch.no_grad()
def text_embeddings(clip: CLIPModel, tokenizer: CLIPTokenizer, texts: Sequence[str]) -> torch.Tensor:
    """(N, projection_dim) L2-normalised text embeddings."""
    tokens = tokenizer(list(texts), padding=True, return_tensors="pt")
    features = clip.get_text_features(input_ids=tokens.input_ids)
    features = getattr(features, "pooler_output", features)
    return torch.nn.functional.normalize(features.float(), dim=-1)


def clip_i_score(clip: CLIPModel, generated: Sequence[ImageLike], references: Sequence[ImageLike]) -> float:
    """Mean pairwise cosine similarity between generated and reference image embeddings."""
    gen = image_embeddings(clip, generated)
    ref = image_embeddings(clip, references)
    return float((gen @ ref.T).mean())


def clip_t_score(clip: CLIPModel, tokenizer: CLIPTokenizer, generated: Sequence[ImageLike], prompt: str) -> float:
    """Mean cosine similarity between generated images and the prompt's text embedding."""
    gen = image_embeddings(clip, generated)
    text = text_embeddings(clip, tokenizer, [prompt])
    return float((gen @ text.T).mean())


def class_embeddings(clip: CLIPModel, tokenizer: CLIPTokenizer, attribute: str) -> torch.Tensor:
    """(n_classes, projection_dim): template-averaged, re-normalised text embeddings."""
    templates = ZERO_SHOT_TEMPLATES[attribute]
    per_class = []
    for name in ZERO_SHOT_CLASSES[attribute]:
        embeddings = text_embeddings(clip, tokenizer, [t.format(name).strip() for t in templates])
        per_class.append(torch.nn.functional.normalize(embeddings.mean(0), dim=-1))
    return torch.stack(per_class)


def zero_shot_predict(
    clip: CLIPModel, tokenizer: CLIPTokenizer, images: Sequence[ImageLike] | torch.Tensor, attribute: str
) -> list[str]:
    """Predicted class name per image for attribute in ZERO_SHOT_CLASSES (shape, colour, background, pattern)."""
    classes = ZERO_SHOT_CLASSES[attribute]
    similarities = image_embeddings(clip, images) @ class_embeddings(clip, tokenizer, attribute).T
    return [classes[i] for i in similarities.argmax(dim=-1).tolist()]


def zero_shot_accuracy(
    clip: CLIPModel,
    tokenizer: CLIPTokenizer,
    images: Sequence[ImageLike] | torch.Tensor,
    labels: Sequence[str],
    attribute: str,
) -> float:
    predictions = zero_shot_predict(clip, tokenizer, images, attribute)
    return float(np.mean([p == y for p, y in zip(predictions, labels)]))


def chance_level(attribute: str) -> float:
    return 1.0 / len(ZERO_SHOT_CLASSES[attribute])
