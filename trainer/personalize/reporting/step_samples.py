"""validation.everySteps: the validation grid while training, under samples/step-NNNNN.png.

A grid is drawn every N steps (N = everySteps, counted over the whole run) with the models as
they are at that step, and once at the stop, where the final grid (samples.png, drawn from the
full-precision weights) is copied rather than drawn again. The latest grid's path goes into the
status (`samples`), and the time spent drawing is reported like tracking's: in the stage's
closing line, the status (`sampleSeconds`) and personalization_sample_duration_seconds.
"""

from __future__ import annotations

import contextlib
import shutil
import time
from pathlib import Path
from typing import Callable, ContextManager, Optional

from personalize.samples import write_samples
from personalize.spec import PersonalizationJobSpec

SAMPLES_DIR = "samples"


def step_file(step: int) -> str:
    """samples/step-00042.png, relative to the output folder."""
    return f"{SAMPLES_DIR}/step-{step:05d}.png"


class StepSamples:
    def __init__(self, spec: PersonalizationJobSpec, output: Path):
        self.spec, self.output = spec, output
        self.every = spec.validation.every_steps
        self.seconds = 0.0  # spent drawing grids while training
        self.latest: Optional[str] = None

    def due(self, step: int) -> bool:
        return self.every > 0 and bool(self.spec.validation.prompts) and step % self.every == 0

    def draw(self, step: int, models, token: str, resolution: int, device,
             scope: Callable[[], ContextManager] = contextlib.nullcontext) -> float:
        """The grid of `step` with the models as they are (in training mode: switched to eval and
        back); `scope`: e.g. the accelerator's autocast, for half-precision frozen weights.
        Returns the seconds it took."""
        started = time.monotonic()
        modules = models.modules()
        modes = [m.training for m in modules]
        for m in modules:
            m.eval()
        try:
            with scope():
                write_samples(self.spec, models, token, resolution, device, self.output / step_file(step))
        finally:
            for m, was in zip(modules, modes):
                m.train(was)
        seconds = time.monotonic() - started
        self.seconds += seconds
        self.latest = step_file(step)
        return seconds

    def at_stop(self, step: int, final_grid: Path) -> Optional[str]:
        """The stop's grid: a copy of the final one (the same weights, prompts and noise)."""
        if self.every <= 0 or not final_grid.exists():
            return None
        target = self.output / step_file(step)
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(final_grid, target)
        self.latest = step_file(step)
        return self.latest
