"""Textual Inversion: learn only the new token's embedding row(s), in every text encoder whose
vocabulary holds the identifier (SDXL: both CLIP encoders, as diffusers' textual_inversion_sdxl.py)."""

from __future__ import annotations

from pathlib import Path

import torch

from personalize.methods.base import Method


class TextualInversion(Method):
    name = "textualInversion"
    learns_embedding = True
    packable = True

    def trainable_parameters(self) -> list[torch.nn.Parameter]:
        # the identifier's rows of each encoder, as parameters of their own (routing.IdentifierRows)
        return self.add_identifier_rows(self.models.family.identifier_encoders(self.models))

    @property
    def text_encoder_trained(self) -> bool:
        return True

    def train_modules(self) -> list[torch.nn.Module]:
        return [e.module for e in self.models.family.identifier_encoders(self.models)]

    def save(self, output_dir: Path) -> list[str]:
        return self.save_learned_embeds_per_encoder(output_dir)
