"""Which rows of a packed batch belong to which concept, and the layers that read it.

Several concepts (slots) train in one batch on one set of frozen weights. Each slot's rows must
see only its own trained weights:

    Textual Inversion  the token's rows of the embedding table: routed by token id, so nothing
                       here (every slot has its own token; `IdentifierRows` swaps them in)
    LoRA               peft adapters, one per slot on the same layers: routed by row (each
                       slot's adapter added on its rows' slice; other layer kinds through
                       peft's own mixed-batch forward, `adapter_names`)
    Custom Diffusion   cross-attention key/value copies, one set per slot: `RoutedAttnProcessor`
                       splits the batch by row ranges and runs each slot's processor on its rows

`BatchRouting` is set once per forward (and kept through the backward, which recomputes the
forward under gradient checkpointing): for each routed component ("denoiser", "text") the route
name of every row, or one name for a whole batch of any size (samples, CLIP checks).
"""

from __future__ import annotations

import contextlib
from functools import partial
from typing import Iterator, Optional

import torch

# peft's name for "no adapter on these rows"; our routed processors read it the same way.
BASE = "__base__"
DENOISER, TEXT = "denoiser", "text"


class BatchRouting:
    def __init__(self) -> None:
        self._rows: dict[str, list[str]] = {}
        self._uniform: Optional[str] = None

    @contextlib.contextmanager
    def rows(self, component: str, names: list[str]) -> Iterator[None]:
        """Route rows of `component`'s batch: `names[i]` is the route of row i."""
        previous = self._rows.get(component)
        self._rows[component] = names
        try:
            yield
        finally:
            if previous is None:
                self._rows.pop(component, None)
            else:
                self._rows[component] = previous

    @contextlib.contextmanager
    def uniform(self, name: str) -> Iterator[None]:
        """Every row of every component to one route (sampling one concept: BASE before training)."""
        previous, self._uniform = self._uniform, name
        try:
            yield
        finally:
            self._uniform = previous

    def names(self, component: str, batch: int) -> Optional[list[str]]:
        """The route of each of `batch` rows, or None when nothing is routed (the layers then
        behave as without packing)."""
        if self._uniform is not None:
            return [self._uniform] * batch
        names = self._rows.get(component)
        if names is not None and len(names) != batch:
            raise RuntimeError(f"routing: {component} got a batch of {batch} rows, {len(names)} are routed")
        return names


def spans(names: list[str]) -> list[tuple[str, int, int]]:
    """Contiguous runs of one route: [(name, start, end)] (a slot's rows are contiguous)."""
    out: list[tuple[str, int, int]] = []
    for i, name in enumerate(names):
        if out and out[-1][0] == name:
            out[-1] = (name, out[-1][1], i + 1)
        else:
            out.append((name, i, i + 1))
    return out


# ---- LoRA: one adapter per slot, each on its own rows ---------------------------------------------

def _pass_adapter_names(routing: BatchRouting, component: str, module, args, kwargs):
    names = routing.names(component, len(args[0]))
    if names is None:
        return None
    return args, {**kwargs, "adapter_names": names}


def _sliced_lora_forward(layer, routing: BatchRouting, component: str, peft_forward):
    """A peft LoRA Linear's forward with each slot's adapter added on its own contiguous rows
    (slices, no gathers: peft's mixed-batch forward indexes every row of every layer)."""

    def forward(x, *args, **kwargs):
        names = routing.names(component, len(x))
        if names is None or layer.disable_adapters or layer.merged:
            return peft_forward(x, *args, **kwargs)
        runs = spans(names)
        if any(name in layer.lora_variant for name, _, _ in runs):  # e.g. DoRA: peft's own routing
            return peft_forward(x, *args, adapter_names=names, **kwargs)
        result = layer.base_layer(x, *args, **kwargs)
        if _groupable(layer, runs, x):
            return result + _grouped_lora_delta(layer, runs, x).to(result.dtype)
        parts = []
        for name, start, end in runs:
            part = result[start:end]
            if name in layer.lora_A:
                lora_A, lora_B = layer.lora_A[name], layer.lora_B[name]
                rows = x[start:end].to(lora_A.weight.dtype)
                part = part + (lora_B(lora_A(layer.lora_dropout[name](rows))) * layer.scaling[name]).to(part.dtype)
            parts.append(part)
        return parts[0] if len(parts) == 1 else torch.cat(parts)

    return forward


def _groupable(layer, runs: list[tuple[str, int, int]], x: torch.Tensor) -> bool:
    """Whether every slot's adapter can run in one batched matmul: several slots with as many rows
    each, all with a plain adapter of one shape here (no dropout, no bias), on contiguous input."""
    if len(runs) < 2 or len({end - start for _, start, end in runs}) != 1 or not x.is_contiguous():
        return False
    names = [name for name, _, _ in runs]
    if not all(name in layer.lora_A for name in names):
        return False
    return (len({tuple(layer.lora_A[n].weight.shape) + tuple(layer.lora_B[n].weight.shape) for n in names}) == 1
            and all(isinstance(layer.lora_dropout[n], torch.nn.Identity) and layer.lora_B[n].bias is None
                    for n in names))


