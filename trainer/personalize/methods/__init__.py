"""The registry of personalization methods: one class per value of the spec's `method`.

Adding a method: write one module with a `Method` subclass (base.py) whose `name` is the new
spec value, and add the class to `METHODS` below. A method with several training stages
overrides `Method.plan_stages` (see ti_dreambooth.py).
"""

from __future__ import annotations

from personalize.methods.base import LEARNED_EMBEDS, Method, Stage
from personalize.methods.custom_diffusion import CustomDiffusion, load_custom_diffusion
from personalize.methods.dreambooth import Dreambooth
from personalize.methods.lora import Lora
from personalize.methods.textual_inversion import TextualInversion
from personalize.methods.ti_dreambooth import TiDreamboothUnetStage
from personalize.spec import PersonalizationJobSpec

__all__ = [
    "LEARNED_EMBEDS",
    "METHODS",
    "Method",
    "Stage",
    "plan_stages",
    "learns_embedding",
    "load_custom_diffusion",
]

METHODS: dict[str, type[Method]] = {
    cls.name: cls for cls in (TextualInversion, Dreambooth, Lora, CustomDiffusion, TiDreamboothUnetStage)
}


def learns_embedding(spec: PersonalizationJobSpec) -> bool:
    return METHODS[spec.method.value].learns_embedding


def plan_stages(spec: PersonalizationJobSpec) -> list[Stage]:
    return METHODS[spec.method.value].plan_stages(spec)
