"""Naming what a method trains: the tensors a checkpoint saves and loads back in place.

A trainable tensor is named `<module name>.<parameter name>` over the unwrapped models, so the
names do not depend on accelerate/DDP wrappers or the number of processes. An embedding table
of which only a few rows train (Textual Inversion, Custom Diffusion) is saved as those rows.
"""

from __future__ import annotations

from typing import Any, Mapping

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
    """Copy checkpoint tensors into the parameters `trainable_state` names, in place.

    Strict for the modules passed: their trainable parameters, shapes and dtypes must match the
    checkpoint's; anything else means the method or the model changed, and resuming would train
    something else than what was saved. Tensors under other prefixes (e.g. `stage1.` rows a
    two-stage method carries over) are left for the caller.
    """
    live = {
        f"{prefix}.{name}": p for prefix, module in modules.items() for name, p in module.named_parameters() if p.requires_grad
    }
    ours = {k for k in tensors if k.split(".", 1)[0] in modules}
    missing, unexpected = sorted(set(live) - ours), sorted(ours - set(live))
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


class TrainedRows:
    """Slices the partly trained table (and its AdamW moments) to its trained rows, and back."""

    def __init__(self, param: torch.nn.Parameter, rows: list[int], modules: Mapping[str, torch.nn.Module],
                 optimizer: torch.optim.Optimizer):
        self.param, self.rows = param, rows
        self.name = next(k for k, t in trainable_state(modules).items() if t.data_ptr() == self.param.data_ptr())
        params = [p for group in optimizer.param_groups for p in group["params"]]
        self.index = next(i for i, p in enumerate(params) if p is self.param)

    def _is_table(self, t: Any) -> bool:
        return torch.is_tensor(t) and t.shape == self.param.shape

    def slim(self, trainable: dict, optimizer: dict) -> tuple[dict, dict]:
        trainable = {**trainable, self.name: trainable[self.name][self.rows]}
        moments = optimizer["state"].get(self.index, {})
        slim = {k: (v[self.rows] if self._is_table(v) else v) for k, v in moments.items()}
        return trainable, {**optimizer, "state": {**optimizer["state"], self.index: slim}}

    def expand(self, trainable: dict, optimizer: dict) -> tuple[dict, dict]:
        """Full-size tensors again: the live table's other rows, zero moments for them (unused:
        those rows are reset after every step and AdamW is elementwise)."""
        table = self.param.detach().cpu().clone()
        table[self.rows] = trainable[self.name].to(table.dtype)
        state = dict(optimizer["state"])
        if self.index in state:
            def full(v: Any) -> Any:
                if not (torch.is_tensor(v) and v.dim() == 2 and v.shape == (len(self.rows), self.param.shape[1])):
                    return v
                out = torch.zeros(self.param.shape, dtype=v.dtype)
                out[self.rows] = v
                return out
            state[self.index] = {k: full(v) for k, v in state[self.index].items()}
        return {**trainable, self.name: table}, {**optimizer, "state": state}
