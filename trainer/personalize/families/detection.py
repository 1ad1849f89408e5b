"""Which model family a diffusers pipeline folder holds, and which methods each family supports.

Torch-free: preflight calls it on the node before torch is imported. The family is the
pipeline class named by `model_index.json`'s `_class_name`.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from personalize.errors import TrainerInputError
from personalize.spec import PersonalizationJobSpec


@dataclass(frozen=True)
class FamilyInfo:
    name: str  # the registry key
    label: str  # what users call it
    pipeline_class: str  # model_index.json `_class_name`
    methods: tuple[str, ...]  # supported spec `method` values
    text_encoder_lora: bool = False  # lora.trainTextEncoder is supported
    kohya_lora: bool = False  # output.formats kohya: a kohya LoRA layout exists (kohya_format.py)


ALL_SD_METHODS = ("textualInversion", "dreambooth", "lora", "customDiffusion", "tiDreambooth")

FAMILIES: tuple[FamilyInfo, ...] = (
    FamilyInfo("sd", "Stable Diffusion 1.x/2.x", "StableDiffusionPipeline", ALL_SD_METHODS, text_encoder_lora=True,
               kohya_lora=True),
    FamilyInfo("sdxl", "SDXL", "StableDiffusionXLPipeline", ("textualInversion", "lora", "dreambooth"),
               text_encoder_lora=True, kohya_lora=True),
    FamilyInfo("sd3", "SD3", "StableDiffusion3Pipeline", ("lora",)),
    FamilyInfo("flux", "FLUX.1", "FluxPipeline", ("lora",)),
)
BY_PIPELINE_CLASS = {f.pipeline_class: f for f in FAMILIES}
BY_NAME = {f.name: f for f in FAMILIES}


def supported_list() -> str:
    return ", ".join(f"{f.pipeline_class} ({f.label})" for f in FAMILIES)


def read_model_index(folder: Path) -> dict:
    try:
        return json.loads((folder / "model_index.json").read_text())
    except (OSError, ValueError) as err:
        raise TrainerInputError(f"{folder / 'model_index.json'} cannot be read: {err}") from None


def family_of_index(model_index: dict, what: str) -> FamilyInfo:
    """The family of a pipeline from its model_index.json contents; unsupported -> TrainerInputError."""
    class_name = str(model_index.get("_class_name", "<no _class_name>"))
    family = BY_PIPELINE_CLASS.get(class_name)
    if family is None:
        raise TrainerInputError(
            f"{what}: model family {class_name} is not supported (supported: {supported_list()})"
        )
    return family


def check_method(family: FamilyInfo, spec: PersonalizationJobSpec) -> None:
    """Refuse a method (or method option) the family does not support, naming what it does support."""
    method = spec.method.value
    if method not in family.methods:
        raise TrainerInputError(
            f"method {method} is not supported on {family.label} ({family.pipeline_class}); "
            f"supported there: {', '.join(family.methods)}"
        )
    if method == "dreambooth" and spec.dreambooth.train_text_encoder and family.name != "sd":
        raise TrainerInputError(
            f"dreambooth.trainTextEncoder is supported only on SD 1.x/2.x, not on {family.label}"
        )
    if method == "lora" and spec.lora.train_text_encoder and not family.text_encoder_lora:
        supported = ", ".join(f.label for f in FAMILIES if f.text_encoder_lora)
        raise TrainerInputError(
            f"lora.trainTextEncoder is not supported on {family.label} ({family.pipeline_class}); "
            f"supported on: {supported}"
        )
    if "kohya" in {f.value for f in spec.output.formats} and not family.kohya_lora:
        supported = ", ".join(f.label for f in FAMILIES if f.kohya_lora)
        raise TrainerInputError(
            f"output.formats: kohya is not available on {family.label} ({family.pipeline_class}); "
            f"available on: {supported}"
        )


def detect_folder_family(folder: Path, spec: Optional[PersonalizationJobSpec], what: str) -> FamilyInfo:
    family = family_of_index(read_model_index(folder), what)
    if spec is not None:
        check_method(family, spec)
    return family
