"""Naming what a method trains: the tensors a checkpoint saves and loads back in place.

A trainable tensor is named `<module name>.<parameter name>` over the unwrapped models, so the
names do not depend on accelerate/DDP wrappers or the number of processes (a method names its
own: `Method.named_parameters`, which also names token rows trained as their own parameters).
"""

from __future__ import annotations

from typing import Mapping

import torch

from personalize.errors import CheckpointError


def trainable_state(modules: Mapping[str, torch.nn.Module]) -> dict[str, torch.Tensor]:
    """Every parameter with requires_grad, named `<module name>.<parameter name>`.

    Pass the unwrapped models (`{"unet": models.unet, "text_encoder": models.text_encoder}`), not
    accelerate/DDP wrappers, so names do not depend on the number of processes. The tensors are
    the live parameters: `save_checkpoint` copies them to the CPU.
    """
    return {
        f"{prefix}.{name}": p.detach()
        for prefix, module in modules.items()
        for name, p in module.named_parameters()
        if p.requires_grad
    }


def load_trainable_state(modules: Mapping[str, torch.nn.Module], tensors: Mapping[str, torch.Tensor]) -> None:
    """Copy checkpoint tensors into the parameters `trainable_state` names, in place (see `load_named`)."""
    live = {
        f"{prefix}.{name}": p for prefix, module in modules.items() for name, p in module.named_parameters() if p.requires_grad
    }
    load_named(live, {k: t for k, t in tensors.items() if k.split(".", 1)[0] in modules})


def load_named(live: Mapping[str, torch.nn.Parameter], tensors: Mapping[str, torch.Tensor]) -> None:
    """Copy checkpoint tensors into the named trained parameters, in place.

    Strict: the names, shapes and dtypes must match the checkpoint's; anything else means the
    method or the model changed, and resuming would train something else than what was saved.
    The caller leaves out tensors it handles itself (e.g. `stage1.` rows a two-stage method
    carries over).
    """
    missing, unexpected = sorted(set(live) - set(tensors)), sorted(set(tensors) - set(live))
    if missing or unexpected:
        raise CheckpointError(
            "the checkpoint's trained tensors do not match what this method trains "
            f"(missing: {missing[:5]}, unexpected: {unexpected[:5]})"
        )
    for name, p in live.items():
        t = tensors[name]
        if t.shape != p.shape or t.dtype != p.dtype:
            raise CheckpointError(
                f"checkpoint tensor {name!r} is {t.dtype} {tuple(t.shape)}, the model has {p.dtype} {tuple(p.shape)}"
            )
    with torch.no_grad():
        for name, p in live.items():
            p.copy_(tensors[name].to(p.device))
