"""The GPU road's matrix on CPU: method x mixed precision x data-parallel processes on the builtin
tiny world, each cell one `personalize-train` run (a subprocess, `--num-processes N` over gloo).

    nice -n 10 python benchmarks/precision_matrix.py                  # all 30 cells
    python benchmarks/precision_matrix.py --methods lora --processes 1 --out /tmp/pm   # a part

A cell passes when:
  - the run exits 0;
  - result.json is a RunResult that records the precision and process count the cell asked for
    (`mixedPrecision`, `processes`) and stops at a step within the budget;
  - every artifact tensor is fp32, and the stock diffusers loaders (the documented way per
    artifact kind) sample finite images from it in fp32 and in the half dtype (the cell's own;
    bf16 for fp32 cells), and the fp32 sample differs from the base model's for the same prompt
    and noise (tests/trainer/artifact_roundtrip.py, the same check the test suite makes).

Reported per cell: pass/fail with the reasons, the stop step (per stage for tiDreambooth), s/step
(training loop seconds / steps, from result.json's stages) and the wall time of the run. Cells
run one after another, the three precisions of one (method, processes) pair back to back, so the
s/step ratios between precisions are measured side by side. CPU half precision is emulated by
autocast and is slower than fp32 here; the ratios say nothing about GPUs.

Writes <out>/precision_matrix.json and <out>/precision_matrix.md (default benchmarks/results/),
rewritten after every cell. Exits 1 when any cell failed.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
sys.path.insert(0, str(ROOT / "tests" / "trainer"))
from job_specs import job_spec  # noqa: E402

METHODS = ("textualInversion", "dreambooth", "lora", "customDiffusion", "tiDreambooth")
PRECISIONS = ("no", "bf16", "fp16")
PROCESS_COUNTS = (1, 2)
CONCEPT = "red_striped_triangle"


def cell_spec(concept_dir: Path, method: str, precision: str, max_steps: int) -> dict:
    """The tests' small job (tests/trainer/job_specs.py) on the builtin tiny world."""
    spec = job_spec(Path("unused"), concept_dir, method, baseModel={"builtin": "tiny-world"})
    spec["training"] = {**spec["training"], "maxSteps": max_steps, "mixedPrecision": precision}
    if method == "tiDreambooth":
        spec["tiDreambooth"]["stage1MaxSteps"] = max(2, max_steps // 2)
    return spec


def run_cell(work: Path, concept_dir: Path, method: str, precision: str, processes: int, max_steps: int,
             timeout: float) -> dict:
    from personalize.pipeline_io import builtin_tiny_world_folder
    from personalize.spec import RunResult

    from artifact_roundtrip import check_round_trip

    name = f"{method}-{precision}-{processes}p"
    folder = work / name
    folder.mkdir(parents=True, exist_ok=True)
    config, out = folder / "job.yaml", folder / "out"
    config.write_text(yaml.safe_dump({"spec": cell_spec(concept_dir, method, precision, max_steps)}))
    command = [sys.executable, "-m", "personalize.cli", "--config", str(config), "--output", str(out)]
    if processes > 1:
        command += ["--num-processes", str(processes)]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    env.pop("PJ_NAME", None)
    env.pop("PJ_NAMESPACE", None)
    cell = {"method": method, "precision": precision, "processes": processes, "passed": False, "failures": []}
    started = time.monotonic()
    try:
        proc = subprocess.run(command, capture_output=True, text=True, env=env, timeout=timeout)
    except subprocess.TimeoutExpired:
        cell["failures"].append(f"timed out after {timeout:.0f} s")
        return cell
    cell["wall_seconds"] = round(time.monotonic() - started, 1)
    cell["exit_code"] = proc.returncode
    (folder / "stdout.log").write_text(proc.stdout)
    (folder / "stderr.log").write_text(proc.stderr)
    if proc.returncode != 0:
        cell["failures"].append(f"exit code {proc.returncode}: {proc.stderr.strip().splitlines()[-1:] or ''}")
        return cell

    result = json.loads((out / "result.json").read_text())
    stages = result.get("stages") or []
    steps, seconds = sum(s["stopStep"] for s in stages), sum(s["seconds"] for s in stages)
    cell["stop_step"] = result["earlyStop"]["step"]
    cell["stop_reason"] = result["earlyStop"]["reason"]
    cell["stage_stops"] = {s["name"]: s["stopStep"] for s in stages}
    cell["seconds_per_step"] = round(seconds / steps, 3) if steps else None
    checks = [
        ("result.json is a RunResult", lambda: RunResult.model_validate(result)),
        ("mixedPrecision recorded", lambda: _expect(result.get("mixedPrecision"), precision)),
        ("processes recorded", lambda: _expect(result.get("processes"), processes)),
        ("stop step within the budget", lambda: _expect(1 <= cell["stop_step"] <= max_steps, True)),
        ("stock-loader round trip", lambda: check_round_trip(out, result, builtin_tiny_world_folder(), precision)),
    ]
    for what, check in checks:
        try:
            check()
        except Exception as err:  # noqa: BLE001 - every failed check is reported, the matrix goes on
            cell["failures"].append(f"{what}: {type(err).__name__}: {err}".strip())
            with (folder / "check_errors.log").open("a") as log:
                log.write(traceback.format_exc())
    cell["passed"] = not cell["failures"]
    return cell


def _expect(got, want) -> None:
    if got != want:
        raise AssertionError(f"got {got!r}, expected {want!r}")


def summary_rows(cells: list[dict]) -> list[str]:
    """s/step per (method, processes): fp32 vs bf16 vs fp16, and the half/fp32 ratios."""
    by_key = {(c["method"], c["processes"], c["precision"]): c for c in cells}
    rows = []
    for method in METHODS:
        for processes in PROCESS_COUNTS:
            sps = {p: (by_key.get((method, processes, p)) or {}).get("seconds_per_step") for p in PRECISIONS}
            if not any(sps.values()):
                continue
            ratio = {p: f"{sps[p] / sps['no']:.2f}" if sps[p] and sps["no"] else "-" for p in ("bf16", "fp16")}
            rows.append(f"| {method} | {processes} | {_num(sps['no'])} | {_num(sps['bf16'])} | {_num(sps['fp16'])} "
                        f"| {ratio['bf16']} | {ratio['fp16']} |")
    return rows


def _num(value) -> str:
    return "-" if value is None else f"{value:.3f}"


def write_results(out: Path, meta: dict, cells: list[dict]) -> None:
    out.mkdir(parents=True, exist_ok=True)
    passed = sum(c["passed"] for c in cells)
    (out / "precision_matrix.json").write_text(json.dumps({**meta, "passed": passed, "cells": cells}, indent=1) + "\n")
    lines = [
        "# Mixed precision x processes matrix (tiny world, CPU)",
        "",
        f"Command: `{meta['command']}`. {meta['machine']}; OMP_NUM_THREADS=1 per process; machine shared with "
        f"other jobs, so s/step is for information (the precisions of one row ran back to back). Budget: "
        f"maxSteps {meta['max_steps']} (tiDreambooth: stage 1 {max(2, meta['max_steps'] // 2)} + stage 2 "
        f"{meta['max_steps']}), DVAR window 4, batch 2. Checks per cell: exit 0, result.json "
        "(RunResult, mixedPrecision and processes as asked, stop step within the budget), fp32-only "
        "artifacts, stock diffusers loaders sampling in fp32 and in the half dtype (bf16 for fp32 "
        "cells), fp32 sample differs from the base model's.",
        "",
        f"**{passed}/{len(cells)} cells passed.** Commit {meta['commit']}, {meta['date']}.",
        "",
        "| method | precision | processes | result | stop step (reason) | s/step | wall s | failures |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for c in cells:
        stages = c.get("stage_stops") or {}  # per stage when there are several
        stops = ", ".join(f"{k} {v}" for k, v in stages.items()) if len(stages) > 1 else str(c.get("stop_step", "-"))
        lines.append(f"| {c['method']} | {c['precision']} | {c['processes']} | {'pass' if c['passed'] else 'FAIL'} "
                     f"| {stops} ({c.get('stop_reason', '-')}) | {_num(c.get('seconds_per_step'))} "
                     f"| {c.get('wall_seconds', '-')} | {'; '.join(c['failures']) or '-'} |")
    lines += ["", "s/step by precision (CPU autocast emulates half precision: slower than fp32 here):", "",
              "| method | processes | fp32 s/step | bf16 s/step | fp16 s/step | bf16/fp32 | fp16/fp32 |",
              "|---|---|---|---|---|---|---|", *summary_rows(cells), ""]
    (out / "precision_matrix.md").write_text("\n".join(lines))


def machine() -> str:
    import torch

    return f"{os.cpu_count()} CPU cores ({platform.processor() or platform.machine()}), torch {torch.__version__}"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    parser.add_argument("--precisions", nargs="+", default=list(PRECISIONS), choices=PRECISIONS)
    parser.add_argument("--processes", nargs="+", type=int, default=list(PROCESS_COUNTS))
    parser.add_argument("--max-steps", type=int, default=6)
    parser.add_argument("--timeout", type=float, default=1800.0, help="seconds per cell")
    parser.add_argument("--work", type=Path, default=None, help="run folders (default: a temporary folder)")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    import diffusers
    import torch
    import transformers

    from personalize.world import concept_by_name, write_concept_images
    from personalize.world.provenance import installed_world

    torch.set_num_threads(1)  # the round-trip sampling here; the runs themselves get OMP_NUM_THREADS=1
    diffusers.utils.logging.disable_progress_bar()
    transformers.utils.logging.disable_progress_bar()

    work = args.work or Path(tempfile.mkdtemp(prefix="precision_matrix."))
    concept_dir = work / "concept"
    if not concept_dir.exists():
        write_concept_images(concept_by_name(CONCEPT), 6, concept_dir, seed=0)
    def git(*command: str) -> str:
        return subprocess.run(["git", *command], capture_output=True, text=True, cwd=ROOT).stdout.strip()

    commit = git("rev-parse", "--short", "HEAD") + (" (with uncommitted changes)" if git("status", "--porcelain") else "")
    script = Path(sys.argv[0])
    script = script.relative_to(ROOT) if script.is_absolute() else script
    meta = {"world": installed_world(), "command": " ".join(["python", str(script), *sys.argv[1:]]),
            "machine": machine(), "commit": commit, "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
            "max_steps": args.max_steps, "concept": CONCEPT, "work": str(work)}
    cells = []
    for method in args.methods:
        for processes in args.processes:
            for precision in args.precisions:
                cell = run_cell(work, concept_dir, method, precision, processes, args.max_steps, args.timeout)
                cells.append(cell)
                print(f"{method:17s} {precision:4s} {processes}p  {'pass' if cell['passed'] else 'FAIL'}  "
                      f"stop {cell.get('stop_step', '-')}  s/step {_num(cell.get('seconds_per_step'))}  "
                      f"{'; '.join(cell['failures'])}", flush=True)
                write_results(args.out, meta, cells)
    print(f"{sum(c['passed'] for c in cells)}/{len(cells)} cells passed; work folder {work}")
    return 0 if all(c["passed"] for c in cells) else 1


if __name__ == "__main__":
    sys.exit(main())
