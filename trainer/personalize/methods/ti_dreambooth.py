"""TI-then-DreamBooth (seed 004): stage 1 learns the token's embedding (Textual Inversion, with its
own early stopping); stage 2 fine-tunes the UNet with the text encoder and the learned embedding
frozen, without prior preservation. Both artifacts are saved."""

from __future__ import annotations

from pathlib import Path

import torch

from personalize.methods.base import Method
from personalize.methods.dreambooth import save_pipeline


class TiDreamboothUnetStage(Method):
    """Stage 2: the UNet only; the text encoder (with the stage-1 embedding inside) is frozen."""

    name = "tiDreambooth"
    learns_embedding = True

    def trainable_parameters(self) -> list[torch.nn.Parameter]:
        return list(self.models.unet.parameters())

    def save(self, output_dir: Path) -> list[str]:
        return [self.save_learned_embeds(output_dir), save_pipeline(self.models, output_dir)]
