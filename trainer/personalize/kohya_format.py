"""A LoRA in kohya's format: the file layout of kohya-ss/sd-scripts' `networks/lora.py`, which
AUTOMATIC1111, Forge, ComfyUI and most LoRA hubs read (`output.formats: [diffusers, kohya]`).

Made from the diffusers LoRA file the run already wrote, so both files hold the same numbers:

    diffusers file (save_lora_weights)                   kohya file
    unet.<module>.lora.down.weight                   ->  lora_unet_<module, "." -> "_">.lora_down.weight
    unet.<module>.lora.up.weight                     ->  lora_unet_<...>.lora_up.weight
    text_encoder.<module>.lora_linear_layer.down...  ->  lora_te_text_model_<...>.lora_down.weight
    (SDXL: text_encoder / text_encoder_2             ->  lora_te1_ / lora_te2_)
    the adapter's lora_alpha (file metadata)         ->  <name>.alpha, a scalar: the scale is alpha / rank

UNet module names: SD 1.x/2.x keep diffusers' block names (sd-scripts trains SD on a
diffusers-layout UNet), SDXL takes the original (SGM) layout's `input_blocks` / `middle_block` /
`output_blocks` (sd-scripts trains SDXL on that UNet, and SDXL LoRAs are keyed by it). Text
encoder names are the original CLIP model's (`text_model.encoder.layers...`), whichever
transformers version laid the module out. Only modules inside the UNet's attention blocks have
an SGM name here; that is where LoRA adapters go (the default targets and any attention projection).

The metadata is what sd-scripts' train_network.py writes (`ss_*`, every value a string) and the
Stability model spec (`modelspec.*`), plus the run's stop decision (`personalization.earlyStop`,
JSON as in result.json, and a sentence in `ss_training_comment`). Nothing time-dependent goes in:
the same weights give the same file.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any, Mapping, Optional

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from personalize.spec import EarlyStop, PersonalizationJobSpec

# The families with a kohya LoRA layout (detection.FamilyInfo names).
KOHYA_FAMILIES = ("sd", "sdxl")

# A diffusers-format LoRA key: component, module path, up or down. save_lora_weights writes the
# UNet's as `.lora.down`, the text encoders' as `.lora_linear_layer.down`; peft's own A/B too.
_DIFFUSERS_KEY = re.compile(
    r"^(?P<component>unet|text_encoder|text_encoder_2)\.(?P<module>.+?)\."
    r"(?:lora\.(?P<d1>down|up)|lora_linear_layer\.(?P<d2>down|up)|lora_(?P<ab>A|B))\.weight$"
)
_AB = {"A": "down", "B": "up"}
_ADAPTER_METADATA_KEY = "lora_adapter_metadata"  # where save_lora_weights keeps each adapter's config

_BLOCK = re.compile(r"^(?P<kind>down_blocks|up_blocks)\.(?P<block>\d+)\.attentions\.(?P<layer>\d+)\.(?P<rest>.+)$")
_MID = re.compile(r"^mid_block\.attentions\.0\.(?P<rest>.+)$")


class KohyaFormatError(ValueError):
    """A LoRA that has no kohya layout (e.g. an adapter outside the UNet's attention blocks)."""


def sgm_unet_module(module: str, layers_per_block: int) -> str:
    """The SGM (original SDXL) name of a diffusers UNet module inside an attention block.

    The SGM UNet numbers its blocks flat: `input_blocks.0` is conv_in, then each down level
    holds `layers_per_block` (resnet, attention) pairs and a downsampler; each up level holds
    `layers_per_block + 1` pairs (its upsampler inside the last). Index 1 inside a pair is the
    attention (0 the resnet); the middle block is (resnet, attention, resnet)."""
    per_level = layers_per_block + 1
    if (m := _BLOCK.match(module)) is not None:
        block, layer = int(m["block"]), int(m["layer"])
        if m["kind"] == "down_blocks":
            return f"input_blocks.{1 + block * per_level + layer}.1.{m['rest']}"
        return f"output_blocks.{block * per_level + layer}.1.{m['rest']}"
    if (m := _MID.match(module)) is not None:
        return f"middle_block.1.{m['rest']}"
    raise KohyaFormatError(f"the UNet module {module!r} is outside the attention blocks and has no kohya (SGM) name")


def clip_module(module: str) -> str:
    """A CLIP text encoder module under the original model's names (`text_model.` first):
    transformers 5 lays CLIPTextModel out without that level, earlier versions with it."""
    return module if module.startswith("text_model.") else f"text_model.{module}"


def kohya_prefix(component: str, family: str) -> str:
    if component == "unet":
        return "lora_unet"
    if family == "sdxl":
        return {"text_encoder": "lora_te1", "text_encoder_2": "lora_te2"}[component]
    return "lora_te"


def kohya_name(component: str, module: str, family: str, layers_per_block: int) -> str:
    """The kohya LoRA name of one adapted module, e.g. `lora_unet_down_blocks_0_attentions_0_..._to_q`."""
    if component == "unet":
        path = sgm_unet_module(module, layers_per_block) if family == "sdxl" else module
    else:
        path = clip_module(module)
    return f"{kohya_prefix(component, family)}_{path.replace('.', '_')}"


def read_diffusers_lora(path: Path) -> tuple[dict[tuple[str, str], dict[str, torch.Tensor]], dict[str, float]]:
    """The diffusers LoRA file as {(component, module): {"down": A, "up": B}} and each
    component's alpha (from the adapter config in the file's metadata; rank where absent)."""
    layers: dict[tuple[str, str], dict[str, torch.Tensor]] = {}
    with safe_open(str(path), framework="pt") as f:
        metadata = f.metadata() or {}
        for key in f.keys():
            m = _DIFFUSERS_KEY.match(key)
            if m is None:
                raise KohyaFormatError(f"{path.name}: {key!r} is not a LoRA weight of the UNet or a text encoder")
            direction = m["d1"] or m["d2"] or _AB[m["ab"]]
            layers.setdefault((m["component"], m["module"]), {})[direction] = f.get_tensor(key)
    config = json.loads(metadata.get(_ADAPTER_METADATA_KEY, "{}"))
    alphas = {}
    for component in {c for c, _ in layers}:
        if config.get(f"{component}.alpha_pattern") or config.get(f"{component}.rank_pattern"):
            raise KohyaFormatError(f"{path.name}: per-module ranks or alphas of {component} have no kohya form here")
        if config.get(f"{component}.use_rslora"):
            raise KohyaFormatError(f"{path.name}: rank-stabilised LoRA (scale alpha/sqrt(rank)) has no kohya form")
        alpha = config.get(f"{component}.lora_alpha")
        if alpha is not None:
            alphas[component] = float(alpha)
    return layers, alphas


def kohya_state_dict(layers: Mapping[tuple[str, str], Mapping[str, torch.Tensor]], alphas: Mapping[str, float],
                     family: str, layers_per_block: int) -> dict[str, torch.Tensor]:
    """kohya's keys for the adapters: `<name>.lora_down.weight`, `<name>.lora_up.weight`, `<name>.alpha`."""
    if family not in KOHYA_FAMILIES:
        raise KohyaFormatError(f"model family {family!r} has no kohya LoRA layout here (SD 1.x/2.x and SDXL do)")
    state: dict[str, torch.Tensor] = {}
    for (component, module), pair in sorted(layers.items()):
        name = kohya_name(component, module, family, layers_per_block)
        down, up = pair["down"], pair["up"]
        state[f"{name}.lora_down.weight"] = down.contiguous()
        state[f"{name}.lora_up.weight"] = up.contiguous()
        rank = down.shape[0]
        state[f"{name}.alpha"] = torch.tensor(alphas.get(component, float(rank)), dtype=torch.float32)
    return state


# ---- metadata -------------------------------------------------------------------------------

# sd-scripts' ss_base_model_version and the model spec's architecture, per base model.
_SD_V1, _SD_V2, _SDXL = "sd_v1", "sd_v2", "sdxl_base_v1-0"
_ARCHITECTURE = {_SD_V1: "stable-diffusion-v1", _SDXL: "stable-diffusion-xl-v1-base"}
_IMPLEMENTATION = {"sd": "diffusers", "sdxl": "https://github.com/Stability-AI/generative-models"}


def base_model_version(family: str, unet_config: Mapping[str, Any]) -> str:
    """sd_v1, sd_v2 (SD 2.x: its UNet attends to 1024-wide OpenCLIP states) or sdxl_base_v1-0."""
    if family == "sdxl":
        return _SDXL
    return _SD_V2 if unet_config.get("cross_attention_dim") == 1024 else _SD_V1


def base_model_name(spec: PersonalizationJobSpec) -> str:
    """What sd-scripts records as ss_sd_model_name: the hub id, or the file or folder name."""
    source = spec.base_model
    if source.hub_id:
        return source.hub_id
    if source.builtin:
        return source.builtin
    return Path(source.path or "").name


def stop_sentence(early_stop: Optional[EarlyStop], max_steps: int) -> str:
    """The stop decision in words, for UIs that show ss_training_comment."""
    if early_stop is None or early_stop.step is None:
        return "snapshot during training (no stop decision yet)"
    criterion = early_stop.criterion.value if early_stop.criterion is not None else "none"
    if early_stop.stopped:
        return (f"stopped early by {criterion} at step {early_stop.step} of {max_steps} "
                f"(convergence value {early_stop.value:.4g} under threshold {early_stop.threshold:g})")
    reason = early_stop.reason.value if early_stop.reason is not None else "unknown"
    return f"trained {early_stop.step} of {max_steps} steps ({reason}; criterion {criterion})"


def kohya_metadata(
    spec: PersonalizationJobSpec,
    *,
    family: str,
    unet_config: Mapping[str, Any],
    prediction_type: str,
    resolution: int,
    rank: int,
    alpha: float,
    steps: int,
    num_images: int,
    trigger: str,
    title: str,
    early_stop: Optional[EarlyStop] = None,
) -> dict[str, str]:
    """The file's metadata: sd-scripts' ss_* keys, the model spec and the stop decision."""
    version = base_model_version(family, unet_config)
    v_prediction = prediction_type == "v_prediction"
    architecture = _ARCHITECTURE.get(version) or ("stable-diffusion-v2-768-v" if v_prediction else "stable-diffusion-v2-512")
    training = spec.training
    prior = spec.prior_preservation_enabled
    metadata: dict[str, Any] = {
        "ss_network_module": "networks.lora",
        "ss_network_dim": rank,
        "ss_network_alpha": alpha,
        "ss_base_model_version": version,
        "ss_v2": version == _SD_V2,
        "ss_sd_model_name": base_model_name(spec),
        "ss_output_name": title,
        "ss_resolution": (resolution, resolution),
        "ss_steps": steps,
        "ss_max_train_steps": spec.max_steps,
        "ss_learning_rate": spec.learning_rate,
        "ss_lr_scheduler": training.lr_scheduler.value,
        "ss_lr_warmup_steps": training.lr_warmup_steps,
        "ss_batch_size_per_device": training.batch_size,
        "ss_gradient_accumulation_steps": training.gradient_accumulation_steps,
        "ss_gradient_checkpointing": training.gradient_checkpointing,
        "ss_max_grad_norm": training.max_grad_norm,
        "ss_mixed_precision": training.mixed_precision.value,
        "ss_seed": training.seed,
        "ss_optimizer": "torch.optim.AdamW",
        "ss_num_train_images": num_images,
        "ss_num_reg_images": spec.prior_preservation.num_class_images if prior else 0,
        "ss_prior_loss_weight": spec.prior_preservation.prior_loss_weight if prior else 0.0,
        "ss_training_comment": stop_sentence(early_stop, spec.max_steps),
        "modelspec.sai_model_spec": "1.0.0",
        "modelspec.architecture": f"{architecture}/lora",
        "modelspec.implementation": _IMPLEMENTATION[family],
        "modelspec.title": title,
        "modelspec.resolution": f"{resolution}x{resolution}",
        "modelspec.prediction_type": "v" if v_prediction else "epsilon",
        "modelspec.trigger_phrase": trigger,
    }
    if early_stop is not None:
        metadata["personalization.earlyStop"] = json.dumps(early_stop.to_api(), sort_keys=True)
    # sd-scripts writes str() of every value (so booleans read "True", tuples "(512, 512)")
    return {key: str(value) for key, value in metadata.items()}


def write_kohya_lora(diffusers_file: Path, kohya_file: Path, *, family: str, unet_config: Mapping[str, Any],
                     metadata_fields: Mapping[str, Any], spec: PersonalizationJobSpec) -> None:
    """The kohya file made from `diffusers_file`, with kohya_metadata(spec, **metadata_fields)
    completed by the file's own rank and alpha (of the UNet's adapter)."""
    layers, alphas = read_diffusers_lora(diffusers_file)
    layers_per_block = unet_config.get("layers_per_block", 2)
    if not isinstance(layers_per_block, int):  # the SGM numbering assumes the same count at every level
        raise KohyaFormatError(f"a UNet with layers_per_block {layers_per_block!r} per level has no kohya layout here")
    state = kohya_state_dict(layers, alphas, family, layers_per_block)
    unet_down = [pair["down"] for (component, _), pair in sorted(layers.items()) if component == "unet"]
    rank = unet_down[0].shape[0] if unet_down else next(iter(layers.values()))["down"].shape[0]
    alpha = alphas.get("unet", float(rank))
    metadata = kohya_metadata(spec, family=family, unet_config=unet_config, rank=rank, alpha=alpha, **metadata_fields)
    tmp = kohya_file.with_name(kohya_file.name + ".tmp")  # never a half-written file under the real name
    save_file(state, str(tmp), metadata=metadata)
    tmp.replace(kohya_file)
