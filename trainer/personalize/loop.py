"""The training loop, top to bottom: one loop for one concept or a pack of many.

    for each step, while any slot trains:
        every slot draws its rows (images, class images, latent noise, noise, timesteps)
        one VAE encode, one text-encoder pass for the slots that train it, one denoiser forward
        loss = sum over slots of each slot's own mean -> one backward: each slot's gradient is
               its solo gradient (its rows reach only its own weights, routing.py)
        each slot clips and steps its own optimizer
        L_det of the slots whose evaluation is due, in one forward over their reference batches
        each slot's criterion -> a slot that stops leaves (its outputs are written by the caller)
        `between_steps`: new slots may join here, at their own step 0

A solo run is a pack of one slot (`train_stage`). A slot's state is its own (slot.py).

Randomness: each slot's training rows come from its own generator and its reference batch from
another, so how often L_det is evaluated, and which other slots share the batch, never change a
slot's training. With several processes (accelerate, one per GPU; solo runs only), the
reference batch and the criterion live on the main process, which broadcasts the stop decision.

Preemption: each slot's `checkpoints` (resume.py) restore it before its first step and, after
each step, save one every checkpointEvery steps or on SIGTERM (all slots save, then the loop
raises TrainingInterrupted).
"""

from __future__ import annotations

import time
from typing import Callable, Optional

import torch
from accelerate import Accelerator
from accelerate.utils import broadcast_object_list

from personalize.data import ConceptExamples
from personalize.diffusion import diffusion_loss, encode_captions, latent_distribution
from personalize.families.base import Conditioning
from personalize.identifier import Identifier
from personalize.methods import Method, Stage
from personalize.methods.base import freeze
from personalize.pipeline_io import Models, load_base_pipeline, models_of
from personalize.precision import cast_for_training, is_full_precision, restore_full_precision, weight_dtype
from personalize.reference_batch import ModeSwitch
from personalize.resume import StageCheckpoints
from personalize.routing import DENOISER, TEXT, BatchRouting
from personalize.shutdown import TrainingInterrupted
from personalize.slot import Rows, Slot, StepCallback, StepRecord, TrainingDiverged, process_seed
from personalize.spec import PersonalizationJobSpec, StopReason
from personalize.stage_outcome import StageOutcome

__all__ = ["Pack", "StepRecord", "StepCallback", "TrainingDiverged", "process_seed", "train", "train_stage"]


def enable_gradient_checkpointing(models: Models, text_encoder_trained: bool) -> None:
    """Recompute activations in the backward pass instead of keeping them (less memory, more
    compute): the denoiser always (it is in every backward pass), the text encoder when it trains."""
    models.denoiser.enable_gradient_checkpointing()
    if text_encoder_trained:
        models.text_encoder.activation_checkpointing_enable()


def average_gradients(parameters: list[torch.nn.Parameter], accelerator: Accelerator) -> None:
    """Each parameter's gradient becomes the mean over processes (what DDP does for the modules
    it wraps)."""
    for p in parameters:
        if p.grad is not None:
            p.grad.copy_(accelerator.reduce(p.grad, reduction="mean"))


