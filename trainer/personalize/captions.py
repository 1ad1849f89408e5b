"""Per-image caption files: `photo.png` + `photo.txt` beside it (the convention of kohya's
sd-scripts and of many captioning tools), the training caption of that image.

`concept.captionSource` decides which images use one:
    auto      an image with a caption file trains on it, the others on the caption templates
    sidecar   every image must have one (a missing file is bad input, named)
    template  caption files are ignored: the templates only (the behaviour without caption files)

The caption is the file's first line, stripped (as sd-scripts reads it; UTF-8). The identifier
must be in it for the concept to be learned under it, so each caption gets it this way:
    `{token}` (and `{class_noun}`) are substituted, as in the templates;
    otherwise a given `concept.token` written in the caption as a word is replaced by the
    identifier (the same word for dreambooth/lora; for textualInversion with numVectors > 1 its
    expansion);
    otherwise the identifier is put in front: "<identifier>, <caption>".

Torch-free: preflight reads the files before torch is imported.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Optional

from personalize.errors import TrainerInputError
from personalize.spec import CaptionSource, Concept

CAPTION_SUFFIX = ".txt"


def caption_file(image: Path) -> Path:
    """The caption file of an image: the same name with .txt."""
    return image.with_suffix(CAPTION_SUFFIX)


def read_caption(path: Path) -> str:
    """The first line of a caption file, stripped; an empty one is bad input."""
    try:
        text = path.read_bytes().decode("utf-8-sig")
    except UnicodeDecodeError:
        raise TrainerInputError(f"caption file '{path}' is not UTF-8 text") from None
    except OSError as err:
        raise TrainerInputError(f"caption file '{path}' cannot be read: {err.strerror or err}") from None
    first = text.splitlines()[0].strip() if text.strip() else ""
    if not first:
        raise TrainerInputError(f"caption file '{path}' is empty (its first line is the image's caption)")
    return first


def image_captions(files: list[Path], source: CaptionSource) -> list[Optional[str]]:
    """Each image's caption as written in its caption file (placeholders unfilled), or None
    where the image trains on the templates."""
    if source == CaptionSource.template:
        return [None] * len(files)
    captions: list[Optional[str]] = []
    for image in files:
        path = caption_file(image)
        if path.is_file():
            captions.append(read_caption(path))
        elif source == CaptionSource.sidecar:
            raise TrainerInputError(
                f"concept.captionSource sidecar: image '{image}' has no caption file '{path.name}' beside it "
                "(add one, or use captionSource: auto to train such images on the templates)")
        else:
            captions.append(None)
    return captions


def without_identifier(text: str, concept: Concept) -> str:
    """A caption file's text without the places the identifier goes (`{token}`, a given token):
    the words an identifier must not be one of."""
    text = text.replace("{token}", " ").replace("{class_noun}", concept.class_noun or "")
    if concept.token != "auto":
        text = re.sub(rf"(?<![\w<]){re.escape(concept.token)}(?![\w>])", " ", text)
    return text


def fill_caption(text: str, identifier: str, concept: Concept) -> str:
    """A caption file's text with the identifier in it (see the module docstring)."""
    if "{token}" in text:
        filled = text.replace("{token}", identifier).replace("{class_noun}", concept.class_noun or "")
        return " ".join(filled.split())
    text = text.replace("{class_noun}", concept.class_noun or "")
    if concept.token != "auto":
        written = re.compile(rf"(?<![\w<]){re.escape(concept.token)}(?![\w>])")
        if written.search(text):
            return written.sub(lambda _: identifier, text)
    return f"{identifier}, {text}"
