"""Personalization methods and the training stages each one runs.

Every method but tiDreambooth is one stage; tiDreambooth is a Textual Inversion stage followed by
a UNet stage. A stage carries its own step budget, learning rate and criterion settings.
"""

from __future__ import annotations

from dataclasses import dataclass

from personalize.criteria import stop_threshold
from personalize.methods.base import LEARNED_EMBEDS, Method
from personalize.methods.custom_diffusion import CustomDiffusion, load_custom_diffusion
from personalize.methods.dreambooth import Dreambooth
from personalize.methods.lora import Lora
from personalize.methods.textual_inversion import TextualInversion
from personalize.methods.ti_dreambooth import TiDreamboothUnetStage
from personalize.spec import CriterionName, PersonalizationJobSpec
from personalize.spec import Method as MethodName

__all__ = [
    "LEARNED_EMBEDS",
    "Method",
    "Stage",
    "plan_stages",
    "learns_embedding",
    "load_custom_diffusion",
]


@dataclass
class Stage:
    name: str  # reported as progress.stage
    method_class: type[Method]
    max_steps: int
    learning_rate: float
    window_steps: int
    threshold: float
    prior_preservation: bool


METHOD_CLASSES: dict[MethodName, type[Method]] = {
    MethodName.textual_inversion: TextualInversion,
    MethodName.dreambooth: Dreambooth,
    MethodName.lora: Lora,
    MethodName.custom_diffusion: CustomDiffusion,
    MethodName.ti_dreambooth: TiDreamboothUnetStage,
}


def learns_embedding(spec: PersonalizationJobSpec) -> bool:
    return METHOD_CLASSES[spec.method].learns_embedding


def plan_stages(spec: PersonalizationJobSpec) -> list[Stage]:
    main = Stage(
        name=spec.method.value,
        method_class=METHOD_CLASSES[spec.method],
        max_steps=spec.max_steps,
        learning_rate=spec.learning_rate,
        window_steps=spec.window,
        threshold=stop_threshold(spec),
        prior_preservation=spec.prior_preservation_enabled,
    )
    if spec.method != MethodName.ti_dreambooth:
        return [main]
    options = spec.ti_dreambooth
    es = spec.early_stopping
    ti_threshold = options.stage1_threshold if es.criterion == CriterionName.dvar else stop_threshold(spec)
    textual_inversion = Stage(
        name=MethodName.textual_inversion.value,
        method_class=TextualInversion,
        max_steps=options.stage1_max_steps,
        learning_rate=options.stage1_learning_rate,
        window_steps=options.stage1_window,
        threshold=ti_threshold,
        prior_preservation=False,
    )
    main.name = MethodName.dreambooth.value
    main.prior_preservation = False
    return [textual_inversion, main]
