"""Run one PersonalizationJob: load everything, train each stage (loop.py), write the outputs.

Output directory layout:
    <artifact files of the method>  learned_embeds.safetensors, pytorch_lora_weights.safetensors,
                                    pytorch_custom_diffusion_weights.safetensors, pipeline/
    class_images/                   prior-preservation images (cached; reused on restart)
    losses.csv  convergence.png  samples_before.png  samples.png  result.json
    checkpoints/                    while running: the latest resumable checkpoint (resume.py);
                                    removed once result.json is written
    .upload-state.json              with output.uri: what is uploaded (storage/uploads.py)

With output.uri every checkpoint is mirrored to the store and a start without a local one
restores the newest from there; after result.json the folder is uploaded, result.json last
(storage/publish.py). A failed upload exits 1 and the next attempt only uploads.

Preemption: on SIGTERM the loop finishes its step, saves a checkpoint and raises
TrainingInterrupted; result.json and the status then say so without a decision (not Failed), and
run.main exits 143. The next start resumes from the checkpoint.

Extension points (instead of patching this module): `after_step` is called on the main process
after every training step, with the models being trained (`TrainedStep`); `after_training` once
the last stage is done, with the trained models in hand (`TrainedRun`); `sample_grids=False`
skips samples_before.png and samples.png.
"""

from __future__ import annotations

import contextlib
import logging
import os
import time
from pathlib import Path
from dataclasses import dataclass
from typing import Callable, Collection, Optional

import diffusers
import torch
import transformers
from accelerate import Accelerator

from personalize.artifacts import Snapshots, save_artifacts, snapshot_files
from personalize.data import ConceptExamples, caption_file_words, examples_of
from personalize.errors import TrainerInputError
from personalize.identifier import Identifier, add_to_more_encoders, setup_identifier
from personalize.loop import StepRecord, train_stage
from personalize.methods import Stage, learns_embedding, plan_stages
from personalize.metrics import TrainerMetrics
from personalize.pipeline_io import Models, default_resolution, load_base_pipeline, models_of
from personalize.plotting import plot_convergence
from personalize.precision import make_accelerator
from personalize.prior import class_prompt, prepare_class_images
from personalize.progress import ProgressPrinter, tracking_cost
from personalize.reporting.rows import step_row
from personalize.reporting.status_view import ended_progress, running_progress, shown
from personalize.reporting.step_samples import StepSamples
from personalize.reporting.trackers import Trackers
from personalize.resume import RunCheckpoints
from personalize.routing import BASE, BatchRouting
from personalize.run_files import LOSSES_FILE, PLOT_FILE, RESULT_FILE, write_json, write_losses_csv
from personalize.samples import SAMPLES_BEFORE_FILE, SAMPLES_FILE, write_samples
from personalize.spec import (
    Artifact,
    CriterionName,
    EarlyStop,
    PersonalizationJob,
    Progress,
    RunResult,
    StopReason,
    TrainerReport,
)
from personalize.shutdown import GracefulShutdown, TrainingInterrupted
from personalize.stage_outcome import StageOutcome
from personalize.status_reporter import EXIT_STATUS_UNREPORTED, StatusReporter, StatusReportError
from personalize.storage.checkpoint_sync import CheckpointSync
from personalize.storage.publish import finish_upload
from personalize.storage.uploads import OutputUpload
from personalize.termination import write_termination_message

log = logging.getLogger("personalize")

# Library progress bars and info chatter would drown the trainer's own progress line.
diffusers.utils.logging.disable_progress_bar()
diffusers.utils.logging.set_verbosity_error()
transformers.utils.logging.disable_progress_bar()
transformers.utils.logging.set_verbosity_error()


@dataclass
class TrainedRun:
    """What `JobRunner.after_training` hooks receive: the trained models, still in memory and in
    eval mode, with what the run recorded (main process only, before the final sample grid)."""

    models: Models
    identifier_token: str
    resolution: int
    device: torch.device
    loss_rows: list[dict]
    outcomes: list[StageOutcome]


AfterTraining = Callable[[TrainedRun], None]


@dataclass
class TrainedStep:
    """What `JobRunner.after_step` hooks receive after each training step (main process): the
    models as they are at that step (in training mode; a hook that samples must restore it)."""

    step: int  # counted over the whole run: a later stage's steps follow the earlier stages'
    seconds: float  # the step's own time as the loop measured it, before any callback ran
    models: Models
    identifier_token: str
    resolution: int  # the training images' size in pixels


