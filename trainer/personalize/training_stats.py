"""Cheap statistics of one concept's optimizer steps, from what each step already holds (no
extra forward or backward pass):

    lr             the learning rate this step used (read before the schedule moves on)
    grad_norm      L2 norm of the gradient over the trained values, before clipping: what
                   clipping compares with training.maxGradNorm
    update_ratio   ||dw|| / ||w||: how far the step moved the weights, relative to their size
    update_cosine  cos(dw_t, dw_{t-1}): near 1 successive steps agree (still travelling), near 0
                   or below they cancel out (noise-dominated, how a learned concept looks)
    adam_snr       mean over elements of m_hat^2 / v_hat (AdamW's bias-corrected moments), averaged
                   over the last `horizon` steps: 1 for a steady gradient, about
                   (1 - beta1) / (1 + beta1) (0.05 at beta1 = 0.9) for pure noise

The update dw is derived from AdamW's state after the step (torch.optim.AdamW's own formula,
inverted), so no copy of the weights is taken before the step; the cost is a few elementwise
passes over the trained values and one host sync per step, and one copy of the trained values in
memory (the previous update, for the cosine).

Call points, once per optimizer step (with gradient accumulation: only when gradients sync):

    backward -> observe_gradients() -> clip -> optimizer.step() -> after_step() -> zero_grad

Embedding tables of which only some rows train (Textual Inversion's keepers) are measured on
those rows only: the other rows are reset after every step and would only dilute the numbers.
Each concept of a pack owns one instance over its own parameters and optimizer.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Iterable, Sequence
from typing import Optional

import torch

STAT_NAMES = ("lr", "grad_norm", "update_ratio", "update_cosine", "adam_snr")


class UpdateStatistics:
    def __init__(
        self,
        parameters: Iterable[torch.nn.Parameter],
        optimizer: torch.optim.Optimizer,
        trained_rows: Sequence[tuple[torch.nn.Parameter, Sequence[int]]] = (),
        horizon: int = 10,
    ):
        """`optimizer`: a torch.optim.AdamW (or accelerate's wrapper of one) over `parameters`;
        `trained_rows`: (table, row indices) pairs measured on those rows only."""
        self.optimizer = getattr(optimizer, "optimizer", optimizer)  # accelerate wraps it
        if not isinstance(self.optimizer, torch.optim.AdamW):
            raise TypeError(f"UpdateStatistics reads AdamW's state, not {type(self.optimizer).__name__}'s")
        self.parameters = list(parameters)
        self.groups = {id(p): g for g in self.optimizer.param_groups for p in g["params"]}
        self.rows = {id(p): torch.as_tensor(list(r), dtype=torch.long) for p, r in trained_rows}
        self._snr: deque[float] = deque(maxlen=horizon)
        self._previous: dict[int, torch.Tensor] = {}  # the last update, per parameter
        self._observed: Optional[dict] = None

    def state_dict(self) -> dict:
        """What a resumed run needs to go on with the same numbers: the last update of each
        parameter (by its position in `parameters`) and the signal-to-noise window."""
        index = {id(p): i for i, p in enumerate(self.parameters)}
        # clones: the updates are views of one flat tensor per group, which a checkpoint cannot share
        return {"snr": list(self._snr), "previous": {str(index[k]): t.clone() for k, t in self._previous.items()}}

    def load_state_dict(self, state: dict) -> None:
        self._snr.clear()
        self._snr.extend(state.get("snr", []))
        self._previous = {id(self.parameters[int(i)]): t.to(self.parameters[int(i)].device)
                          for i, t in state.get("previous", {}).items()}

    def _part(self, p: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """`t` (a tensor shaped like parameter `p`) restricted to what trains of `p`, in fp32."""
        rows = self.rows.get(id(p))
        return (t if rows is None else t[rows.to(t.device)]).float()

    @torch.no_grad()
    def observe_gradients(self, grad_scale: float = 1.0) -> None:
        """Right after backward, before clipping. `grad_scale`: the loss scale the gradients
        still carry (fp16's GradScaler before unscaling), divided out of the norm."""
        grads = [self._part(p, p.grad) for p in self.parameters if p.grad is not None]
        norm = torch.nn.utils.get_total_norm(grads) if grads else None
        self._observed = {
            "grad_norm": norm / grad_scale if norm is not None else None,
            "lr": float(self.optimizer.param_groups[0]["lr"]),
            "lrs": {id(p): float(self.groups[id(p)]["lr"]) for p in self.parameters},
            # AdamW steps only parameters with a gradient; a skipped step (fp16 overflow) moves none
            "steps": {id(p): self._step_count(p) for p in self.parameters if p.grad is not None},
        }

    def _step_count(self, p: torch.Tensor) -> int:
        step = self.optimizer.state.get(p, {}).get("step", 0)
        return int(step.item() if torch.is_tensor(step) else step)

    @torch.no_grad()
    def after_step(self) -> dict[str, float]:
        """Right after optimizer.step() (before zero_grad and the lr schedule's step): this step's
        statistics, keyed by STAT_NAMES; NaN where undefined (the cosine at the first step).

        Parameters that share an optimizer group, a step count and whether this step moved them
        are measured together, flattened into one vector: a LoRA's dozens of small tensors cost a
        few elementwise passes, not a few per tensor."""
        if self._observed is None:
            raise RuntimeError("after_step() without observe_gradients() before the optimizer step")
        observed, self._observed = self._observed, None
        buckets: dict[tuple[int, int, bool], list[torch.nn.Parameter]] = {}
        for p in self.parameters:
            t = self._step_count(p)
            # AdamW moves only parameters that had a gradient, and none on a skipped step
            moved = id(p) in observed["steps"] and t != observed["steps"][id(p)]
            buckets.setdefault((id(self.groups[id(p)]), t, moved), []).append(p)
        sums = None  # |dw|^2, |w|^2, dw.dw', |dw'|^2, snr sum, snr count (on the device: one sync)
        stepped = False
        for (_, t, moved), params in buckets.items():
            group = self.groups[id(params[0])]
            weights = [self._part(p, p.detach()).reshape(-1) for p in params]
            sizes = [len(part) for part in weights]
            w = torch.cat(weights)
            zero = w.new_zeros(())
            update, before, snr = None, w, w.new_zeros(0)
            if t > 0:
                # AdamW's bias-corrected moments; its step is w_t = w_{t-1} (1 - lr wd) - lr m_hat / (sqrt(v_hat) + eps)
                beta1, beta2 = group["betas"]
                m_hat = self._state(params, "exp_avg") / (1 - beta1**t)
                v_hat = self._state(params, "exp_avg_sq") / (1 - beta2**t)
                positive = v_hat > 0  # elements that never had a gradient have no ratio
                snr = m_hat[positive].square() / v_hat[positive]
                if moved:  # AdamW's step solved for the weights before it
                    lr = observed["lrs"][id(params[0])]
                    before = (w + lr * m_hat / (v_hat.sqrt() + group["eps"])) / (1 - lr * group["weight_decay"])
                    update = w - before
            stepped |= moved
            previous = None  # the last update of each, zeros where a parameter has none
            if any(id(p) in self._previous for p in params):
                previous = torch.cat([self._previous[id(p)].reshape(-1).float() if id(p) in self._previous
                                      else w.new_zeros(n) for p, n in zip(params, sizes)])
            part = torch.stack([
                update.square().sum() if update is not None else zero,
                before.square().sum(),
                (update * previous).sum() if update is not None and previous is not None else zero,
                previous.square().sum() if previous is not None else zero,
                snr.sum(),
                w.new_tensor(float(snr.numel())),
            ]).double()
            sums = part if sums is None else sums + part.to(sums.device)
            for p, piece in zip(params, update.split(sizes) if update is not None else [None] * len(params)):
                if piece is not None:
                    self._previous[id(p)] = piece
                else:
                    self._previous.pop(id(p), None)  # not moved by this step: nothing to compare the next with
        dw2, w2, dot, prev2, snr_sum, snr_count = sums.tolist() if sums is not None else [0.0] * 6
        if snr_count:
            self._snr.append(snr_sum / snr_count)
        nan = math.nan
        norm = observed["grad_norm"]
        return {
            "lr": observed["lr"],
            "grad_norm": float(norm) if norm is not None else nan,
            "update_ratio": math.sqrt(dw2 / w2) if stepped and w2 > 0 else nan,
            "update_cosine": dot / math.sqrt(dw2 * prev2) if dw2 > 0 and prev2 > 0 else nan,
            "adam_snr": sum(self._snr) / len(self._snr) if self._snr else nan,
        }

    def _state(self, params: list[torch.nn.Parameter], key: str) -> torch.Tensor:
        """AdamW's state `key` of each parameter, on what trains of it, flattened and concatenated."""
        return torch.cat([self._part(p, self.optimizer.state[p][key]).reshape(-1) for p in params])
