"""The personalization benchmark's run files read back, for studies that replay stops without
training (stop_sweep.py, guard_study.py, reference_study.py, tracking_cost.py --recorded-only).

A run file holds L_det at every step the run trained when it was tracked with evalEvery 1: a
baseline that observed DVAR has its whole budget, a DVAR run stops at its own stop.
"""

from __future__ import annotations

import argparse
import gzip
import json
import shlex
import sys
from pathlib import Path
from typing import Iterable, Optional

from personalize.criteria import StopPolicy, build_criterion
from personalize.eval_schedule import AdaptiveSchedule, ScheduleKnobs
from personalize.replay import replay_one
from personalize.spec import Method
from personalize.world.shapes import CONCEPT_SETS

RESULTS = Path(__file__).resolve().parent / "results"
STUDIED_METHODS = "textualInversion,lora,customDiffusion,dreambooth"


def study_parser(doc: str) -> argparse.ArgumentParser:
    """The command line the replay studies share: which concept set, which run files, which methods."""
    parser = argparse.ArgumentParser(description=doc.split("\n\n")[0])
    parser.add_argument("--set", choices=sorted(CONCEPT_SETS), default="dev")
    parser.add_argument("--runs", type=Path, default=RESULTS / "personalization_runs",
                        help="the personalization benchmark's run files (baselines with L_det and CLIP-I curves)")
    parser.add_argument("--methods", default=STUDIED_METHODS, help="comma-separated")
    return parser


def command_line(script: str, argv: Optional[list[str]]) -> str:
    """How a study was invoked, for its report: `python benchmarks/<script> <its arguments>`."""
    return shlex.join(["python", f"benchmarks/{script}", *(sys.argv[1:] if argv is None else argv)])


def run_paths(runs_dir: Path) -> list[Path]:
    """The run files in runs_dir, sorted by name: <name>.json as the benchmark writes them, or
    <name>.json.gz as recorded runs are kept in the repository (`gzip -9`: a tenth of the bytes).
    Where both exist (a rerun wrote the plain file), the plain one is the newer."""
    stems = {p.name.removesuffix(".gz").removesuffix(".json") for p in runs_dir.glob("*.json*")}
    return [path for stem in sorted(stems) if (path := find_run(runs_dir, stem)) is not None]


def find_run(runs_dir: Path, stem: str) -> Optional[Path]:
    """runs_dir/<stem>.json or, if only that exists, its gzipped copy; None if neither."""
    for path in (runs_dir / f"{stem}.json", runs_dir / f"{stem}.json.gz"):
        if path.is_file():
            return path
    return None


def read_run(path: Path) -> dict:
    """A run file's record, whether plain or gzipped."""
    data = path.read_bytes()
    return json.loads(gzip.decompress(data) if path.name.endswith(".gz") else data)


def every_step_runs(runs_dir: Path, *, method: Optional[str] = None, concepts: Optional[Iterable[str]] = None,
                    variants: tuple[str, ...] = ("baseline", "dvar")) -> list[dict]:
    """Run records (sorted by file name) whose L_det was evaluated at every step they trained."""
    wanted = None if concepts is None else set(concepts)
    found = []
    for path in run_paths(runs_dir):
        record = read_run(path)
        if record.get("kind") != "run" or record.get("variant") not in variants:
            continue
        if (method is not None and record.get("method") != method) or (wanted is not None and record["concept"] not in wanted):
            continue
        if record.get("series", {}).get("eval_steps") != list(range(1, record["steps"] + 1)):
            continue  # evaluated on a schedule, or not at all
        found.append(record)
    return found


def every_step_stop(losses: list[float], window: int, threshold: float, method: str,
                    min_steps: int = 0, eval_every: int = 1) -> Optional[int]:
    """Where DVAR(window, threshold) stops on an every-step L_det series (1-based steps, no stop
    before min_steps): replay's answer, which is the training loop's own decision on the same values.
    With eval_every k, only the steps divisible by k are kept: what the fixed schedule at evalEvery k
    would have measured and decided on the same training."""
    points = [(step, value) for step, value in enumerate(losses, start=1) if step % eval_every == 0]
    return replay_one("dvar", points, window_steps=window, threshold=threshold, eval_every=eval_every,
                      min_steps=min_steps, method=Method(method), last_step=len(losses))["stop_step"]


def adaptive_stop(losses: list[float], window: int, threshold: float,
                  knobs: ScheduleKnobs = ScheduleKnobs()) -> tuple[Optional[int], int]:
    """(stop step or None, evaluations) of DVAR fed by the adaptive schedule on a recorded
    every-step series. L_det at a step does not depend on which earlier steps were evaluated
    (fixed reference batch, its own generator), so this is exactly what a live run of the same
    training would have evaluated and decided."""
    schedule = AdaptiveSchedule(threshold, window, knobs=knobs)
    policy = StopPolicy(build_criterion("dvar", window, 1, threshold), max_steps=10**9)
    evaluations = 0
    for step, value in enumerate(losses, start=1):
        due = schedule.due(step, policy)
        evaluations += due
        schedule.observe(step, value if due else None, policy)
        if due and policy.check(step) is not None:
            return step, evaluations
    return None, evaluations


def relative_to_repo(path: Path) -> str:
    """`path` as written in a report: relative to the repository when inside it."""
    path = path.resolve()
    root = Path(__file__).resolve().parents[1]
    return path.relative_to(root).as_posix() if path.is_relative_to(root) else str(path)


def runs_world(runs_dir: Path) -> Optional[str]:
    """The tiny world (provenance.world_fingerprint) the run files in runs_dir trained on: a
    replay's numbers belong to that world, whichever world is installed when it is replayed."""
    worlds = {read_run(path).get("world") for path in run_paths(runs_dir)}
    if len(worlds) > 1:
        raise SystemExit(f"error: {runs_dir} holds runs of several worlds ({', '.join(sorted(map(str, worlds)))})")
    return worlds.pop() if worlds else None


def write_study(out: Path, stem: str, report: dict, sections: list[str], runs_dir: Path) -> None:
    """A replay study's results: <stem>.json (the numbers, with the world of the runs replayed)
    and <stem>.md (the sections), printed too."""
    out.mkdir(parents=True, exist_ok=True)
    report = {"world": runs_world(runs_dir), **report}
    (out / f"{stem}.json").write_text(json.dumps(report, indent=1) + "\n")
    (out / f"{stem}.md").write_text("\n".join(sections))
    print("\n".join(sections))