AfterStep = Callable[[TrainedStep], None]


def make_job_accelerator(job: PersonalizationJob) -> Accelerator:
    training = job.spec.training
    return make_accelerator(training.mixed_precision.value, training.gradient_accumulation_steps)


def early_stop_summary(outcomes: list[StageOutcome], window_steps: Optional[int] = None,
                       min_steps: Optional[int] = None) -> EarlyStop:
    """The decision of the last stage (with its window in steps and the run's minSteps, which
    `replay` reads back); steps saved summed over all stages (tiDreambooth has two)."""
    last = outcomes[-1]
    saved = sum(o.max_steps - o.stop_step for o in outcomes)
    budget = sum(o.max_steps for o in outcomes)
    return EarlyStop(
        stopped=any(o.reason == StopReason.convergence_threshold for o in outcomes),
        reason=last.reason,
        criterion=CriterionName(last.criterion),
        value=last.convergence_value,
        threshold=last.threshold,
        window=last.window_evaluations,
        window_steps=window_steps,
        min_steps=min(min_steps, last.max_steps) if min_steps is not None else None,
        step=last.stop_step,
        steps_saved=saved,
        fraction_saved=saved / budget if budget else 0.0,
    )


class JobRunner:
    def __init__(
        self,
        job: PersonalizationJob,
        output: Path,
        metrics_port: Optional[int] = None,
        metrics_linger: float = 0.0,
        shutdown: Optional[GracefulShutdown] = None,
        after_training: Optional[AfterTraining] = None,
        sample_grids: bool = True,
        after_step: Optional[AfterStep] = None,
    ):
        """`after_training` is called once the last stage is done, with the models in hand (e.g. a
        benchmark scores them without reloading the artifacts); `after_step` after every step
        (e.g. a benchmark's quality curve); `sample_grids=False` skips samples_before.png and
        samples.png."""
        self.job, self.spec, self.output = job, job.spec, output
        self.after_training = after_training
        self.after_step = after_step
        self.sample_grids = sample_grids
        self.metrics_port = metrics_port
        self.metrics_linger = metrics_linger
        self.shutdown = shutdown  # SIGTERM -> checkpoint + TrainingInterrupted (None: no signal handling)
        self.started = time.monotonic()
        self.rows: list[dict] = []  # losses.csv
        self.outcomes: list[StageOutcome] = []
        self.files: list[str] = []
        self.identifier: Optional[Identifier] = None
        self.report = TrainerReport()
        # the pod's one termination message: a pack's members report through their status instead
        self.termination_message = True
        # what grids drawn while training sample under: a pack routes them to this concept's weights
        self.sampling_scope: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext
        self.step_samples = StepSamples(job.spec, output)  # validation.everySteps
        self.trackers = Trackers([])  # reporting.trackers, started in execute() on the main process

    # ---- status plumbing -----------------------------------------------------------------------

    def _names(self) -> tuple[Optional[str], Optional[str]]:
        meta = self.job.metadata
        return os.environ.get("PJ_NAMESPACE", meta.namespace), os.environ.get("PJ_NAME", meta.name)

    def _publish(self, final: bool = False) -> None:
        self.report.wall_seconds = round(time.monotonic() - self.started, 3)
        if self.reporter is not None:
            self.reporter.report(self.report, final=final)

    def _on_step(self, stage: Stage, offset: int, printer: ProgressPrinter, models: Models, resolution: int):
        def on_step(record: StepRecord):
            if not self.accelerator.is_main_process:
                return
            step, train_loss, det_loss, conv_value = (
                record.step, record.train_loss, record.deterministic_loss, record.convergence_value)
            self.rows.append(step_row(offset + step, record))
            printer.update(step, train_loss, det_loss, conv_value)
            self.metrics.observe(step, stage.max_steps, train_loss, det_loss, conv_value, stage.threshold,
                                 record.seconds, record.evaluation_seconds, record.timestep_losses, record.stats)
            self.trackers.log_step(offset + step, record, stage.threshold)
            report = self.report
            report.progress = running_progress(step, stage.max_steps, printer.eta_seconds(step),
                                               time.monotonic() - self.started,
                                               stage.name if len(self.stages) > 1 else None)
            report.train_loss = train_loss
            report.convergence_threshold = stage.threshold
            if det_loss is not None:
                report.deterministic_loss = det_loss
            if conv_value is not None:
                report.convergence_value = shown(conv_value)
            if record.timestep_losses is not None:
                report.timestep_losses = record.timestep_losses
            if self.step_samples.due(offset + step):
                self._sample(offset + step, models, resolution)
            self._publish()
            if self.after_step is not None:
                self.after_step(TrainedStep(offset + step, record.seconds, models, self.identifier.token, resolution))

        return on_step

    def _sample(self, step: int, models: Models, resolution: int) -> None:
        """validation.everySteps: this step's grid, its cost and its path in the status."""
        @contextlib.contextmanager
        def scope():  # frozen weights may be half here; in a pack, this concept's own weights only
            with self.accelerator.autocast(), self.sampling_scope():
                yield

        seconds = self.step_samples.draw(step, models, self.identifier.token, resolution, self.accelerator.device,
                                         scope=scope)
        self.metrics.observe_samples(seconds)
        self.trackers.log_grid(step, self.output / self.step_samples.latest)
        self.report.samples = self.step_samples.latest
        self.report.sample_seconds = round(self.step_samples.seconds, 3)

    # ---- the run -------------------------------------------------------------------------------

    def execute(self) -> int:
        spec = self.spec
        namespace, name = self._names()
        self.accelerator = make_job_accelerator(self.job)
        main_process = self.accelerator.is_main_process  # only it reports, serves and writes files
        try:
            self.reporter = StatusReporter.from_env() if main_process else None
        except StatusReportError as err:  # PJ_NAME set but no cluster access: fail before training
            raise TrainerInputError(str(err)) from None
        self.metrics = TrainerMetrics(namespace, name, spec.method.value, spec.early_stopping.criterion.value)
        if self.metrics_port is not None and main_process:
            self.metrics.serve(self.metrics_port)
        linger = main_process and self.metrics_port is not None and self.metrics_linger > 0
        try:
            if main_process:
                self.trackers = Trackers.from_spec(spec, self.output, name or "local")
            return self._train_and_save()
        except TrainerInputError:
            linger = False  # nothing was trained: exit at once with the error line
            raise
        except TrainingInterrupted as stop:  # preempted: a checkpoint is saved, the run is not over
            linger = False  # the grace period is for the checkpoint, not for a last scrape
            if main_process:
                self.report.message = f"{stop}; a restarted trainer resumes from the checkpoint"
                self._write_final_report()
            raise
        except Exception as err:  # a crash mid-training: still leave result.json and the status
            if main_process:
                self.report.message = f"{type(err).__name__}: {err}"
                self.report.early_stop = EarlyStop(stopped=False, reason=StopReason.failed)
                self._write_final_report()
            raise
        finally:
            if linger:
                # A process that exits right after its last update is never scraped in that state:
                # wait so that Prometheus sees the final values (the early-stop flag above all).
                time.sleep(self.metrics_linger)
            self.metrics.close()
            self.trackers.finish()
            if self.reporter is not None:
                self.reporter.close()

    def _write_final_report(self, checkpoints: Optional[RunCheckpoints] = None,
                            upload: Optional[OutputUpload] = None, sync: Optional[CheckpointSync] = None) -> int:
        """result.json, the termination message and the final status patch, for a finished, an
        interrupted or a failed run alike; the exit code of a finished run. With `checkpoints` (a
        finished run) they are removed once result.json is safe; with `upload` (output.uri) the
        folder is then uploaded, result.json last, and the mirrored checkpoints removed from the store.
        1 when the upload failed (the next attempt only uploads); EXIT_STATUS_UNREPORTED when the
        status patch failed (result.json and the termination message are written); else 0."""
        self.report.wall_seconds = round(time.monotonic() - self.started, 3)
        self.report.progress = ended_progress(self.report.progress, time.monotonic() - self.started)  # no ETA left
        self._write_result()
        if checkpoints is not None:
            checkpoints.remove()  # a restart now would only redo finished work
        uploaded = True
        if upload is not None:
            uploaded = finish_upload(upload, self.report, self._write_result,
                                     after_success=sync.remove if sync is not None else None)
        if self.termination_message:
            write_termination_message(self.report)
        try:
            self._publish(final=True)
        except StatusReportError as err:
            log.error("final status patch failed (result.json and the termination message are written): %s", err)
            # Finished either way. Unreported: a rerun would only repeat it; the operator reads the
            # result from the termination message instead. An owed upload still needs the rerun.
            return EXIT_STATUS_UNREPORTED if uploaded else 1
        return 0 if uploaded else 1

    def _write_result(self) -> None:
        accelerator = self.accelerator
        result = RunResult(**dict(self.report), mixed_precision=accelerator.mixed_precision,
                           processes=accelerator.num_processes)
        write_json(result.to_api(), self.output / RESULT_FILE)

    def _train_and_save(self) -> int:
        models, resolution = self.load_models()
        setup = self.prepare_concept(models, resolution)
        accelerator, spec = self.accelerator, self.spec
        offset = 0
        for index, stage in enumerate(self.stages):
            if index < len(self.outcomes):  # finished before the restart; its artifacts are saved
                offset += self.outcomes[index].stop_step
                self.report.reference = self.outcomes[index].reference
                continue
            setup.checkpoints.apply_carry(models, setup.identifier)  # e.g. tiDreambooth's stage-1 embedding
            printer = self.printer(stage)
            outcome, method = train_stage(
                stage, spec, models, setup.identifier, setup.examples, setup.class_examples, accelerator,
                self._on_step(stage, offset, printer, models, resolution), stage_index=index,
                checkpoints=setup.checkpoints.for_stage(index, stage.name),
                snapshots=Snapshots.for_stage(spec, self.output, offset, accelerator.is_main_process),
            )
            offset += outcome.stop_step
            self.stage_done(stage, outcome, method, printer)
            if index + 1 < len(self.stages) and method.learns_embedding:
                setup.checkpoints.carry[f"stage{index + 1}.identifier_rows"] = method.learned_rows()

        accelerator.wait_for_everyone()
        if not accelerator.is_main_process:
            return 0
        return self.finish_concept(models, resolution, offset, setup)

    # ---- the phases of one concept's run (a pack runs them for each of its members) ------------

    def load_models(self) -> tuple[Models, int]:
        """The base pipeline's models on the accelerator's device, and the training resolution."""
        spec, device = self.spec, self.accelerator.device
        pipe = load_base_pipeline(spec.base_model, spec)
        models = models_of(pipe, spec)
        for module in models.modules():
            module.to(device)
        return models, spec.training.resolution or default_resolution(pipe)

    def prepare_concept(self, models: Models, resolution: int, routing: Optional[BatchRouting] = None,
                        taken: tuple[str, ...] = (), chosen_token: Optional[str] = None,
                        reusable: Collection[str] = ()) -> "ConceptSetup":
        """Everything before the first step: the identifier (new tokens in the shared tokenizer
        and text encoders), class images, the checkpoint to resume from, the concept's examples
        and the grid before training. `routing`: the pack's, whose other concepts' weights the
        class images and the first grid must not see, and `taken` their identifiers (an auto
        token avoids them). `chosen_token`: the token an earlier attempt chose for `token: auto`
        (a restarted pack: other members, whose tokens the choice avoided, may be gone).
        `reusable`: the pack's departed members' new tokens, which this concept may train again."""
        spec, output, accelerator = self.spec, self.output, self.accelerator
        device = accelerator.device
        base_only = routing.uniform(BASE) if routing is not None else contextlib.nullcontext()
        self.stages = plan_stages(spec)

        # The identifier first: a token the method cannot use fails before any class image is made.
        concept = spec.concept
        self.identifier = identifier = setup_identifier(
            models.tokenizer,
            models.text_encoder,
            chosen_token if concept.token == "auto" and chosen_token else concept.token,
            learns_embedding=learns_embedding(spec),
            num_identifier_tokens=concept.num_identifier_tokens,
            num_vectors=spec.textual_inversion.num_vectors,
            initializer=spec.initializer_token,
            exclude_texts=[*spec.caption_templates, *spec.validation.prompts, class_prompt(spec), concept.class_noun or "",
                           *caption_file_words(concept), *(taken if concept.token == "auto" else ())],
            method=spec.method.value,
            reusable=reusable,
        )
        # a new token gets a row in every text encoder that reads the identifier (SDXL: two)
        add_to_more_encoders(identifier, models.family.identifier_encoders(models)[1:], spec.initializer_token,
                             reusable)
        class_examples = None
        if any(stage.prior_preservation for stage in self.stages):
            with accelerator.main_process_first(), base_only:
                class_examples = prepare_class_images(spec, models, output, resolution, device)

        self.report.identifier = identifier.token
        # Resume: the checkpoint's run state (loss rows, finished stages and their
        # files) becomes ours; the lists are shared, so every checkpoint saves the current ones.
        checkpoints = RunCheckpoints(spec, output, accelerator, self.shutdown)
        self.rows, self.outcomes, self.files = checkpoints.rows, checkpoints.completed, checkpoints.files
        sync = CheckpointSync.for_job(spec)  # output.uri: checkpoints mirrored there, restored from there
        if sync is not None:
            with accelerator.main_process_first():
                if accelerator.is_main_process:
                    sync.pull(checkpoints.directory)
            checkpoints.on_saved = sync.push
        loading = time.monotonic()
        resume = checkpoints.load(identifier.token)
        if resume is not None:
            log.info("resuming from %s (stage %s, step %d; read in %.3f s)",
                     resume.path, resume.stage, resume.step, time.monotonic() - loading)
        examples = examples_of(spec, identifier.text, resolution)
        log.info(
            "method %s: %d concept images at %dpx, identifier %r, %d stage(s)",
            spec.method.value, len(examples), resolution, identifier.token, len(self.stages),
        )

        before = output / SAMPLES_BEFORE_FILE
        if self.sample_grids and accelerator.is_main_process and not before.exists():  # kept across a resume
            with base_only:
                write_samples(spec, models, identifier.token, resolution, device, before)
        return ConceptSetup(identifier, examples, class_examples, checkpoints, sync)

    def printer(self, stage: Stage) -> ProgressPrinter:
        reporting = self.spec.reporting
        return ProgressPrinter(stage.max_steps, stage.threshold, self.spec.early_stopping.criterion.value,
                               every_steps=reporting.log_every_steps, every_seconds=reporting.log_every_seconds)

    def stage_done(self, stage: Stage, outcome: StageOutcome, method, printer: ProgressPrinter) -> None:
        """A stage ended: its closing line, its outcome and its artifacts."""
        if self.accelerator.is_main_process:
            samples = self.step_samples.seconds
            printer.close(f"{stage.name}: stopped at step {outcome.stop_step}/{stage.max_steps} ({outcome.reason.value}); "
                          + tracking_cost(outcome.tracking_seconds, outcome.seconds)
                          + (f"; samples while training took {samples:.1f} s" if samples else ""))
        self.outcomes.append(outcome)
        self.report.reference = outcome.reference
        if self.accelerator.is_main_process:
            self.files += [f for f in save_artifacts(method, self.output, outcome) if f not in self.files]

    def finish_concept(self, models: Models, resolution: int, offset: int, setup: "ConceptSetup",
                       routing: Optional[BatchRouting] = None, route: str = "default") -> int:
        """After the last stage (main process): losses.csv, the plot, the grid after training,
        result.json, the status and the upload. `routing`/`route`: the pack's, so that the grid
        shows this concept's own weights."""
        spec, output, device = self.spec, self.output, self.accelerator.device
        identifier = setup.identifier
        mine = routing.uniform(route) if routing is not None else contextlib.nullcontext()
        early_stop = early_stop_summary(self.outcomes, self.stages[-1].window_steps, spec.training.min_steps)
        self.metrics.set_early_stopped(early_stop.stopped)
        write_losses_csv(self.rows, output / LOSSES_FILE)
        plot_convergence(
            self.rows, early_stop.threshold, early_stop.step if len(self.stages) == 1 else offset, output / PLOT_FILE,
            title=f"{spec.method.value} / {early_stop.criterion.value}",
        )
        training = [m.training for m in models.modules()]
        for module in models.modules():
            module.eval()
        with mine:
            if self.after_training is not None:
                self.after_training(TrainedRun(models, identifier.token, resolution, device, self.rows, self.outcomes))
            if self.sample_grids:
                write_samples(spec, models, identifier.token, resolution, device, output / SAMPLES_FILE)
                if self.step_samples.at_stop(offset, output / SAMPLES_FILE):  # validation.everySteps: the stop's grid
                    self.report.samples = self.step_samples.latest
                self.trackers.log_grid(offset, output / SAMPLES_FILE)
        if routing is not None:  # the pack goes on training
            for module, was in zip(models.modules(), training):
                module.train(was)

        report = self.report
        report.early_stop = early_stop
        self.trackers.log_decision(early_stop)
        report.artifact = Artifact(location=str(output), files=self.files, snapshots=snapshot_files(output))
        report.stages = [o.to_report() for o in self.outcomes]
        return self._write_final_report(setup.checkpoints, OutputUpload.for_job(spec, output), setup.sync)


@dataclass
class ConceptSetup:
    """What `JobRunner.prepare_concept` made ready for training one concept."""

    identifier: Identifier
    examples: ConceptExamples
    class_examples: Optional[ConceptExamples]
    checkpoints: RunCheckpoints
    sync: Optional[CheckpointSync]