class Pack:
    """The shared part of a packed stage: the models (frozen, shared by every slot), the routing
    that tells their layers which rows are whose, and the slots training now."""

    def __init__(self, models: Models, accelerator: Accelerator, gradient_checkpointing: bool = False):
        self.models, self.accelerator = models, accelerator
        self.routing = BatchRouting()
        self.gradient_checkpointing = gradient_checkpointing
        self.slots: list[Slot] = []
        self.prepared: list[torch.nn.Module] = []  # modules that went through accelerator.prepare
        self.denoiser, self.text_encoder = models.denoiser, models.text_encoder  # wrapped, once prepared
        self._synced: set[int] = set()  # parameters whose gradients DDP averages
        self._modes: dict[int, ModeSwitch] = {}
        freeze(models)

    def add(self, slot: Slot) -> None:
        """A slot joins (before the loop starts, or between steps). Its trained weights are fp32,
        the frozen ones in the half dtype; peft re-marks adapters on every injection, so every
        slot's parameters are marked trainable again."""
        self.slots.append(slot)
        self._modes.clear()  # its adapters or processors joined the module trees
        self.refresh_trainable()
        for s in self.slots:
            s.method.attach()  # another slot's new token may have replaced an embedding table
        cast_for_training(self.models.modules(), slot.method.parameters, weight_dtype(self.accelerator))
        if self.gradient_checkpointing:
            enable_gradient_checkpointing(self.models, slot.method.text_encoder_trained)
        modules = [m for m in slot.method.train_modules() if any(p.requires_grad for p in m.parameters())]
        new = [m for m in modules if all(m is not p for p in self.prepared)]
        if new and not self.prepared:  # once, before training: DDP wraps modules with trained weights
            wrapped = self.accelerator.prepare(*new)
            wrapped = wrapped if isinstance(wrapped, tuple) else (wrapped,)
            by_id = {id(m): w for m, w in zip(new, wrapped)}
            self.denoiser = by_id.get(id(self.models.denoiser), self.denoiser)
            self.text_encoder = by_id.get(id(self.models.text_encoder), self.text_encoder)
            self.prepared = list(wrapped)
            # DDP averages the gradients of a wrapped module only when its forward runs through
            # the wrapper; other trained parameters (SDXL's second text encoder, token rows) are
            # averaged by hand at the moments DDP syncs.
            self._synced = {id(p) for m in (self.models.denoiser, self.models.text_encoder)
                            if id(m) in by_id for p in m.parameters()}
        slot.optimizer = self.accelerator.prepare(slot.optimizer)
        slot.state.optimizer = slot.optimizer
        for module in slot.method.train_modules():
            module.train()

    def leave(self, slot: Slot) -> None:
        """A slot stops training: nothing of it stays referenced by the pack (a long-running pack
        sees many slots come and go), and the module trees are listed again on their next switch."""
        if slot in self.slots:
            self.slots.remove(slot)
        optimizers = self.accelerator._optimizers  # accelerate keeps every prepared optimizer
        optimizers[:] = [o for o in optimizers if o is not slot.optimizer]
        self._modes.clear()

    def refresh_trainable(self) -> None:
        """After a slot's weights were removed: peft re-marks the remaining adapters, so every
        training slot's parameters are marked trainable again."""
        for s in self.slots:
            for p in s.method.parameters:
                p.requires_grad_(True)

    def average_unsynced(self, parameters: list[torch.nn.Parameter]) -> None:
        average_gradients([p for p in parameters if id(p) not in self._synced], self.accelerator)

    def _mode(self, module: torch.nn.Module) -> ModeSwitch:
        switch = self._modes.get(id(module))
        if switch is None or switch.module is not module:
            switch = self._modes[id(module)] = ModeSwitch(module)
        return switch

    # ---- the batch ---------------------------------------------------------------------------

    def conditioning(self, slots: list[Slot], batches: list[Rows], device) -> Conditioning:
        """Every slot's caption conditioning in slot order: cached for frozen text encoders, and
        one routed text-encoder pass for the slots that train it."""
        cached = [s.cached_conditioning(b.captions, device) for s, b in zip(slots, batches)]
        live = [i for i, c in enumerate(cached) if c is None]
        if live:  # rows routed by the caller (text_routes)
            captions = [c for i in live for c in batches[i].captions]
            encoded = encode_captions(self.models, self.text_encoder, captions, device)
            start = 0
            for i in live:
                cached[i] = encoded[start:start + len(batches[i])]
                start += len(batches[i])
        geometry = torch.cat([b.geometry for b in batches]).to(device)
        return Conditioning.cat(cached).with_image_geometry(geometry)

    @staticmethod
    def text_routes(slots: list[Slot], batches: list[Rows]) -> list[str]:
        """The route of each caption the text encoder encodes live (slots whose text encoder trains)."""
        return [s.route for s, b in zip(slots, batches) if s.prompts is None for _ in b.captions]

    def encode_latents(self, slots: list[Slot], batches: list[Rows], device) -> None:
        """One VAE pass for every slot's images; each slot draws its own latent noise."""
        with torch.no_grad():
            mean, std = latent_distribution(self.models.vae, torch.cat([b.images for b in batches]).to(device))
        start = 0
        for slot, rows in zip(slots, batches):
            part = slice(start, start + len(rows))
            slot.draw_noise(rows, self.models, mean[part], std[part], device)
            start += len(rows)

    # ---- L_det of several slots in one forward -----------------------------------------------

    def evaluate(self, slots: list[Slot]) -> dict[int, tuple[float, dict[str, float], float]]:
        """L_det, its per-timestep values and the evaluation's seconds (shared by rows) per slot id."""
        if not slots:
            return {}
        started = time.monotonic()
        device = self.accelerator.device
        denoiser, text_encoder = self.models.denoiser, self.models.text_encoder  # unwrapped: no DDP hooks
        models = [denoiser, text_encoder]
        was_training = [m.training for m in models]
        for m in models:
            self._mode(m).set(False)
        try:
            with torch.inference_mode(), self.accelerator.autocast():
                parts = []
                for slot in slots:
                    with self.routing.uniform(slot.route):  # a LoRA-trained text encoder: the slot's adapter
                        parts.append(slot.reference.components(text_encoder))
                per_example = {id(s): [] for s in slots}
                for sub in range(max(s.reference.sub_batches for s in slots)):
                    members = [(s, p) for s, p in zip(slots, parts) if sub < s.reference.sub_batches]
                    rows = [slice(sub * s.reference.size, (sub + 1) * s.reference.size) for s, _ in members]
                    latents = torch.cat([p[0][r] for (_, p), r in zip(members, rows)]).to(device, torch.float32)
                    noise = torch.cat([p[1][r] for (_, p), r in zip(members, rows)]).to(device, torch.float32)
                    timesteps = torch.cat([p[2][r] for (_, p), r in zip(members, rows)]).to(device)
                    conditioning = Conditioning.cat([p[3][r] for (_, p), r in zip(members, rows)]).to(device, torch.float32)
                    routes = [s.route for s, _ in members for _ in range(s.reference.size)]
                    with self.routing.rows(DENOISER, routes):
                        losses = diffusion_loss(denoiser, self.models, latents, noise, timesteps, conditioning,
                                                reduction="none").float()
                    start = 0
                    for s, _ in members:
                        per_example[id(s)].append(losses[start:start + s.reference.size])
                        start += s.reference.size
        finally:
            for m, training in zip(models, was_training):
                self._mode(m).set(training)
        seconds = time.monotonic() - started
        total_rows = sum(s.reference.n_slots for s in slots)
        out = {}
        for slot in slots:
            reference, parts_ = slot.reference, per_example[id(slot)]
            reference.evaluations += 1
            det = sum(float(p.mean()) for p in parts_) / reference.sub_batches
            values = torch.cat(parts_).cpu().tolist()
            labels = reference.slot_labels
            order = sorted(range(len(values)), key=lambda i: (int(reference.timesteps[i]), i)) \
                if reference.fixed.timesteps else range(len(values))
            out[id(slot)] = (det, {labels[i]: values[i] for i in order}, seconds * reference.n_slots / total_rows)
        return out


