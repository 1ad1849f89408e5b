"""One concept's training state in a (packed) stage: a `Slot`.

A pack trains several concepts on one set of frozen base weights in one batch (loop.py); a solo
run is a pack of one slot. Everything that is one concept's lives here, so that nothing of one
concept can leak into another's training:

    method          what it trains (its own token rows, LoRA adapter or Custom Diffusion weights)
    optimizer       its own AdamW, learning rate and schedule; clipping sees its parameters only
    generator       its own stream for images, latent noise, noise and timesteps
    reference       its own reference batch, criterion (StopPolicy), evaluation schedule
    checkpoints     its own checkpoint folder (resume.py)

The loop asks a slot for its rows of the batch (`draw`), its loss from its rows' per-example
losses (`loss`), to step its optimizer (`step_optimizer`), and after the step whether it stops
(`decide`). `route` names the slot in the routing (routing.py) of every shared layer.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Callable, Optional

import torch
from accelerate import Accelerator
from diffusers.optimization import get_scheduler

from personalize.clip_check import ClipCheck
from personalize.criteria import StopPolicy, from_spec, window_in_evaluations
from personalize.data import ConceptExamples
from personalize.diffusion import encode_captions, scaled_latents
from personalize.eval_schedule import schedule_from_spec
from personalize.families.base import Conditioning, Models
from personalize.identifier import Identifier
from personalize.methods import Stage
from personalize.prompt_cache import PromptCache
from personalize.reference_batch import ReferenceBatch
from personalize.resume import StageCheckpoints, TrainState
from personalize.routing import BatchRouting
from personalize.spec import CriterionName, PersonalizationJobSpec, StopReason
from personalize.stage_outcome import StageOutcome
from personalize.training_stats import UpdateStatistics

WEIGHT_DECAY = 1e-2  # AdamW default of the diffusers training scripts


@dataclass(frozen=True)
class StepRecord:
    """What the loop reports after each of a slot's optimizer steps. None: not measured at this step."""

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


@dataclass
class Rows:
    """One slot's rows of a training batch: its instance rows, then its class rows (prior
    preservation). Images first; the latents are filled in once the whole batch is encoded."""

    images: torch.Tensor  # [n, 3, H, W]
    captions: list[str]
    geometry: torch.Tensor  # [n, 4] original size and crop corner
    instance: int  # how many of the rows are the concept's (the rest are class images)
    latents: Optional[torch.Tensor] = None  # [n, C, h, w] fp32
    noise: Optional[torch.Tensor] = None
    timesteps: Optional[torch.Tensor] = None

    def __len__(self) -> int:
        return len(self.captions)


