"""What every method shares: the small interface the loop calls, and the stages a method runs.

The models start frozen (`freeze`); a method unfreezes exactly what `trainable_parameters()`
lists: that function is the one place to read what a method trains. Methods that train only
weights of their own (`packable`) can share the models with other concepts in a pack. `plan_stages` says how the run is cut
into training stages (one, unless the method overrides it).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar, Optional

import torch
from safetensors.torch import save_file

from personalize.criteria import stop_threshold
from personalize.identifier import Identifier
from personalize.pipeline_io import Models
from personalize.routing import BatchRouting, IdentifierRows
from personalize.spec import PersonalizationJobSpec

LEARNED_EMBEDS = "learned_embeds.safetensors"


def freeze(models: Models) -> None:
    """Every weight frozen; each method then unfreezes exactly its own (`trainable_parameters`)."""
    for module in models.modules():
        module.requires_grad_(False)


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
    """What one concept trains. In a pack several methods share the models: each adds its own
    weights under its `route` (routing.py), and `parameters` lists only its own."""

    name: ClassVar[str] = ""  # the spec's `method` value it implements
    learns_embedding: bool = False  # needs new token rows (decided before the models are touched)
    packable: ClassVar[bool] = False  # trains only weights of its own (not the shared ones): may join a pack

    def __init__(self, models: Models, spec: PersonalizationJobSpec, identifier: Identifier,
                 routing: Optional[BatchRouting] = None, route: str = "default"):
        """The models are frozen already (`freeze`); this adds and unfreezes what the method trains."""
        self.models, self.spec, self.identifier = models, spec, identifier
        self.routing, self.route = routing if routing is not None else BatchRouting(), route
        # the identifier's rows of each text encoder, as parameters of their own (routing.IdentifierRows)
        self.identifier_rows: list[IdentifierRows] = []
        self.prepare()
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
        """The trained token rows back into their tables (samples and saves read the tables)."""
        for rows in self.identifier_rows:
            rows.write_back()

    def attach(self) -> None:
        """Re-hook the token rows after another concept's new token replaced an embedding table."""
        for rows in self.identifier_rows:
            rows.attach()

    def finish(self) -> None:
        """The stage is over: the tables hold the final token rows, which stop being substituted."""
        for rows in self.identifier_rows:
            rows.detach()

    def release(self) -> None:
        """Remove what this concept added to the shared models (it left a pack that goes on)."""
        self.finish()

    def named_parameters(self) -> dict[str, torch.nn.Parameter]:
        """The trained tensors by a name that does not depend on the route or on other concepts
        (checkpoints save and restore them by it): `<component>.<parameter name>`."""
        mine = {id(p) for p in self.parameters}
        components = {"unet": self.models.denoiser, "text_encoder": self.models.text_encoder,
                      **self.models.extra_text_encoders}
        named = {}
        for component, module in components.items():
            for name, p in module.named_parameters():
                if id(p) in mine:
                    named[f"{component}.{name}".replace(f".{self.route}.", ".default.")] = p
        encoders = self.models.family.identifier_encoders(self.models)
        for encoder, rows in zip(encoders, self.identifier_rows):
            named[f"{encoder.name}.identifier_rows"] = rows.weight
        return named

    def add_identifier_rows(self, encoders) -> list[torch.nn.Parameter]:
        """The identifier's rows of each of `encoders` (family TextEncoders) as trained parameters."""
        self.identifier_rows = [IdentifierRows(e.module, self.identifier.ids_in(e.name)) for e in encoders]
        return [rows.weight for rows in self.identifier_rows]

    def save(self, output_dir: Path) -> list[str]:
        """Write the artifact(s); return their file names relative to output_dir."""
        raise NotImplementedError

    # ---- shared helpers ----------------------------------------------------------------------

    def learned_rows(self) -> torch.Tensor:
        """The identifier's embedding rows [num_vectors, D]: the trained fp32 parameter where the
        method trains them (a half-precision table would round them), else the table's rows."""
        if self.identifier_rows:
            return self.identifier_rows[0].weight.detach().float().cpu().clone()
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
        trained = self.identifier_rows or [None] * len(self.models.family.identifier_encoders(self.models))
        for encoder, own in zip(self.models.family.identifier_encoders(self.models), trained):
            if own is not None:  # the fp32 parameter (a half-precision table would round it)
                rows = own.weight.detach().float().cpu().contiguous()
            else:
                rows = encoder.module.get_input_embeddings().weight[self.identifier.ids_in(encoder.name)]
                rows = rows.detach().float().cpu().contiguous()
            name = learned_embeds_file(encoder.name)
            save_file({self.identifier.token: rows}, str(output_dir / name))
            files.append(name)
        return files


def learned_embeds_file(encoder_name: str) -> str:
    """`learned_embeds.safetensors` for `text_encoder`, `learned_embeds_2.safetensors` for
    `text_encoder_2` (the names diffusers' textual_inversion_sdxl.py writes)."""
    suffix = encoder_name.removeprefix("text_encoder")
    return LEARNED_EMBEDS.replace(".safetensors", f"{suffix}.safetensors")