def train(pack: Pack, between_steps: Optional[Callable[[Pack, list[Slot]], None]] = None) -> None:
    """Train every slot of `pack` until each has stopped. `between_steps(pack, left)` runs after
    every step with the slots that left at it (write their outputs; new slots may join)."""
    accelerator, models = pack.accelerator, pack.models
    device = accelerator.device
    while pack.slots:
        step_started = time.monotonic()
        slots = list(pack.slots)
        losses: dict[int, list[float]] = {id(s): [] for s in slots}
        for slot in slots:
            slot.step += 1
        for _ in range(accelerator.gradient_accumulation_steps):
            with accelerator.accumulate(*pack.prepared):
                # each slot's rows: images [n,3,H,W] -> latents [n,C,h,w], noise, timesteps [n]
                batches = [slot.draw_images() for slot in slots]
                pack.encode_latents(slots, batches, device)
                routes = [slot.route for slot, rows in zip(slots, batches) for _ in range(len(rows))]
                # routed through the backward too: gradient checkpointing re-runs the forward there
                with pack.routing.rows(DENOISER, routes), pack.routing.rows(TEXT, pack.text_routes(slots, batches)):
                    with accelerator.autocast():
                        conditioning = pack.conditioning(slots, batches, device)
                        per_example = diffusion_loss(
                            pack.denoiser, models,
                            torch.cat([b.latents for b in batches]), torch.cat([b.noise for b in batches]),
                            torch.cat([b.timesteps for b in batches]), conditioning, reduction="none",
                        )  # [sum of n]
                    slot_losses = [slot.loss(part, rows) for slot, part, rows
                                   in zip(slots, per_example.split([len(b) for b in batches]), batches)]
                    # the sum of each slot's own mean: each slot's gradient is its solo gradient
                    accelerator.backward(torch.stack(slot_losses).sum())
                for slot, loss in zip(slots, slot_losses):
                    slot.step_optimizer(accelerator, pack.average_unsynced)
                    losses[id(slot)].append(float(loss.detach()))
        for slot in slots:
            slot.finish_step(losses[id(slot)], accelerator)

        # ---- the stop decision of each slot --------------------------------------------------
        evaluations = pack.evaluate([slot for slot in slots if slot.evaluation_due()])
        interrupted = None
        for slot in slots:
            if slot.failure is not None:  # diverged: it leaves now, the caller reports why
                continue
            det, timestep_losses, eval_seconds = evaluations.get(id(slot), (None, None, None))
            eval_started = time.monotonic()

            def clip_score(slot=slot) -> float:
                with accelerator.autocast(), pack.routing.uniform(slot.route):  # the frozen weights are half here
                    return slot.clip_check.score(models)

            conv = slot.observe(det, eval_seconds, clip_score)
            if slot.clip_check is not None and slot.step % slot.spec.early_stopping.clip.every_steps == 0:
                eval_seconds = (eval_seconds or 0.0) + time.monotonic() - eval_started
            if accelerator.num_processes > 1:
                slot.reason = broadcast_object_list([slot.reason])[0]  # every process stops together
            slot.tracking_seconds += eval_seconds or 0.0
            try:  # its log line, metrics, trackers and samples: a failure there is this slot's alone
                slot.on_step(StepRecord(slot.step, slot.train_loss, det, conv, time.monotonic() - step_started,
                                        eval_seconds, timestep_losses, slot.stats))
            except TrainingInterrupted:
                raise
            except Exception as err:  # noqa: BLE001 (re-raised by a solo run, reported by a pack)
                slot.failure, slot.reason = err, StopReason.failed
                continue
            try:
                slot.after_step()  # checkpoint when due
            except TrainingInterrupted as stop:  # SIGTERM: every slot saves first
                interrupted = interrupted or stop
        left = [slot for slot in slots if slot.reason is not None]
        for slot in left:
            pack.leave(slot)
        if between_steps is not None:  # slots that stopped at this step write their outputs, even on SIGTERM
            between_steps(pack, left)
        if interrupted is not None:
            raise interrupted


