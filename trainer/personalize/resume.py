"""Checkpoint and resume orchestration between the job runner, the loop and `personalize.checkpoint`.

Each object saves and loads its own state (`ReferenceBatch`, `StopPolicy` with its criterion,
`StageOutcome`, the optimizer); this module only decides when a checkpoint is written, what goes
into it and in which order it is restored.

`RunCheckpoints` (one per run, built by the JobRunner) finds the checkpoint to resume from and
holds what the whole run shares: the loss rows, the finished stages, the identifier.
`StageCheckpoints` (one per stage, handed to `train_stage`) restores a stage's state before its
first step and, after every step, saves a checkpoint when one is due (every
`training.checkpointEvery` steps, and on SIGTERM/SIGINT, after which it raises
`TrainingInterrupted`). The loop only calls `restore(...)` and `after_step(...)`.

Restore order matters: trained tensors, optimizer, reference batch and stop policy, step, and
the random streams LAST (nothing may draw a random number after them).
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import torch
from accelerate import Accelerator
from accelerate.utils import broadcast_object_list, gather_object

from personalize.checkpoint import TrainingCheckpoint, load_latest_checkpoint, save_checkpoint
from personalize.criteria import StopPolicy
from personalize.eval_schedule import Schedule
from personalize.errors import CheckpointError
from personalize.fingerprint import fingerprinted_spec, spec_fingerprint
from personalize.identifier import Identifier
from personalize.pipeline_io import Models
from personalize.reference_batch import ReferenceBatch
from personalize.rng_state import capture_rng, restore_rng
from personalize.shutdown import GracefulShutdown, TrainingInterrupted
from personalize.spec import PersonalizationJobSpec, StopReason
from personalize.stage_outcome import StageOutcome
from personalize.trainable import load_named
from personalize.training_stats import UpdateStatistics

CHECKPOINT_DIR = "checkpoints"
STATISTICS = "statistics."  # checkpoint tensors of the training statistics (the last update)


@dataclass
class TrainState:
    """What one slot of a stage trains and draws from, as the loop built it."""

    # the trained tensors by names independent of wrappers, routes and other slots
    # (`Method.named_parameters`): token rows, adapters, Custom Diffusion weights, the UNet ...
    trainable: dict[str, torch.nn.Parameter]
    optimizer: torch.optim.Optimizer
    generators: dict[str, torch.Generator]  # {"data": ..., "reference": ...}
    policy: StopPolicy
    reference: Optional[ReferenceBatch]
    lr_schedule: Optional[torch.optim.lr_scheduler.LRScheduler] = None  # where the learning rate is in its schedule
    # When L_det is evaluated next (eval_schedule.py); its state rides with the criterion's.
    schedule: Optional[Schedule] = None
    # The per-step training statistics (training_stats.py): their last update and window
    statistics: Optional[UpdateStatistics] = None


class RunCheckpoints:
    """The run's checkpoint folder, the checkpoint it resumes from, and the shared run state."""

    def __init__(self, spec: PersonalizationJobSpec, output: Path, accelerator: Accelerator,
                 shutdown: Optional[GracefulShutdown] = None):
        self.spec, self.accelerator, self.shutdown = spec, accelerator, shutdown
        self.directory = output / CHECKPOINT_DIR
        self.every = spec.training.checkpoint_every
        self.fingerprint, self.spec_json = spec_fingerprint(spec), fingerprinted_spec(spec)
        self.resume: Optional[TrainingCheckpoint] = None
        # Shared with the JobRunner (same list objects): saved in every checkpoint.
        self.rows: list[dict] = []
        self.completed: list[StageOutcome] = []  # the finished stages
        self.files: list[str] = []  # artifact files written by finished stages
        self.carry: dict[str, torch.Tensor] = {}  # what a later stage needs from an earlier one
        self.token: Optional[str] = None
        # Called with each new checkpoint's folder on the main process (e.g. to copy it to a store).
        self.on_saved: Optional[Callable[[Path], None]] = None

    def load(self, identifier_token: str) -> Optional[TrainingCheckpoint]:
        """Read the newest checkpoint (None: fresh start) and take over its run state."""
        self.token = identifier_token
        ckpt = load_latest_checkpoint(self.directory, self.fingerprint, self.spec_json)
        if ckpt is None:
            return None
        if ckpt.identifier_tokens != [identifier_token]:
            raise CheckpointError(
                f"checkpoint {ckpt.path} trains identifier {ckpt.identifier_tokens}, this run chose {identifier_token!r}"
            )
        self.resume = ckpt
        self.rows[:] = ckpt.loss_rows
        self.completed[:] = [StageOutcome.from_json(o) for o in ckpt.extra.get("completed_stages", [])]
        self.files[:] = ckpt.extra.get("files", [])
        self.carry = {k: v for k, v in ckpt.trainable.items() if k.startswith("stage")}
        return ckpt

    def for_stage(self, index: int, name: str) -> "StageCheckpoints":
        ckpt = self.resume
        if ckpt is not None and ckpt.extra.get("stage_index") != index:
            ckpt = None  # the checkpoint belongs to a later stage (this one is completed) or none
        return StageCheckpoints(self, index, name, ckpt)

    def apply_carry(self, models: Models, identifier: Identifier) -> None:
        """Put what earlier stages trained back into the models (a resumed run skipped those stages)."""
        rows = self.carry.get(f"stage{len(self.completed)}.identifier_rows")
        if rows is None:
            return
        table = models.text_encoder.get_input_embeddings().weight
        with torch.no_grad():
            table[identifier.token_ids] = rows.to(table.device, table.dtype)

    def remove(self) -> None:
        """After result.json: the checkpoints are no longer needed (a DreamBooth one is 3x the model)."""
        shutil.rmtree(self.directory, ignore_errors=True)


