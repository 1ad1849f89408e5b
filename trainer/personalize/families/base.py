"""The model-family interface, the models a job holds and the conditioning the denoiser reads.

The loop, the reference batch and the methods call only this interface; each family module
(stable_diffusion.py, sdxl.py, flow_matching.py) implements it for its pipeline layout.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Optional

import torch

from personalize.families.detection import BY_NAME, FamilyInfo


@dataclass
class Models:
    """The pipeline's parts (the loop moves them to the accelerator's device)."""

    family: "ModelFamily"
    denoiser: torch.nn.Module  # the UNet (SD, SDXL) or the transformer (SD3, FLUX.1)
    vae: torch.nn.Module
    text_encoder: torch.nn.Module  # the CLIP encoder whose vocabulary holds the identifier
    tokenizer: object
    noise_scheduler: object  # training noise (DDPM forward process or flow-matching sigmas)
    sampling_scheduler: object  # the pipeline's own scheduler (for samples)
    # Further text encoders/tokenizers by their pipeline component name (text_encoder_2, ...).
    extra_text_encoders: dict[str, torch.nn.Module] = field(default_factory=dict)
    extra_tokenizers: dict[str, object] = field(default_factory=dict)

    @property
    def unet(self) -> torch.nn.Module:
        """The denoiser under the name the SD 1.x/2.x code uses."""
        return self.denoiser

    @property
    def text_encoders(self) -> list[torch.nn.Module]:
        return [self.text_encoder, *self.extra_text_encoders.values()]

    def modules(self) -> list[torch.nn.Module]:
        """Every weight-holding part (frozen by default, moved and cast together)."""
        return [self.denoiser, self.vae, *self.text_encoders]


# The conditioning key of each example's geometry [B, 4]: original height, width, crop top,
# crop left (data.py). Every batch carries it; families whose denoiser reads it (SDXL's
# micro-conditioning) use it, the others ignore it.
IMAGE_GEOMETRY = "image_geometry"


@dataclass(frozen=True)
class TextEncoder:
    """A text encoder with its tokenizer, under its pipeline component name."""

    name: str  # "text_encoder", "text_encoder_2", ...
    tokenizer: object
    module: torch.nn.Module


class Conditioning:
    """What the denoiser is conditioned on for a batch: named tensors with the batch first
    (e.g. prompt embeddings, pooled embeddings). Slicing, moving and concatenation apply to all."""

    def __init__(self, tensors: dict[str, torch.Tensor]):
        self.tensors = tensors

    def with_image_geometry(self, geometry: torch.Tensor) -> "Conditioning":
        """The same conditioning plus the examples' geometry [B, 4] (see IMAGE_GEOMETRY)."""
        return Conditioning({**self.tensors, IMAGE_GEOMETRY: geometry})

    def get(self, key: str) -> Optional[torch.Tensor]:
        return self.tensors.get(key)

    def __getitem__(self, key):
        if isinstance(key, str):
            return self.tensors[key]
        return Conditioning({k: v[key] for k, v in self.tensors.items()})

    def __len__(self) -> int:
        return len(next(iter(self.tensors.values())))

    def to(self, device=None, dtype=None) -> "Conditioning":
        return Conditioning({k: v.to(device=device, dtype=dtype) for k, v in self.tensors.items()})

    def detach(self) -> "Conditioning":
        return Conditioning({k: v.detach() for k, v in self.tensors.items()})

    def detached_cpu(self) -> "Conditioning":
        return Conditioning({k: v.detach().float().cpu() for k, v in self.tensors.items()})

    @staticmethod
    def cat(parts: list["Conditioning"]) -> "Conditioning":
        return Conditioning({k: torch.cat([p.tensors[k] for p in parts]) for k in parts[0].tensors})


