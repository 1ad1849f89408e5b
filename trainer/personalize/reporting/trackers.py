"""reporting.trackers: the user's experiment trackers, through accelerate's tracker classes.

Each step logs the losses, L_det per timestep, the training statistics and the convergence value
and threshold; the end logs the stop decision; each validation grid is logged as an image
(MLflow: as an artifact). Keys, the same in every tracker:

    loss/train  loss/deterministic  loss/deterministic_per_timestep/t_0999 ...  convergence/value
    convergence/threshold  stats/lr  stats/grad_norm ...  stop/step  stop/early  stop/reason

Files go under <output>/trackers/ (TensorBoard's event files, W&B's run folder, MLflow's file
store unless MLFLOW_TRACKING_URI names another; a file store named there needs
MLFLOW_ALLOW_FILE_STORE=true, as MLflow 3 says). W&B reads its usual environment (WANDB_MODE=
offline, WANDB_API_KEY). Nothing is imported unless a tracker is asked for, and a tracker whose
package is missing fails before training with the extra to install.
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any, Optional

import numpy as np
from PIL import Image

from personalize.errors import TrainerInputError
from personalize.spec import EarlyStop, PersonalizationJobSpec, Tracker

TRACKERS_DIR = "trackers"
INSTALL = {tracker: f"the extra personalization-job[{tracker.value}]" for tracker in Tracker}
DEFAULT_PROJECT = "personalization"


def _available(tracker: Tracker) -> bool:
    from accelerate.utils import is_mlflow_available, is_tensorboard_available, is_wandb_available  # noqa: PLC0415

    return {Tracker.tensorboard: is_tensorboard_available, Tracker.wandb: is_wandb_available,
            Tracker.mlflow: is_mlflow_available}[tracker]()


def _make(tracker: Tracker, folder: Path, project: str, run_name: str):
    from accelerate import tracking  # noqa: PLC0415

    if tracker == Tracker.tensorboard:
        return tracking.TensorBoardTracker(run_name, folder / "tensorboard")
    if tracker == Tracker.wandb:
        return tracking.WandBTracker(project, name=run_name, dir=str(folder))
    import mlflow  # noqa: PLC0415

    # Set on every start: mlflow keeps the URI process-wide, and it outranks the environment.
    uri = os.environ.get("MLFLOW_TRACKING_URI")
    if not uri:
        uri = (folder / "mlruns").resolve().as_uri()
        # MLflow 3 refuses a file store unless allowed; ours is the only store a run without a
        # tracking server can have (a database store needs SQLAlchemy, not in mlflow-skinny).
        os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
    mlflow.set_tracking_uri(uri)
    return tracking.MLflowTracker(experiment_name=project, run_name=run_name)


def flat_config(values: Any, prefix: str = "") -> dict[str, Any]:
    """A nested spec as the flat scalar key/values trackers store as hyperparameters."""
    if isinstance(values, dict):
        out: dict[str, Any] = {}
        for key, value in values.items():
            out.update(flat_config(value, f"{prefix}{key}/" if isinstance(value, dict) else f"{prefix}{key}"))
        return out
    if isinstance(values, (list, tuple)):
        return {prefix.rstrip("/"): ", ".join(map(str, values))}
    return {prefix.rstrip("/"): values}


def step_values(record: Any, threshold: Optional[float]) -> dict[str, float]:
    """What one StepRecord logs; a value not measured at this step is left out."""
    values = {"loss/train": record.train_loss, "loss/deterministic": record.deterministic_loss,
              "convergence/value": record.convergence_value, "convergence/threshold": threshold}
    # "t=0999" becomes "t_0999": MLflow refuses "=" in a metric name; and not under
    # "loss/deterministic/": MLflow's file store keeps "loss/deterministic" as a file, not a folder.
    values.update({f"loss/deterministic_per_timestep/{label.replace('=', '_')}": v
                   for label, v in (record.timestep_losses or {}).items()})
    values.update({f"stats/{name}": v for name, v in (record.stats or {}).items()})
    return {k: float(v) for k, v in values.items() if v is not None and math.isfinite(v)}


class Trackers:
    def __init__(self, trackers: list):
        self.trackers = trackers

    @classmethod
    def from_spec(cls, spec: PersonalizationJobSpec, output: Path, run_name: str) -> "Trackers":
        """The spec's trackers, started, with the spec stored as their configuration."""
        wanted = spec.reporting.trackers
        missing = [t for t in wanted if not _available(t)]
        if missing:
            raise TrainerInputError(
                f"reporting.trackers: {', '.join(t.value for t in missing)} not installed in the trainer's image; "
                f"install {' and '.join(INSTALL[t] for t in missing)}")
        folder = output / TRACKERS_DIR
        if wanted:  # no folder for a run that logs to no tracker
            folder.mkdir(parents=True, exist_ok=True)
        project = spec.reporting.project or DEFAULT_PROJECT
        trackers = [_make(t, folder, project, run_name) for t in wanted]
        for tracker in trackers:
            tracker.start()
            tracker.store_init_configuration(flat_config(spec.to_api()))
        return cls(trackers)

    def log_step(self, step: int, record: Any, threshold: Optional[float]) -> None:
        values = step_values(record, threshold)
        for tracker in self.trackers:
            tracker.log(values, step=step)

    def log_decision(self, early_stop: EarlyStop) -> None:
        values: dict[str, Any] = {"stop/step": early_stop.step, "stop/early": 1 if early_stop.stopped else 0,
                                  "stop/steps_saved": early_stop.steps_saved}
        values = {k: v for k, v in values.items() if v is not None}
        for tracker in self.trackers:
            tracker.log(values, step=early_stop.step)
            if tracker.name != "mlflow" and early_stop.reason is not None:  # MLflow logs numbers only
                tracker.log({"stop/reason": early_stop.reason.value}, step=early_stop.step)

    def log_grid(self, step: int, path: Path) -> None:
        """A validation grid: an image in TensorBoard and W&B, an artifact in MLflow."""
        if not self.trackers:
            return
        with Image.open(path) as image:
            pixels = np.asarray(image.convert("RGB"))
        for tracker in self.trackers:
            if tracker.name == "tensorboard":
                tracker.log_images({"samples": pixels[None]}, step=step, dataformats="NHWC")
            elif tracker.name == "wandb":
                tracker.log_images({"samples": [pixels]}, step=step)
            else:
                tracker.log_artifact(str(path), artifact_path="samples")

    def finish(self) -> None:
        for tracker in self.trackers:
            tracker.finish()
        self.trackers = []
