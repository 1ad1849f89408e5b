"""The training loop of one stage, top to bottom.

    setup method -> reference batch + criterion -> for each step: sample a batch, diffusion loss
    (+ prior loss), backward, optimizer step -> L_det when the evaluation schedule says so
    (eval_schedule.py) and the criterion -> stop at convergence (after minSteps) or maxSteps.

Randomness: the training batches come from their own generator; the reference batch has its own
(see reference_batch.py), so how often L_det is evaluated never changes the training itself.
With several processes (accelerate, one per GPU), the reference batch and the criterion live
on the main process, which broadcasts the stop decision so that all processes stop together.

Preemption: `checkpoints` (resume.py) restores a stage from its checkpoint before the
first step and, after each step, saves one every checkpointEvery steps or on SIGTERM.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Callable, Optional

import torch
from accelerate import Accelerator
from accelerate.utils import broadcast_object_list, set_seed
from diffusers.optimization import get_scheduler

from personalize.clip_check import ClipCheck
from personalize.criteria import StopPolicy, from_spec, window_in_evaluations
from personalize.data import ConceptExamples
from personalize.diffusion import diffusion_loss, encode_captions, sample_latents
from personalize.eval_schedule import schedule_from_spec
from personalize.identifier import Identifier
from personalize.methods import Method, Stage
from personalize.pipeline_io import Models, load_base_pipeline, models_of
from personalize.precision import cast_for_training, is_full_precision, restore_full_precision, weight_dtype
from personalize.prompt_cache import PromptCache
from personalize.reference_batch import ReferenceBatch
from personalize.resume import StageCheckpoints, TrainState
from personalize.stage_outcome import StageOutcome
from personalize.spec import CriterionName, PersonalizationJobSpec

WEIGHT_DECAY = 1e-2  # AdamW default of the diffusers training scripts


@dataclass(frozen=True)
class StepRecord:
    """What the loop reports after each optimizer step. None: not measured at this step."""

    step: int
    train_loss: float
    deterministic_loss: Optional[float]
    convergence_value: Optional[float]
    seconds: float  # wall time of the whole step, evaluation included
    # The part of `seconds` spent on the stop signal (L_det, or the CLIP check): what tracking
    # costs, observable on the user's own hardware (personalization_evaluation_duration_seconds).
    evaluation_seconds: Optional[float]
    # L_det of each reference example at this evaluation, keyed by its timestep (or sigma for
    # flow-matching families), e.g. {"t=0999": 0.041, ...}; None where L_det was not evaluated.
    timestep_losses: Optional[dict[str, float]] = None
    # Cheap per-step training statistics of the concept's own parameters (training_stats.py):
    # lr, grad_norm, update_ratio, update_cosine, adam_snr; None where not measured.
    stats: Optional[dict[str, float]] = None


StepCallback = Callable[[StepRecord], None]


class TrainingDiverged(RuntimeError):
    pass


def process_seed(seed: int, process_index: int, stage_index: int) -> int:
    """The seed of one process's random streams in one stage.

    Distinct large primes keep the (process, stage) streams apart for any small user seed, so
    two processes never draw the same batches and stage 2 does not replay stage 1's draws.
    """
    return seed + 7919 * process_index + 104729 * stage_index


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
) -> tuple[StageOutcome, Method]:
    started = time.monotonic()
    es, training = spec.early_stopping, spec.training
    device = accelerator.device

    # ---- method: what is trained -------------------------------------------------------------
    # Adapter initialisation (LoRA's A matrices) and dropout draw from the global RNGs: seed them,
    # or two runs of the same seed (or a run and its resumption) train different weights.
    seed = process_seed(training.seed, accelerator.process_index, stage_index)
    set_seed(seed)
    method = stage.method_class(models, spec, identifier)
    modules = method.train_modules()
    # frozen weights in the half dtype, trained ones in fp32 (precision.py states the rule)
    cast_for_training(models.modules(), method.parameters, weight_dtype(accelerator))
    if training.gradient_checkpointing:
        enable_gradient_checkpointing(models, method.text_encoder_trained)
    optimizer = torch.optim.AdamW(method.parameters, lr=stage.learning_rate, weight_decay=WEIGHT_DECAY)
    # One schedule step per training step (not per micro-batch or process), over the stage's budget.
    lr_schedule = get_scheduler(training.lr_scheduler.value, optimizer,
                                num_warmup_steps=training.lr_warmup_steps, num_training_steps=stage.max_steps)
    *prepared, optimizer = accelerator.prepare(*modules, optimizer)
    wrapped = {id(m): p for m, p in zip(modules, prepared)}
    denoiser = wrapped.get(id(models.denoiser), models.denoiser)
    text_encoder = wrapped.get(id(models.text_encoder), models.text_encoder)
    for module in modules:
        module.train()
    # DDP averages the gradients of a wrapped module only when its forward runs through the
    # wrapper: here the denoiser's and the first text encoder's. Other trained parameters (SDXL's
    # second text encoder) get their gradients averaged by hand, at the moments DDP syncs.
    synced = {id(p) for m in (models.denoiser, models.text_encoder) if id(m) in wrapped for p in m.parameters()}
    unsynced_trained = [p for p in method.parameters if id(p) not in synced]

    # ---- reference batch and criterion (main process only) -----------------------------------
    n_slots = es.reference_batch_size * es.reference_sub_batches
    reference: Optional[ReferenceBatch] = None
    if accelerator.is_main_process:
        reference = ReferenceBatch(
            examples,
            size=es.reference_batch_size,
            sub_batches=es.reference_sub_batches,
            fixed=es.fixed,
            holdout=es.holdout,
            seed=training.seed,
            models=models,
            text_encoder_trained=method.text_encoder_trained,
            eval_every=es.eval_every,
        )
        train_examples = reference.training_examples
    else:
        indices = ReferenceBatch.select_indices(len(examples), n_slots, training.seed)
        train_examples = ReferenceBatch.training_split(examples, indices, es.holdout)
    window = window_in_evaluations(stage.window_steps, es.criterion_spacing)
    criterion = from_spec(spec, stage.window_steps, stage.threshold)
    schedule = schedule_from_spec(es, stage.threshold, stage.window_steps)  # when L_det is evaluated
    clip_check = None
    if es.criterion == CriterionName.clip and accelerator.is_main_process:
        # the paper's baseline: the criterion consumes CLIP-I of samples, not L_det
        clip_check = ClipCheck(spec, identifier.token, examples.files, examples.images.shape[-1])
    policy = StopPolicy(criterion, stage.max_steps, min(training.min_steps, stage.max_steps))

    # ---- the loop ----------------------------------------------------------------------------
    generator = torch.Generator().manual_seed(seed)
    prior_weight = spec.prior_preservation.prior_loss_weight
    use_prior = stage.prior_preservation and class_examples is not None
    prompts = None
    if not method.text_encoder_trained:  # frozen: each caption is encoded once
        prompts = PromptCache(models)
        with accelerator.autocast():  # encoded as the uncached path would be (half weights here)
            prompts.warm(train_examples.captions + (class_examples.captions if use_prior else []))
        if training.offload_text_encoders:
            prompts.offload_text_encoders()
    step, reason = 0, None
    train_loss = det_loss = conv_value = None

    # ---- resume: continue from a checkpoint of this stage, if there is one ------------------
    generators = {"data": generator} | ({"reference": reference.generator} if reference is not None else {})
    keepers = method.keepers  # embedding tables of which only the identifier's rows train
    state = TrainState({"unet": models.denoiser, "text_encoder": models.text_encoder, **models.extra_text_encoders},
                       optimizer, generators, policy, reference,
                       trained_rows=[(k.embeddings.weight, k.rows) for k in keepers],
                       lr_schedule=lr_schedule, schedule=schedule)
    if checkpoints is not None:
        step = checkpoints.restore(state)  # restores the random streams last: nothing draws before the loop
        last = checkpoints.last
        train_loss, det_loss, conv_value = last["train_loss"], last["deterministic_loss"], last["convergence_value"]
        checkpoints.after_step(step, reason, state, checkpoints.last)  # SIGTERM during setup: exit now

    tracking_seconds = 0.0  # what evaluating the stop signal cost this stage (since a resume, like `started`)
    while reason is None:
        step_started = time.monotonic()
        step += 1
        losses = []
        for _ in range(training.gradient_accumulation_steps):
            with accelerator.accumulate(*prepared):
                # images [B,3,H,W], their original size and crop corner [B,4]
                images, captions, geometry = train_examples.draw(training.batch_size, generator)
                if use_prior:
                    class_images, class_captions, class_geometry = class_examples.draw(training.batch_size, generator)
                    images, captions = torch.cat([images, class_images]), captions + class_captions
                    geometry = torch.cat([geometry, class_geometry])
                with torch.no_grad():
                    latents = sample_latents(models.vae, images.to(device), generator).float()  # [B',4,h,w] fp32
                noise = torch.randn(latents.shape, generator=generator).to(latents)
                timesteps = models.family.draw_timesteps(models, latents.shape[0], generator).to(device)
                with accelerator.autocast():
                    if prompts is not None:
                        embeddings = prompts(captions, device)
                    else:
                        embeddings = encode_captions(models, text_encoder, captions, device)
                    embeddings = embeddings.with_image_geometry(geometry.to(device))
                    per_example = diffusion_loss(
                        denoiser, models, latents, noise, timesteps, embeddings, reduction="none"
                    )  # [B']
                if use_prior:
                    instance, prior = per_example.chunk(2)
                    loss = instance.mean() + prior_weight * prior.mean()
                else:
                    loss = per_example.mean()
                accelerator.backward(loss)
                if accelerator.sync_gradients and accelerator.num_processes > 1:
                    average_gradients(unsynced_trained, accelerator)
                if accelerator.sync_gradients and training.max_grad_norm > 0:
                    for keeper in keepers:
                        keeper.drop_frozen_gradients()  # the norm of what trains, not of rows reset anyway
                    accelerator.clip_grad_norm_(method.parameters, training.max_grad_norm)
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
                losses.append(float(loss.detach()))
        lr_schedule.step()
        method.after_optimizer_step()
        train_loss = sum(losses) / len(losses)
        if accelerator.num_processes > 1:  # the reported loss is the mean over every process's batch
            train_loss = float(accelerator.reduce(torch.tensor([train_loss], device=device), reduction="mean")[0])
        if not math.isfinite(train_loss):
            raise TrainingDiverged(f"training loss became {train_loss} at step {step} of stage {stage.name}")

        det_step = conv_step = eval_seconds = None
        if reference is not None:
            loss_policy = policy if clip_check is None else None  # the policy the L_det series feeds
            if schedule.due(step, loss_policy):
                eval_started = time.monotonic()
                with accelerator.autocast():  # returns a float: on a GPU the time includes the kernels
                    det_step = reference.deterministic_loss(models.denoiser, models.text_encoder)
                det_loss, eval_seconds = det_step, time.monotonic() - eval_started
            conv_step = schedule.observe(step, det_step, loss_policy)
            if clip_check is not None and step % es.clip.every_steps == 0:
                eval_started = time.monotonic()
                with accelerator.autocast():  # the frozen weights are in the half dtype here
                    conv_step = policy.update(clip_check.score(models))
                eval_seconds = (eval_seconds or 0.0) + time.monotonic() - eval_started
            conv_value = conv_step if conv_step is not None else conv_value
            reason = policy.check(step)
        if accelerator.num_processes > 1:
            reason = broadcast_object_list([reason])[0]  # every process stops together
        tracking_seconds += eval_seconds or 0.0
        on_step(StepRecord(step, train_loss, det_step, conv_step, time.monotonic() - step_started, eval_seconds))
        if checkpoints is not None:  # every checkpointEvery steps, and on SIGTERM (then raises TrainingInterrupted)
            last = {"train_loss": train_loss, "deterministic_loss": det_loss, "convergence_value": conv_value}
            checkpoints.after_step(step, reason, state, last)

    seconds = time.monotonic() - started
    full_precision(models, spec)
    return StageOutcome(
        name=stage.name,
        max_steps=stage.max_steps,
        stop_step=step,
        reason=reason,
        criterion=es.criterion.value,
        window_evaluations=window,
        threshold=stage.threshold,
        train_loss=train_loss,
        deterministic_loss=det_loss,
        convergence_value=conv_value,
        reference=reference.info() if reference is not None else None,
        seconds=seconds,
        tracking_seconds=tracking_seconds,
    ), method


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