class ModelFamily:
    name: ClassVar[str] = ""  # key of detection.FAMILIES
    pipeline_class: ClassVar[type]  # the stock diffusers pipeline
    denoiser_component: ClassVar[str] = "unet"  # its component name in the pipeline
    lora_target_modules: ClassVar[tuple[str, ...]] = ()  # default LoRA targets (peft name suffixes)
    # LoRA targets in the identifier's text encoders (lora.trainTextEncoder); () where unsupported
    text_encoder_lora_target_modules: ClassVar[tuple[str, ...]] = ()

    def __init__(self, spec: Optional[Any] = None):
        self.spec = spec  # the job spec (options such as flowMatching); None: library defaults

    @property
    def info(self) -> FamilyInfo:
        return BY_NAME[self.name]

    # ---- loading and pipelines ---------------------------------------------------------------

    def load(self, source: str | Path, **kwargs):
        # fp32 master weights; mixed precision later casts only the frozen parts.
        return self.pipeline_class.from_pretrained(source, dtype=torch.float32, **kwargs)

    def load_single_file(self, checkpoint: Path, config: Path, **kwargs):
        """One checkpoint file in the original layout, the pipeline's configs (and tokenizer) from the
        local folder `config`: diffusers' `from_single_file`, never a download."""
        return self.pipeline_class.from_single_file(str(checkpoint), config=str(config), local_files_only=True,
                                                    dtype=torch.float32, **kwargs)

    def models_of(self, pipe) -> Models:
        raise NotImplementedError

    def sampling_pipeline(self, models: Models):
        """The stock pipeline around the (possibly trained) models, for class images and samples."""
        raise NotImplementedError

    def identifier_encoders(self, models: Models) -> list[TextEncoder]:
        """The text encoders whose vocabulary holds the identifier, the first one first: a learned
        token gets a row in each (Textual Inversion). By default the first encoder only."""
        return [TextEncoder("text_encoder", models.tokenizer, models.text_encoder)]

    # ---- the objective -------------------------------------------------------------------------

    def encode_prompts(self, models: Models, text_encoder, captions: list[str], device) -> Conditioning:
        """Prompt conditioning for captions; `text_encoder` may be the accelerator-wrapped one."""
        raise NotImplementedError

    def num_timesteps(self, models: Models) -> int:
        return int(models.noise_scheduler.config.num_train_timesteps)

    def draw_timesteps(self, models: Models, n: int, generator: torch.Generator) -> torch.Tensor:
        """Training timesteps [n] as integer indices into the training schedule."""
        return torch.randint(0, self.num_timesteps(models), (n,), generator=generator)

    def timestep_label(self, models: Models, index: int) -> str:
        """How a timestep index is named in reports (losses.csv columns, metric labels): "t=0999"."""
        return f"t={index:0{len(str(self.num_timesteps(models)))}d}"

    def loss(self, denoiser, models: Models, latents, noise, timesteps, conditioning: Conditioning,
             reduction: str = "mean") -> torch.Tensor:
        """The training loss; reduction "none" gives one value per example [B], "both" the pair
        (the "mean" value to the bit, the "none" values) from one forward pass."""
        raise NotImplementedError

    # ---- artifacts -------------------------------------------------------------------------------

    def lora_layers(self, module: torch.nn.Module, adapter_name: str = "default") -> dict[str, torch.Tensor]:
        """One adapter's weights of a module in the form the pipeline's `save_lora_weights` takes."""
        from peft.utils import get_peft_model_state_dict  # noqa: PLC0415 (peft only for LoRA)

        return get_peft_model_state_dict(module, adapter_name=adapter_name)

    def save_lora(self, output_dir: Path, weight_name: str, adapters: dict[str, tuple[dict, Optional[dict]]]) -> None:
        """The adapter file that the stock pipeline's `load_lora_weights` reads. `adapters` maps a
        pipeline component name (the denoiser's, "text_encoder", "text_encoder_2") to its layers
        (`lora_layers`) and metadata (the peft config as a dict, stored in the file so the reload
        uses the same alpha)."""
        kwargs = {}
        for component, (layers, metadata) in adapters.items():
            kwargs[f"{component}_lora_layers"] = layers
            kwargs[f"{component}_lora_adapter_metadata"] = metadata
        self.pipeline_class.save_lora_weights(output_dir, weight_name=weight_name, safe_serialization=True, **kwargs)


def per_example_mse(prediction: torch.Tensor, target: torch.Tensor, weighting: Optional[torch.Tensor] = None,
                    reduction: str = "mean") -> torch.Tensor:
    """(weighted) squared error, averaged per example [B] ("none"), over everything ("mean"), or
    both as a pair ("both")."""
    error = (prediction.float() - target.float()) ** 2
    if weighting is not None:
        error = weighting.float() * error
    per_example = error.reshape(error.shape[0], -1).mean(dim=1)
    if reduction == "both":
        return per_example.mean(), per_example
    return per_example if reduction == "none" else per_example.mean()
