"""What preemption safety costs on the tiny world (checkpoints and resume), per method:

- checkpoint size (all files of one checkpoint) and save time (write + fsync + checksums +
  atomic rename, as logged by `save_checkpoint`), and the time to read and verify it on resume;
- the extra wall time of a preempted-and-resumed run over an uninterrupted one.

    python benchmarks/checkpoint_cost.py [--methods textualInversion,lora] [--interrupt-at 8]

For each method three runs of the real `personalize-train` CLI with the same config
(checkpointEvery 5, DVAR), one after the other in this one invocation so that they see the same
machine: (1) uninterrupted; (2) SIGTERMed once its progress line shows step >= --interrupt-at
(for tiDreambooth: in stage 2), which saves a checkpoint and exits 143; (3) the same command
again, which resumes. Extra wall time = (2) + (3) - (1), also as a ratio ((2) + (3)) / (1); it is
mostly the second process start (imports, loading the model). The runs also check that the
resumed run's losses.csv equals the uninterrupted one's (`identical`).

Writes benchmarks/results/checkpoint_cost.json and checkpoint_cost.md.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

from personalize.world.provenance import installed_world
from personalize.world.shapes import concept_by_name, write_concept_images

METHODS = ["textualInversion", "dreambooth", "lora", "customDiffusion", "tiDreambooth"]
LEARNING_RATES = {"textualInversion": 0.02, "lora": 1e-3, "customDiffusion": 1e-3, "dreambooth": 5e-4, "tiDreambooth": 5e-4}
SAVED = re.compile(r"checkpoint saved: \S+ \(step (\d+), (\d+) bytes, ([\d.]+) s\)")
READ = re.compile(r"resuming from \S+ \(stage \S+, step (\d+); read in ([\d.]+) s\)")
STEP_LINE = re.compile(r"step\s+(\d+)/")
RESULTS = Path(__file__).parent / "results"


def config_for(method: str, images: Path, path: Path, max_steps: int) -> Path:
    spec = {
        "baseModel": {"builtin": "tiny-world"},
        "method": method,
        "concept": {"images": {"path": str(images)}, "classNoun": "triangle", "token": "auto"},
        "training": {"maxSteps": max_steps, "batchSize": 2, "seed": 0, "checkpointEvery": 5,
                     "learningRate": LEARNING_RATES[method]},
        "earlyStopping": {"criterion": "dvar", "window": 8, "threshold": 0.3, "evalEvery": 1, "referenceBatchSize": 2},
        "validation": {"numImagesPerPrompt": 1, "inferenceSteps": 2},
    }
    if method in ("dreambooth", "lora", "customDiffusion"):
        spec["priorPreservation"] = {"enabled": False}
    if method == "tiDreambooth":
        spec["tiDreambooth"] = {"stage1MaxSteps": 15, "stage1LearningRate": 0.02, "stage1Window": 8}
    path.write_text(yaml.safe_dump({"apiVersion": "personalization.dvar.dev/v1alpha1", "kind": "PersonalizationJob",
                                    "metadata": {"name": "bench"}, "spec": spec}))
    return path


def run(config: Path, output: Path, interrupt_at: int | None = None, after: str | None = None) -> tuple[int, float, str]:
    """(exit code, wall seconds, combined output) of one CLI run; SIGTERM at a progress line if asked."""
    env = dict(os.environ, OMP_NUM_THREADS="1")
    for name in ("PJ_NAME", "PJ_NAMESPACE", "PJ_TERMINATION_LOG"):
        env.pop(name, None)
    cmd = [sys.executable, "-m", "personalize.cli", "--config", str(config), "--output", str(output)]
    started = time.monotonic()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    lines, armed, sent = [], after is None, False
    for line in proc.stdout:
        lines.append(line)
        armed = armed or (after is not None and after in line)
        match = STEP_LINE.match(line)
        if interrupt_at is not None and armed and not sent and match and int(match.group(1)) >= interrupt_at:
            proc.send_signal(signal.SIGTERM)
            sent = True
    code = proc.wait()
    return code, time.monotonic() - started, "".join(lines)


def measure(method: str, images: Path, work: Path, interrupt_at: int, max_steps: int) -> dict:
    config = config_for(method, images, work / f"{method}.yaml", max_steps)
    after = "textualInversion: stopped" if method == "tiDreambooth" else None
    code0, straight_s, log0 = run(config, work / f"{method}-straight")
    code1, interrupted_s, log1 = run(config, work / f"{method}-resumed", interrupt_at, after)
    code2, resumed_s, log2 = run(config, work / f"{method}-resumed")
    if (code0, code1, code2) != (0, 143, 0):
        raise SystemExit(f"{method}: exit codes {(code0, code1, code2)}\n{log1[-3000:]}\n{log2[-3000:]}")
    saves = [(int(s), int(b), float(t)) for s, b, t in SAVED.findall(log0)]
    read = READ.search(log2)
    identical = (work / f"{method}-straight" / "losses.csv").read_text() == (work / f"{method}-resumed" / "losses.csv").read_text()
    stop = json.loads((work / f"{method}-straight" / "result.json").read_text())["earlyStop"]
    return {
        "method": method,
        "checkpoint_bytes": saves[-1][1],
        "save_seconds_median": statistics.median(t for _, _, t in saves),
        "saves": len(saves),
        "read_seconds": float(read.group(2)),
        "resumed_from_step": int(read.group(1)),
        "stop_step": stop["step"],
        "stop_reason": stop["reason"],
        "uninterrupted_seconds": round(straight_s, 2),
        "interrupted_seconds": round(interrupted_s, 2),
        "resumed_seconds": round(resumed_s, 2),
        "extra_seconds": round(interrupted_s + resumed_s - straight_s, 2),
        "ratio": round((interrupted_s + resumed_s) / straight_s, 3),
        "identical": identical,
    }


def markdown(rows: list[dict], meta: dict) -> str:
    out = [
        "# Checkpoint cost on the tiny world",
        "",
        f"`python benchmarks/checkpoint_cost.py` on {meta['machine']}; checkpointEvery 5, DVAR window 8, "
        f"SIGTERM at step >= {meta['interrupt_at']} (tiDreambooth: in stage 2). Single CPU thread per run.",
        "",
        "| method | checkpoint size | save (median) | read+verify | stop step | uninterrupted | interrupted + resumed | extra | ratio | losses identical |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|:---:|",
    ]
    for r in rows:
        out.append(
            f"| {r['method']} | {r['checkpoint_bytes'] / 1e6:.2f} MB | {r['save_seconds_median']:.3f} s | "
            f"{r['read_seconds']:.3f} s | {r['stop_step']} | {r['uninterrupted_seconds']:.1f} s | "
            f"{r['interrupted_seconds']:.1f} + {r['resumed_seconds']:.1f} s | {r['extra_seconds']:+.1f} s | "
            f"{r['ratio']:.2f} | {'yes' if r['identical'] else 'NO'} |"
        )
    out += ["", "The extra time is mostly the second process start (Python imports, loading the base model, "
            "reading the checkpoint); the steps redone after a SIGTERM are none (the SIGTERM checkpoint is "
            "taken after the running step). With a SIGKILL instead, up to checkpointEvery - 1 steps are redone.", ""]
    return "\n".join(out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--methods", default=",".join(METHODS))
    parser.add_argument("--interrupt-at", type=int, default=8)
    parser.add_argument("--max-steps", type=int, default=40)
    args = parser.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        images = work / "images"
        write_concept_images(concept_by_name("red_striped_triangle"), 6, images, seed=0)
        for method in args.methods.split(","):
            rows.append(measure(method, images, work, args.interrupt_at, args.max_steps))
            print(json.dumps(rows[-1]), flush=True)
    meta = {"machine": f"{platform.machine()} {os.cpu_count()} cores, {platform.python_version()}",
            "interrupt_at": args.interrupt_at, "max_steps": args.max_steps}
    RESULTS.mkdir(exist_ok=True)
    report = {"world": installed_world(), "meta": meta, "methods": rows}
    (RESULTS / "checkpoint_cost.json").write_text(json.dumps(report, indent=2) + "\n")
    (RESULTS / "checkpoint_cost.md").write_text(markdown(rows, meta))
    print(markdown(rows, meta))


if __name__ == "__main__":
    main()
