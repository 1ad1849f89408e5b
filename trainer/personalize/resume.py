"""Checkpoint and resume plumbing between the job runner, the loop and `personalize.checkpoint`.

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

import dataclasses
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional

import torch
from accelerate import Accelerator
from accelerate.utils import broadcast_object_list, gather_object

from personalize.checkpoint import (
    CheckpointError,
    TrainingCheckpoint,
    capture_rng,
    fingerprinted_spec,
    load_latest_checkpoint,
    load_trainable_state,
    restore_rng,
    save_checkpoint,
    spec_fingerprint,
    trainable_state,
)
from personalize.criteria import StopPolicy
from personalize.reference_batch import ReferenceBatch
from personalize.shutdown import GracefulShutdown, TrainingInterrupted
from personalize.spec import PersonalizationJobSpec, ReferenceInfo, StopReason

CHECKPOINT_DIR = "checkpoints"


def outcome_to_json(outcome: Any) -> dict[str, Any]:
    """A loop.StageOutcome as JSON (for the `completed_stages` of a checkpoint)."""
    data = dataclasses.asdict(outcome)
    data["reason"] = outcome.reason.value
    data["reference"] = outcome.reference.model_dump(mode="json") if outcome.reference is not None else None
    return data


def outcome_from_json(data: dict[str, Any]) -> Any:
    from personalize.loop import StageOutcome  # loop imports this module

    fields = dict(data)
    fields["reason"] = StopReason(fields["reason"])
    if fields.get("reference") is not None:
        fields["reference"] = ReferenceInfo.model_validate(fields["reference"])
    return StageOutcome(**fields)


@dataclass
class TrainState:
    """What one stage trains and draws from, as the loop built it (unwrapped models)."""

    modules: dict[str, torch.nn.Module]  # {"unet": ..., "text_encoder": ...}
    optimizer: torch.optim.Optimizer
    generators: dict[str, torch.Generator]  # {"data": ..., "reference": ...}
    policy: StopPolicy
    reference: Optional[ReferenceBatch]
    # An embedding table of which only some rows train (Textual Inversion, Custom Diffusion: the
    # identifier's rows; the others are reset after every step). Only those rows and their
    # optimizer moments are saved: a few KB instead of three copies of the whole table.
    trained_rows: Optional[tuple[torch.nn.Parameter, list[int]]] = None


class _TrainedRows:
    """Slices the partly trained table (and its AdamW moments) to its trained rows, and back."""

    def __init__(self, state: TrainState):
        self.param, self.rows = state.trained_rows
        self.name = next(k for k, t in trainable_state(state.modules).items() if t.data_ptr() == self.param.data_ptr())
        params = [p for group in state.optimizer.param_groups for p in group["params"]]
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
        self.completed: list[Any] = []  # StageOutcomes of the finished stages
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
        self.completed[:] = [outcome_from_json(o) for o in ckpt.extra.get("completed_stages", [])]
        self.files[:] = ckpt.extra.get("files", [])
        self.carry = {k: v for k, v in ckpt.trainable.items() if k.startswith("stage")}
        return ckpt

    def for_stage(self, index: int, name: str) -> "StageCheckpoints":
        ckpt = self.resume
        if ckpt is not None and ckpt.extra.get("stage_index") != index:
            ckpt = None  # the checkpoint belongs to a later stage (this one is completed) or none
        return StageCheckpoints(self, index, name, ckpt)

    def apply_carry(self, models: Any, identifier: Any) -> None:
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
        trainable, optimizer = ckpt.trainable, ckpt.optimizer
        if state.trained_rows is not None:
            trainable, optimizer = _TrainedRows(state).expand(trainable, optimizer)
        load_trainable_state(state.modules, trainable)
        state.optimizer.load_state_dict(optimizer)
        if state.reference is not None:
            if ckpt.reference_indices != state.reference.indices:
                raise CheckpointError(f"checkpoint {ckpt.path}: the reference batch differs from the checkpoint's (other images?)")
            state.reference.evaluations = int(ckpt.extra["reference_evaluations"])
            state.policy.load_state_dict(ckpt.criteria["policy"])
        self.last.update(ckpt.extra.get("last", {}))
        restore_rng(ckpt, state.generators, rank=self.run.accelerator.process_index)  # LAST
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
            trainable, optimizer = trainable_state(state.modules), state.optimizer.state_dict()
            if state.trained_rows is not None:
                trainable, optimizer = _TrainedRows(state).slim(trainable, optimizer)
            path = save_checkpoint(run.directory, TrainingCheckpoint(
                step=step,
                stage=self.name,
                spec_fingerprint=run.fingerprint,
                spec=run.spec_json,
                trainable=trainable | run.carry,
                optimizer=optimizer,
                rng=rng,
                criteria={"policy": state.policy.state_dict()},
                reference_seed=run.spec.training.seed,
                reference_indices=list(reference.indices) if reference is not None else [],
                loss_rows=run.rows,
                identifier_tokens=[run.token] if run.token else [],
                extra={
                    "stage_index": self.index,
                    "reference_evaluations": reference.evaluations if reference is not None else 0,
                    "completed_stages": [outcome_to_json(o) for o in run.completed],
                    "files": run.files,
                    "last": self.last,
                },
            ))
            if run.on_saved is not None:
                run.on_saved(path)
        accelerator.wait_for_everyone()
        return path
