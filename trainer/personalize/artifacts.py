"""The artifact files of a run: what a method saves, under the names the job chose
(`output.name`), in the formats it asked for (`output.formats`), at the end of a stage and every
`output.snapshotEvery` steps.

    method.save(scratch)  ->  usual names (pytorch_lora_weights.safetensors, learned_embeds.safetensors,
                              pipeline/, ...) in a scratch folder of the output (`.saving/`)
    each file             ->  moved into the output under its name: artifact_name(usual, output.name),
                              with "-stepNNNNN" for a snapshot
    the LoRA file         ->  also (formats: kohya) the kohya file beside it (kohya_format.py);
                              without formats: diffusers the diffusers file is not kept

Names (docs/trainer.md, "Artifact names"): without `output.name` the usual ones; with
`name: mydog` the LoRA is `mydog.safetensors` and every other artifact `mydog_<usual name>`
(`mydog_learned_embeds.safetensors`, `mydog_pipeline/`); the kohya file is the LoRA's stem plus
`_kohya`. A snapshot puts `-step00100` before the suffix (`mydog-step00100.safetensors`,
`pipeline-step00100/`). Snapshots are loadable artifacts, not checkpoints: they stay, and are
uploaded with the rest.
"""

from __future__ import annotations

import os
import re
import shutil
from pathlib import Path
from typing import Optional

from personalize.kohya_format import write_kohya_lora
from personalize.methods import Method
from personalize.methods.lora import LORA_WEIGHTS
from personalize.preflight import concept_folder, list_image_files
from personalize.spec import ArtifactFormat, EarlyStop, PersonalizationJobSpec, StopReason
from personalize.stage_outcome import StageOutcome

SCRATCH = ".saving"  # where a method saves before its files get their names (never uploaded)
_SNAPSHOT = re.compile(r"-step\d{5,}(\.[A-Za-z0-9]+)?$")


def artifact_name(usual: str, name: Optional[str]) -> str:
    """The file name of an artifact the method calls `usual`, for `output.name` `name`."""
    if name is None:
        return usual
    if usual == LORA_WEIGHTS:
        return f"{name}.safetensors"
    return f"{name}_{usual}"


def kohya_file(lora_file: str) -> str:
    """The kohya file beside a LoRA file: `mydog.safetensors` -> `mydog_kohya.safetensors`."""
    path = Path(lora_file)
    return f"{path.stem}_kohya{path.suffix}"


def at_step(file: str, step: int) -> str:
    """A snapshot's name: `-stepNNNNN` before the suffix (a folder: at the end)."""
    path = Path(file)
    return f"{path.stem}-step{step:05d}{path.suffix}"


def snapshot_files(output: Path) -> list[str]:
    """The snapshots in an output folder (found on disk: a resumed run lists those made before)."""
    return sorted(p.name for p in output.iterdir() if _SNAPSHOT.search(p.name)) if output.is_dir() else []


def _move(source: Path, target: Path) -> None:
    """Replace `target` (a file or a folder) by `source`."""
    if target.is_dir():
        shutil.rmtree(target)
    os.replace(source, target)


def save_artifacts(method: Method, output: Path, outcome: Optional[StageOutcome] = None,
                   step: Optional[int] = None) -> list[str]:
    """Save what `method` trained into `output`, named and in the formats the spec asks for; the
    names written, relative to `output`. `step`: a snapshot at that step (else the stage's
    final artifacts); `outcome`: how the stage ended (for the kohya file's metadata)."""
    spec = method.spec
    options = spec.output
    scratch = output / SCRATCH
    shutil.rmtree(scratch, ignore_errors=True)  # what an interrupted save left
    scratch.mkdir(parents=True)
    def named(file: str) -> str:
        return at_step(file, step) if step is not None else file

    try:
        written, kohya_written = [], []
        for usual in method.save(scratch):
            name = artifact_name(usual, options.name)
            if usual == LORA_WEIGHTS and ArtifactFormat.kohya in options.formats:
                kohya = named(kohya_file(name))
                write_kohya(method, scratch / usual, output / kohya, outcome, step)
                kohya_written.append(kohya)
            if usual == LORA_WEIGHTS and ArtifactFormat.diffusers not in options.formats:
                continue  # only the kohya file was asked for
            _move(scratch / usual, output / named(name))
            written.append(named(name))
        return written + kohya_written
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def write_kohya(method: Method, lora_file: Path, target: Path, outcome: Optional[StageOutcome],
                step: Optional[int]) -> None:
    """The kohya file of `lora_file` with the run's metadata: steps trained and, at the end of a
    stage, its stop decision."""
    spec, models = method.spec, method.models
    early_stop = None
    if outcome is not None:
        early_stop = EarlyStop(
            stopped=outcome.reason == StopReason.convergence_threshold, reason=outcome.reason,
            criterion=outcome.criterion, value=outcome.convergence_value, threshold=outcome.threshold,
            window=outcome.window_evaluations, step=outcome.stop_step,
            steps_saved=outcome.max_steps - outcome.stop_step,
            fraction_saved=(outcome.max_steps - outcome.stop_step) / outcome.max_steps,
        )
    write_kohya_lora(
        lora_file, target, family=models.family.name, unet_config=models.denoiser.config, spec=spec,
        metadata_fields={
            "prediction_type": models.noise_scheduler.config.prediction_type,
            "resolution": spec.training.resolution or trained_resolution(models),
            "steps": step if step is not None else outcome.stop_step if outcome is not None else 0,
            "num_images": len(list_image_files(concept_folder(spec.concept))),
            "trigger": method.identifier.token,
            "title": spec.output.name or Path(LORA_WEIGHTS).stem,
            "early_stop": early_stop,
        },
    )


def trained_resolution(models) -> int:
    """The model's own image size in pixels (the training resolution when the spec sets none)."""
    scale = 2 ** (len(models.vae.config.block_out_channels) - 1)
    return int(models.denoiser.config.sample_size) * scale


class Snapshots:
    """Loadable artifacts every `output.snapshotEvery` steps of the run (`offset`: the steps of
    the stages before this one, so names count the run's steps, as losses.csv does)."""

    def __init__(self, spec: PersonalizationJobSpec, output: Path, offset: int = 0):
        self.every, self.output, self.offset = spec.output.snapshot_every, output, offset

    @classmethod
    def for_stage(cls, spec: PersonalizationJobSpec, output: Path, offset: int, main_process: bool) -> Optional["Snapshots"]:
        return cls(spec, output, offset) if spec.output.snapshot_every and main_process else None

    def after_step(self, step: int, stopping: bool, method: Method) -> None:
        """Save when the run's step is a multiple of snapshotEvery; not at the step a stage stops
        (its final artifacts are those weights)."""
        run_step = self.offset + step
        if not stopping and run_step % self.every == 0:
            save_artifacts(method, self.output, step=run_step)
