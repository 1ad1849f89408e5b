"""Textual Inversion: learn only the new token's embedding row(s)."""

from __future__ import annotations

from pathlib import Path

import torch

from personalize.methods.base import EmbeddingRowsKeeper, Method


class TextualInversion(Method):
    name = "textualInversion"
    learns_embedding = True

    def trainable_parameters(self) -> list[torch.nn.Parameter]:
        embeddings = self.models.text_encoder.get_input_embeddings()
        self.keeper = EmbeddingRowsKeeper(embeddings, self.identifier.token_ids)
        return [embeddings.weight]  # only the identifier's rows survive each step (see keeper)

    @property
    def text_encoder_trained(self) -> bool:
        return True

    def train_modules(self) -> list[torch.nn.Module]:
        return [self.models.text_encoder]

    def after_optimizer_step(self) -> None:
        self.keeper.restore()

    def save(self, output_dir: Path) -> list[str]:
        return [self.save_learned_embeds(output_dir)]
