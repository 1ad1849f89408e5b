"""TI-then-DreamBooth: stage 1 learns the token's embedding (Textual Inversion, with its
own early stopping); stage 2 fine-tunes the UNet with the text encoder and the learned embedding
frozen, without prior preservation. Both artifacts are saved."""

from __future__ import annotations

from pathlib import Path

import torch

from personalize.criteria import stop_threshold
from personalize.methods.base import Method, Stage
from personalize.methods.dreambooth import save_pipeline
from personalize.methods.textual_inversion import TextualInversion
from personalize.spec import CriterionName, PersonalizationJobSpec
from personalize.spec import Method as MethodName


class TiDreamboothUnetStage(Method):
    """Stage 2: the UNet only; the text encoder (with the stage-1 embedding inside) is frozen."""

    name = "tiDreambooth"
    learns_embedding = True

    @classmethod
    def plan_stages(cls, spec: PersonalizationJobSpec) -> list[Stage]:
        """Stage 1 with the tiDreambooth.stage1* settings; stage 2 with the spec's resolved ones.
        The stage-1 threshold is DVAR's; another criterion uses its own threshold in both."""
        options = spec.ti_dreambooth
        dvar = spec.early_stopping.criterion == CriterionName.dvar
        textual_inversion = Stage(
            name=MethodName.textual_inversion.value,
            method_class=TextualInversion,
            max_steps=options.stage1_max_steps,
            learning_rate=options.stage1_learning_rate,
            window_steps=options.stage1_window,
            threshold=options.stage1_threshold if dvar else stop_threshold(spec),
            prior_preservation=False,
        )
        (unet,) = super().plan_stages(spec)
        unet.name = MethodName.dreambooth.value
        unet.prior_preservation = False
        return [textual_inversion, unet]

    def trainable_parameters(self) -> list[torch.nn.Parameter]:
        return list(self.models.unet.parameters())

    def save(self, output_dir: Path) -> list[str]:
        return [self.save_learned_embeds(output_dir), save_pipeline(self.models, output_dir)]