class StageCheckpoints:
    def __init__(self, run: RunCheckpoints, index: int, name: str, resume: Optional[TrainingCheckpoint]):
        self.run, self.index, self.name, self.resume = run, index, name, resume
        self.restored_step: Optional[int] = None
        self.last: dict[str, Optional[float]] = {"train_loss": None, "deterministic_loss": None, "convergence_value": None}

    def restore(self, state: TrainState) -> int:
        """Put the stage back where the checkpoint left it; returns the step to continue after (0: fresh)."""
        ckpt = self.resume
        if ckpt is None:
            return 0
        load_named(state.trainable, {k: t for k, t in ckpt.trainable.items() if not k.startswith(("stage", STATISTICS))})
        state.optimizer.load_state_dict(ckpt.optimizer)
        if state.statistics is not None:
            state.statistics.load_state_dict({
                "snr": ckpt.extra.get("statistics_snr", []),
                "previous": {k.removeprefix(STATISTICS): t for k, t in ckpt.trainable.items() if k.startswith(STATISTICS)},
            })
        if state.lr_schedule is not None and "lr_schedule" in ckpt.extra:
            state.lr_schedule.load_state_dict(ckpt.extra["lr_schedule"])
        if state.reference is not None:  # the main process
            try:
                state.reference.load_state_dict(ckpt.reference)
            except ValueError as err:
                raise CheckpointError(f"checkpoint {ckpt.path}: {err}") from None
            state.policy.load_state_dict(ckpt.criteria["policy"])
            if state.schedule is not None and "schedule" in ckpt.criteria:
                state.schedule.load_state_dict(ckpt.criteria["schedule"])
        self.last.update(ckpt.extra.get("last", {}))
        restore_rng(ckpt.rng, state.generators, rank=self.run.accelerator.process_index)  # LAST
        self.restored_step = ckpt.step
        return ckpt.step

    def after_step(self, step: int, reason: Optional[StopReason], state: TrainState,
                   last: dict[str, Optional[float]]) -> None:
        """Save a checkpoint when one is due; on a shutdown request save and raise TrainingInterrupted."""
        run, accelerator = self.run, self.run.accelerator
        self.last = dict(last)
        stop_now = run.shutdown is not None and run.shutdown.requested
        if accelerator.num_processes > 1:
            stop_now = broadcast_object_list([stop_now])[0]  # every process decides together
        periodic = bool(run.every) and step > 0 and step % run.every == 0
        if reason is not None or not (stop_now or periodic):
            return  # a finishing run needs no checkpoint
        nothing_new = step == self.restored_step or (step == 0 and self.index == 0)
        path = None if nothing_new else self._save(step, state)
        if stop_now:
            where = path or (self.resume.path if self.resume is not None and nothing_new else None)
            raise TrainingInterrupted(step, str(where) if where else None, run.shutdown.signal_name)

    def _save(self, step: int, state: TrainState) -> Optional[Path]:
        run, accelerator = self.run, self.run.accelerator
        rng = [capture_rng(state.generators)]
        if accelerator.num_processes > 1:
            rng = gather_object(rng)
        path = None
        if accelerator.is_main_process:
            reference = state.reference
            trainable = {name: p.detach() for name, p in state.trainable.items()}
            optimizer = state.optimizer.state_dict()
            statistics = state.statistics.state_dict() if state.statistics is not None else {"snr": [], "previous": {}}
            trainable |= {STATISTICS + k: t for k, t in statistics["previous"].items()}
            path = save_checkpoint(run.directory, TrainingCheckpoint(
                step=step,
                stage=self.name,
                spec_fingerprint=run.fingerprint,
                spec=run.spec_json,
                trainable=trainable | run.carry,
                optimizer=optimizer,
                rng=rng,
                criteria={"policy": state.policy.state_dict()}
                | ({"schedule": state.schedule.state_dict()} if state.schedule is not None else {}),
                reference=reference.state_dict() if reference is not None else {},
                loss_rows=run.rows,
                identifier_tokens=[run.token] if run.token else [],
                extra={
                    "stage_index": self.index,
                    "completed_stages": [o.to_json() for o in run.completed],
                    "files": run.files,
                    "last": self.last,
                    "statistics_snr": statistics["snr"],
                } | ({"lr_schedule": state.lr_schedule.state_dict()} if state.lr_schedule is not None else {}),
            ))
            if run.on_saved is not None:
                run.on_saved(path)
        accelerator.wait_for_everyone()
        return path