def train_stage(
    stage: Stage,
    spec: PersonalizationJobSpec,
    models: Models,
    identifier: Identifier,
    examples: ConceptExamples,
    class_examples: Optional[ConceptExamples],
    accelerator: Accelerator,
    on_step: StepCallback,
    stage_index: int = 0,
    checkpoints: Optional[StageCheckpoints] = None,
    snapshots=None,
) -> tuple[StageOutcome, Method]:
    """One stage of a solo run: a pack of one slot. `snapshots`: artifacts.Snapshots, or None."""
    pack = Pack(models, accelerator, spec.training.gradient_checkpointing)
    slot = Slot(stage.name, stage, spec, models, identifier, examples, class_examples, accelerator,
                pack.routing, on_step, stage_index=stage_index)
    slot.snapshots = snapshots
    if spec.training.offload_text_encoders and slot.prompts is not None:
        slot.prompts.offload_text_encoders()
    pack.add(slot)
    slot.restore(checkpoints)
    train(pack)
    if slot.failure is not None:
        raise slot.failure
    outcome = slot.outcome()
    # fp32 tables first: finish() writes the trained token rows (fp32) back into their tables,
    # which in mixed precision are half until full_precision and would round the rows.
    full_precision(models, spec)
    slot.method.finish()
    return outcome, slot.method


def full_precision(models: Models, spec: PersonalizationJobSpec) -> None:
    """After a mixed-precision stage: every weight fp32 again, the frozen ones re-read from the
    base model, so samples, class images and artifacts all come from one fp32 model."""
    parts = component_modules(models)
    if is_full_precision(parts.values()):
        return
    base = models_of(load_base_pipeline(spec.base_model, spec), spec)
    restore_full_precision(parts, component_modules(base))


def component_modules(models: Models) -> dict[str, torch.nn.Module]:
    """Every weight-holding part by one name per part (the denoiser, vae and text encoders)."""
    return {"denoiser": models.denoiser, "vae": models.vae, "text_encoder": models.text_encoder,
            **models.extra_text_encoders}
