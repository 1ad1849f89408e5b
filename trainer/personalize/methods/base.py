"""What every method shares: the small interface the loop calls, and the stages a method runs.

A method freezes everything, then unfreezes exactly what `trainable_parameters()` lists: that
function is the one place to read what a method trains. `plan_stages` says how the run is cut
into training stages (one, unless the method overrides it).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar, Sequence

import torch
from safetensors.torch import save_file

from personalize.criteria import stop_threshold
from personalize.identifier import Identifier
from personalize.pipeline_io import Models
from personalize.spec import PersonalizationJobSpec

LEARNED_EMBEDS = "learned_embeds.safetensors"


@dataclass
class Stage:
    name: str  # reported as progress.stage
    method_class: type["Method"]
    max_steps: int
    learning_rate: float
    window_steps: int
    threshold: float
    prior_preservation: bool


class Method:
    name: ClassVar[str] = ""  # the spec's `method` value it implements
    learns_embedding: bool = False  # needs new token rows (decided before the models are touched)
    # Set by methods that train embedding tables of which only the identifier's rows may change
    # (`trainable_parameters` creates them, one per text encoder); checkpoints save only those rows.
    keepers: Sequence["EmbeddingRowsKeeper"] = ()

    def __init__(self, models: Models, spec: PersonalizationJobSpec, identifier: Identifier):
        self.models, self.spec, self.identifier = models, spec, identifier
        self.prepare()
        for module in models.modules():
            module.requires_grad_(False)
        self.parameters = self.trainable_parameters()
        for p in self.parameters:
            p.requires_grad_(True)

    # ---- override ----------------------------------------------------------------------------

    @classmethod
    def plan_stages(cls, spec: PersonalizationJobSpec) -> list[Stage]:
        """The training stages of a run; one stage with the spec's resolved settings by default."""
        return [Stage(
            name=cls.name,
            method_class=cls,
            max_steps=spec.max_steps,
            learning_rate=spec.learning_rate,
            window_steps=spec.window,
            threshold=stop_threshold(spec),
            prior_preservation=spec.prior_preservation_enabled,
        )]

    def prepare(self) -> None:
        """Change the models' structure before freezing (adapters, attention processors)."""

    def trainable_parameters(self) -> list[torch.nn.Parameter]:
        raise NotImplementedError

    @property
    def text_encoder_trained(self) -> bool:
        """Whether caption embeddings change during training (they must be re-encoded)."""
        return False

    def train_modules(self) -> list[torch.nn.Module]:
        """Modules that run in train mode (and go through accelerator.prepare)."""
        return [self.models.denoiser, self.models.text_encoder] if self.text_encoder_trained else [self.models.denoiser]

    def after_optimizer_step(self) -> None:
        """Undo what the optimizer must not change (e.g. embedding rows of other tokens)."""
        for keeper in self.keepers:
            keeper.restore()

    def save(self, output_dir: Path) -> list[str]:
        """Write the artifact(s); return their file names relative to output_dir."""
        raise NotImplementedError

    # ---- shared helpers ----------------------------------------------------------------------

    def learned_rows(self) -> torch.Tensor:
        """The identifier's embedding rows [num_vectors, D]."""
        table = self.models.text_encoder.get_input_embeddings().weight
        return table[self.identifier.token_ids].detach().float().cpu().clone()

    def save_learned_embeds(self, output_dir: Path) -> str:
        """`learned_embeds.safetensors` in the format `pipe.load_textual_inversion(path, token=...)` reads."""
        save_file({self.identifier.token: self.learned_rows().contiguous()}, str(output_dir / LEARNED_EMBEDS))
        return LEARNED_EMBEDS

    def save_learned_embeds_per_encoder(self, output_dir: Path) -> list[str]:
        """One embeddings file per text encoder holding the identifier (SDXL: two), each in the
        format `pipe.load_textual_inversion(path, token=..., text_encoder=..., tokenizer=...)` reads."""
        files = []
        for encoder in self.models.family.identifier_encoders(self.models):
            table = encoder.module.get_input_embeddings().weight
            rows = table[self.identifier.ids_in(encoder.name)].detach().float().cpu().contiguous()
            name = learned_embeds_file(encoder.name)
            save_file({self.identifier.token: rows}, str(output_dir / name))
            files.append(name)
        return files


def learned_embeds_file(encoder_name: str) -> str:
    """`learned_embeds.safetensors` for `text_encoder`, `learned_embeds_2.safetensors` for
    `text_encoder_2` (the names diffusers' textual_inversion_sdxl.py writes)."""
    suffix = encoder_name.removeprefix("text_encoder")
    return LEARNED_EMBEDS.replace(".safetensors", f"{suffix}.safetensors")


class EmbeddingRowsKeeper:
    """Keeps every embedding row except the identifier's bit-identical across optimizer steps.

    The optimizer sees the whole table (an nn.Parameter cannot be sliced), so after each step the
    rows of all other tokens are copied back from the original (AdamW weight decay and the
    gradients of the other caption words would otherwise move them).
    """

    def __init__(self, embeddings: torch.nn.Embedding, trained_ids: list[int]):
        self.embeddings = embeddings
        self.rows = list(trained_ids)
        self.original = embeddings.weight.detach().clone()
        self.frozen = torch.ones(self.original.shape[0], dtype=torch.bool)
        self.frozen[trained_ids] = False

    @torch.no_grad()
    def drop_frozen_gradients(self) -> None:
        """Zero the gradient of the rows `restore` resets, so that it does not count in a clipped norm."""
        grad = self.embeddings.weight.grad
        if grad is not None:
            grad[self.frozen.to(grad.device)] = 0

    @torch.no_grad()
    def restore(self) -> None:
        weight = self.embeddings.weight
        frozen = self.frozen.to(weight.device)
        weight[frozen] = self.original.to(weight.device, weight.dtype)[frozen]