class Slot:
    def __init__(
        self,
        name: str,
        stage: Stage,
        spec: PersonalizationJobSpec,
        models: Models,
        identifier: Identifier,
        examples: ConceptExamples,
        class_examples: Optional[ConceptExamples],
        accelerator: Accelerator,
        routing: BatchRouting,
        on_step: StepCallback,
        stage_index: int = 0,
        route: str = "default",
    ):
        self.name, self.stage, self.spec, self.route = name, stage, spec, route
        self.on_step = on_step
        self.snapshots = None  # artifacts.Snapshots: loadable artifacts every output.snapshotEvery steps
        self.identifier = identifier
        es, training = spec.early_stopping, spec.training
        self.started = time.monotonic()

        # ---- method: what is trained --------------------------------------------------------
        # Adapter initialisation (LoRA's A matrices) draws from the global RNG: seeded per slot
        # and forked, so a slot joining a pack starts exactly as its solo run and moves no other's.
        self.seed = process_seed(training.seed, accelerator.process_index, stage_index)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.seed)
            self.method = stage.method_class(models, spec, identifier, routing=routing, route=route)
        self.optimizer = torch.optim.AdamW(self.method.parameters, lr=stage.learning_rate, weight_decay=WEIGHT_DECAY)
        # One schedule step per training step (not per micro-batch or process), over the stage's budget.
        self.lr_schedule = get_scheduler(training.lr_scheduler.value, self.optimizer,
                                         num_warmup_steps=training.lr_warmup_steps, num_training_steps=stage.max_steps)

        # ---- reference batch and criterion (main process only) -------------------------------
        n_ref = es.reference_batch_size * es.reference_sub_batches
        self.reference: Optional[ReferenceBatch] = None
        if accelerator.is_main_process:
            self.reference = ReferenceBatch(
                examples, size=es.reference_batch_size, sub_batches=es.reference_sub_batches, fixed=es.fixed,
                holdout=es.holdout, seed=training.seed, models=models,
                text_encoder_trained=self.method.text_encoder_trained, eval_every=es.eval_every,
            )
            self.train_examples = self.reference.training_examples
        else:
            indices = ReferenceBatch.select_indices(len(examples), n_ref, training.seed)
            self.train_examples = ReferenceBatch.training_split(examples, indices, es.holdout)
        self.window = window_in_evaluations(stage.window_steps, es.criterion_spacing)
        self.schedule = schedule_from_spec(es, stage.threshold, stage.window_steps)  # when L_det is evaluated
        self.clip_check = None
        if es.criterion == CriterionName.clip and accelerator.is_main_process:
            # the paper's baseline: the criterion consumes CLIP-I of samples, not L_det
            self.clip_check = ClipCheck(spec, identifier.token, examples.files, examples.images.shape[-1])
        self.policy = StopPolicy(from_spec(spec, stage.window_steps, stage.threshold), stage.max_steps,
                                 min(training.min_steps, stage.max_steps))

        # ---- data ----------------------------------------------------------------------------
        self.generator = torch.Generator().manual_seed(self.seed)
        self.class_examples = class_examples if stage.prior_preservation else None
        self.prompts: Optional[PromptCache] = None
        if not self.method.text_encoder_trained:  # frozen: each caption is encoded once
            self.prompts = PromptCache(models)
            # encoded by the base text encoder (its adapters belong to other slots), as the
            # uncached path would encode them (half weights here)
            with accelerator.autocast(), routing.uniform(route):  # encoded as the uncached path would be (half weights here)
                self.prompts.warm(self.train_examples.all_captions
                                  + (self.class_examples.captions if self.class_examples is not None else []))

        # lr, gradient norm, update size and direction, Adam's signal-to-noise: of this slot's own
        # parameters, from what each step already holds (training_stats.py)
        self.statistics = UpdateStatistics(self.method.parameters, self.optimizer)
        self.stats: Optional[dict[str, float]] = None
        self.step, self.reason = 0, None
        self.failure: Optional[BaseException] = None
        self.train_loss = self.det_loss = self.conv_value = None
        self.tracking_seconds = 0.0  # what evaluating the stop signal cost (since a resume, like `started`)
        self.checkpoints: Optional[StageCheckpoints] = None
        generators = {"data": self.generator} | ({"reference": self.reference.generator} if self.reference else {})
        self.state = TrainState(self.method.named_parameters(), self.optimizer, generators, self.policy,
                                self.reference, lr_schedule=self.lr_schedule, schedule=self.schedule,
                                statistics=self.statistics)

    # ---- resume ------------------------------------------------------------------------------

    def restore(self, checkpoints: Optional[StageCheckpoints]) -> None:
        """Continue from this stage's checkpoint, if there is one (random streams restored last)."""
        self.checkpoints = checkpoints
        if checkpoints is None:
            return
        self.step = checkpoints.restore(self.state)
        last = checkpoints.last
        self.train_loss, self.det_loss, self.conv_value = last["train_loss"], last["deterministic_loss"], last["convergence_value"]
        checkpoints.after_step(self.step, self.reason, self.state, checkpoints.last)  # SIGTERM during setup: exit now

    # ---- one training step -------------------------------------------------------------------

    def draw_images(self) -> Rows:
        """This step's images and captions (and class images), from the slot's own stream."""
        batch_size, g = self.spec.training.batch_size, self.generator
        images, captions, geometry = self.train_examples.draw(batch_size, g)
        rows = Rows(images, captions, geometry, instance=len(captions))
        if self.class_examples is not None:
            class_images, class_captions, class_geometry = self.class_examples.draw(batch_size, g)
            rows.images, rows.captions = torch.cat([images, class_images]), captions + class_captions
            rows.geometry = torch.cat([geometry, class_geometry])
        return rows

    def draw_noise(self, rows: Rows, models: Models, mean: torch.Tensor, std: torch.Tensor, device) -> None:
        """The latent sample, noise and timesteps of this slot's rows (VAE posterior [n,C,h,w] given)."""
        g = self.generator
        latent_noise = torch.randn(mean.shape, generator=g, dtype=torch.float32).to(mean)
        rows.latents = scaled_latents(models.vae, mean, std, latent_noise).float()
        rows.noise = torch.randn(rows.latents.shape, generator=g).to(rows.latents)
        rows.timesteps = models.family.draw_timesteps(models, len(rows), g).to(device)

    def cached_conditioning(self, captions: list[str], device) -> Optional[Conditioning]:
        """The captions' conditioning when the text encoder is frozen; None: encode them live."""
        return self.prompts(captions, device) if self.prompts is not None else None

    def loss(self, per_example: torch.Tensor, rows: Rows) -> torch.Tensor:
        """The slot's own loss from its rows' per-example losses [n]: its gradient is its solo gradient."""
        if rows.instance == len(rows):
            return per_example.mean()
        instance, prior = per_example[: rows.instance], per_example[rows.instance:]
        return instance.mean() + self.spec.prior_preservation.prior_loss_weight * prior.mean()

    def step_optimizer(self, accelerator: Accelerator, average: Callable[[list], None]) -> None:
        """Clip the slot's own gradients (never another slot's) and step its optimizer."""
        max_norm, sync = self.spec.training.max_grad_norm, accelerator.sync_gradients
        if sync and accelerator.num_processes > 1:
            average(self.method.parameters)
        if sync:  # the norm before clipping, of unscaled gradients (fp16: divided by the loss scale)
            scaler = getattr(accelerator, "scaler", None)
            self.statistics.observe_gradients(scaler.get_scale() if scaler is not None else 1.0)
        if sync and max_norm > 0:
            accelerator.clip_grad_norm_(self.method.parameters, max_norm)
        self.optimizer.step()
        if sync:
            self.stats = self.statistics.after_step()
        self.optimizer.zero_grad(set_to_none=True)

    def finish_step(self, losses: list[float], accelerator: Accelerator) -> None:
        """After the step's micro-batches: the schedule, the method's own bookkeeping, the loss."""
        self.lr_schedule.step()
        self.method.after_optimizer_step()
        train_loss = sum(losses) / len(losses)
        if accelerator.num_processes > 1:  # the reported loss is the mean over every process's batch
            train_loss = float(accelerator.reduce(torch.tensor([train_loss], device=accelerator.device), reduction="mean")[0])
        self.train_loss = train_loss
        if not math.isfinite(train_loss):
            self.failure = TrainingDiverged(f"training loss became {train_loss} at step {self.step} of stage {self.stage.name}")
            self.reason = StopReason.failed

    # ---- the stop decision -------------------------------------------------------------------

    @property
    def loss_policy(self) -> Optional[StopPolicy]:
        """The policy the L_det series feeds (None under the CLIP criterion)."""
        return self.policy if self.clip_check is None else None

    def evaluation_due(self) -> bool:
        return self.reference is not None and self.reason is None and self.schedule.due(self.step, self.loss_policy)

    def observe(self, det_loss: Optional[float], eval_seconds: Optional[float], clip_score: Callable[[], float]) -> Optional[float]:
        """Feed this step's L_det (None: not evaluated) and, when due, a CLIP check; the
        criterion's new value. Sets `reason` when the slot stops here."""
        if self.reference is None or self.reason is not None:
            return None
        conv = self.schedule.observe(self.step, det_loss, self.loss_policy)
        if self.clip_check is not None and self.step % self.spec.early_stopping.clip.every_steps == 0:
            conv = self.policy.update(clip_score())
        if det_loss is not None:
            self.det_loss = det_loss
        self.conv_value = conv if conv is not None else self.conv_value
        self.reason = self.policy.check(self.step)
        return conv

    def after_step(self) -> None:
        """Checkpoint when due (and on SIGTERM, which raises TrainingInterrupted); a snapshot when due."""
        if self.checkpoints is not None:
            last = {"train_loss": self.train_loss, "deterministic_loss": self.det_loss, "convergence_value": self.conv_value}
            self.checkpoints.after_step(self.step, self.reason, self.state, last)
        if self.snapshots is not None:
            self.snapshots.after_step(self.step, self.reason is not None, self.method)

    def outcome(self) -> StageOutcome:
        return StageOutcome(
            name=self.stage.name,
            max_steps=self.stage.max_steps,
            stop_step=self.step,
            reason=self.reason,
            criterion=self.spec.early_stopping.criterion.value,
            window_evaluations=self.window,
            threshold=self.stage.threshold,
            train_loss=self.train_loss,
            deterministic_loss=self.det_loss,
            convergence_value=self.conv_value,
            reference=self.reference.info() if self.reference is not None else None,
            seconds=time.monotonic() - self.started,
            tracking_seconds=self.tracking_seconds,
        )