def _grouped_lora_delta(layer, runs: list[tuple[str, int, int]], x: torch.Tensor) -> torch.Tensor:
    """Every slot's LoRA delta, B_s(A_s(x_s)) * scale_s, in two batched matmuls over [slots, rows, in]:
    the number of kernels stays the same as slots are added (a loop over slots launches 3 per slot)."""
    names = [name for name, _, _ in runs]
    lora_A = torch.stack([layer.lora_A[n].weight for n in names])  # [S, r, in]
    lora_B = torch.stack([layer.lora_B[n].weight for n in names])  # [S, out, r]
    scale = torch.tensor([layer.scaling[n] for n in names], dtype=lora_A.dtype, device=x.device)
    rows = x.to(lora_A.dtype).reshape(len(names), -1, x.shape[-1])  # [S, rows x tokens, in]
    delta = torch.bmm(torch.bmm(rows, lora_A.transpose(1, 2)), lora_B.transpose(1, 2)) * scale[:, None, None]
    return delta.reshape(*x.shape[:-1], lora_B.shape[1])


def route_lora_layers(module: torch.nn.Module, routing: BatchRouting, component: str) -> None:
    """Route every peft LoRA layer of `module` by rows (once per layer): plain LoRA Linear layers
    through a sliced forward, any other kind through peft's own mixed-batch forward."""
    from peft.tuners.lora import Linear, LoraLayer  # noqa: PLC0415 (peft only for LoRA)

    for layer in module.modules():
        if not isinstance(layer, LoraLayer) or getattr(layer, "_pj_routed", False):
            continue
        if type(layer) is Linear:
            layer.forward = _sliced_lora_forward(layer, routing, component, layer.forward)
        else:
            layer.register_forward_pre_hook(partial(_pass_adapter_names, routing, component), with_kwargs=True)
        layer._pj_routed = True


# ---- Custom Diffusion: one processor per slot, split by rows --------------------------------------

class RoutedAttnProcessor(torch.nn.Module):
    """A cross-attention processor that runs each slot's Custom Diffusion processor on that
    slot's rows (attention is per example, so splitting the batch changes nothing), and the
    plain processor on rows of slots that train something else."""

    def __init__(self, routing: BatchRouting, base) -> None:
        super().__init__()
        self.routing = routing
        self.base = base  # not a Module: diffusers' AttnProcessor2_0
        self.by_route = torch.nn.ModuleDict()

    def processor(self, name: str):
        return self.by_route[name] if name in self.by_route else self.base

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, **kwargs):
        names = self.routing.names(DENOISER, hidden_states.shape[0])
        if names is None:  # unrouted: only meaningful with one slot (e.g. a solo run's stock use)
            names = [next(iter(self.by_route), BASE)] * hidden_states.shape[0]
        parts = []
        for name, start, end in spans(names):
            rows = slice(start, end)
            parts.append(self.processor(name)(
                attn, hidden_states[rows],
                encoder_hidden_states=None if encoder_hidden_states is None else encoder_hidden_states[rows],
                attention_mask=None if attention_mask is None else attention_mask[rows], **kwargs))
        return parts[0] if len(parts) == 1 else torch.cat(parts)


# ---- Textual Inversion / Custom Diffusion: the token's rows as a parameter of their own ------------

class IdentifierRows:
    """The identifier's rows of one text encoder's embedding table, as a trained parameter of
    their own ([n, D], fp32), swapped into the embedding's output wherever the token occurs.

    The table itself stays frozen and shared by every slot; each slot's optimizer sees only its
    own rows (AdamW and clipping are elementwise/row-local, so this trains exactly what training
    the whole table and resetting the other rows did). After every optimizer step the rows are
    written back into the table, so samples, saves and later stages read the table as before.
    """

    def __init__(self, encoder: torch.nn.Module, token_ids: list[int]):
        self.encoder, self.token_ids = encoder, list(token_ids)
        table = encoder.get_input_embeddings().weight
        self.weight = torch.nn.Parameter(table[self.token_ids].detach().float().clone())
        self._ids = torch.tensor(self.token_ids)
        self._hooked: Optional[torch.nn.Module] = None
        self._handle = None
        self.attach()

    def attach(self) -> None:
        """Hook the encoder's current embedding module (adding tokens for a new slot replaces it)."""
        embeddings = self.encoder.get_input_embeddings()
        if embeddings is self._hooked:
            return
        if self._handle is not None:
            self._handle.remove()
        self._handle, self._hooked = embeddings.register_forward_hook(self._substitute), embeddings

    def _substitute(self, module, inputs, output: torch.Tensor) -> torch.Tensor:
        ids = inputs[0]
        for k in range(len(self.token_ids)):  # [B, L, 1] mask of the token, its row elsewhere unchanged
            mask = (ids == self._ids[k].to(ids.device)).unsqueeze(-1)
            output = torch.where(mask, self.weight[k].to(output.dtype), output)
        return output

    @torch.no_grad()
    def write_back(self) -> None:
        table = self.encoder.get_input_embeddings().weight
        table[self.token_ids] = self.weight.to(table.device, table.dtype)

    def detach(self) -> None:
        """Stop substituting (the table holds the final rows)."""
        self.write_back()
        if self._handle is not None:
            self._handle.remove()
        self._handle = self._hooked = None
