"""Caption conditioning for frozen text encoders, encoded once per distinct caption.

Training captions come from a few templates, so with frozen text encoders each caption is
encoded once and reused, as diffusers' scripts precompute their prompt embeddings. That also lets
the text encoders leave the accelerator (`training.offloadTextEncoders`): T5-XXL alone is 9 GB.
"""

from __future__ import annotations

import logging

import torch

from personalize.diffusion import encode_captions
from personalize.families.base import Conditioning, Models

log = logging.getLogger("personalize")


class PromptCache:
    def __init__(self, models: Models):
        self.models = models
        self.cache: dict[str, Conditioning] = {}

    @torch.no_grad()
    def warm(self, captions: list[str]) -> None:
        """Encode the captions not seen yet, on the text encoders' device."""
        missing = [c for c in dict.fromkeys(captions) if c not in self.cache]
        if not missing:
            return
        text_encoder = self.models.text_encoder
        device = next(text_encoder.parameters()).device
        conditioning = encode_captions(self.models, text_encoder, missing, device).detach()
        for i, caption in enumerate(missing):
            self.cache[caption] = conditioning[i : i + 1]

    def offload_text_encoders(self) -> None:
        """Move the text encoders to the CPU (captions seen later are encoded there)."""
        for encoder in self.models.text_encoders:
            encoder.to("cpu")
        log.info("text encoders offloaded to the CPU after caching %d caption(s)", len(self.cache))

    def __call__(self, captions: list[str], device) -> Conditioning:
        self.warm(captions)
        return Conditioning.cat([self.cache[c] for c in captions]).to(device)
