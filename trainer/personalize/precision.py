"""Mixed precision: which dtype each weight has while training, and the one dtype outside it.

The numeric rule (docs/trainer.md, "Mixed precision"):

- Master weights are fp32. While a stage trains with `mixedPrecision: fp16|bf16`, every frozen
  weight is cast to the half dtype (normalisation layers excepted: they stay fp32, as autocast
  computes them) and every trained one stays fp32 (what diffusers'
  `cast_training_params` does): a LoRA or Custom Diffusion UNet holds its base weights in half
  precision and only its adapters in fp32. The forward passes run under autocast.
- Losses are reduced in fp32: the UNet's prediction is cast to fp32 before the squared error,
  and L_det's mean over examples and sub-batches is taken in fp32 (then a Python float).
- Outside training everything is fp32 again: the frozen weights are re-read from the base model
  (casting them back would keep their half-precision rounding), so class images, sample grids and
  the saved artifacts all come from one fp32 model, which stock diffusers pipelines load in fp32
  or with `dtype=torch.float16|bfloat16`.

fp16 on CPU: torch's CPU autocast supports float16, but accelerate enables fp16 autocast (and its
gradient scaler) only on accelerator devices; `cpu_fp16` makes the trainer do both itself, so a
CPU run really computes in fp16 instead of silently training in fp32.
"""

from __future__ import annotations

from typing import Iterable

import torch
from accelerate import Accelerator

HALF_DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16}


def make_accelerator(mixed_precision: str, gradient_accumulation_steps: int = 1) -> Accelerator:
    """An Accelerator that really uses `mixed_precision` on every device (no silent fp32 on CPU)."""
    cpu = not torch.cuda.is_available()
    accelerator = Accelerator(
        mixed_precision=mixed_precision, gradient_accumulation_steps=gradient_accumulation_steps, cpu=cpu
    )
    if mixed_precision == "fp16" and accelerator.device.type == "cpu" and not accelerator.native_amp:
        # accelerate leaves fp16 off on CPU (autocast and scaler): switch on torch's CPU fp16
        # autocast and a CPU gradient scaler, as accelerate does on a GPU.
        accelerator.native_amp = True
        accelerator.scaler = torch.amp.GradScaler("cpu")
    if mixed_precision != "no" and not accelerator.native_amp:
        raise RuntimeError(f"mixed precision {mixed_precision} is not available on {accelerator.device}")
    return accelerator


def weight_dtype(accelerator: Accelerator) -> torch.dtype:
    """The dtype of the frozen weights while training (fp32 without mixed precision)."""
    return HALF_DTYPES.get(accelerator.mixed_precision, torch.float32)


# Normalisation layers keep fp32 weights: they are tiny, and CPU kernels accept a half input with
# fp32 weights but not an fp32 input (e.g. from a trained fp32 embedding row) with half weights.
NORM_LAYERS = (torch.nn.LayerNorm, torch.nn.GroupNorm, torch.nn.RMSNorm, torch.nn.modules.batchnorm._NormBase)


@torch.no_grad()
def cast_for_training(modules: Iterable[torch.nn.Module], trained: list[torch.nn.Parameter], dtype: torch.dtype) -> None:
    """Frozen weights to `dtype` (normalisation layers excepted), trained ones fp32 (the
    optimizer then updates fp32 masters)."""
    for module in modules:
        for layer in module.modules():
            if isinstance(layer, NORM_LAYERS):
                continue
            for p in layer.parameters(recurse=False):
                if not p.requires_grad and p.dtype != dtype:
                    p.data = p.data.to(dtype)
            for name, buffer in layer.named_buffers(recurse=False):
                if buffer.is_floating_point() and buffer.dtype != dtype:
                    setattr(layer, name, buffer.to(dtype))
    for p in trained:
        p.data = p.data.float()


def is_full_precision(modules: Iterable[torch.nn.Module]) -> bool:
    return all(p.dtype == torch.float32 for m in modules for p in m.parameters() if p.is_floating_point())


@torch.no_grad()
def restore_full_precision(parts: dict[str, torch.nn.Module], base: dict[str, torch.nn.Module]) -> None:
    """Every weight back to fp32: frozen ones from the base model's own (fp32) weights, so no
    half-precision rounding stays behind; trained ones (fp32 already) are kept.

    `parts` and `base` map component names (unet, vae, text_encoder) to modules; adapter layers
    (peft's `base_layer`) are matched to the base weight they wrap.
    """
    for name, module in parts.items():
        originals = dict(base[name].named_parameters())
        for key, p in module.named_parameters():
            if p.requires_grad or p.dtype == torch.float32:
                continue
            original = originals.get(key.replace(".base_layer", ""))
            restored = p.detach().float()
            if original is None or original.shape[1:] != p.shape[1:] or original.shape[0] > p.shape[0]:
                raise RuntimeError(f"{name}.{key}: no base weight of the same shape to restore in fp32")
            # an embedding table may have more rows (added tokens): those keep their upcast value
            restored[: original.shape[0]] = original.detach().to(restored.device, torch.float32)
            p.data = restored
        module.to(dtype=torch.float32)  # buffers and anything without a base counterpart
