"""Seconds per step of our LoRA trainer next to diffusers' own LoRA scripts, per model family
(SDXL, FLUX.1, SD3), on the same tiny random-weight pipelines, with L_det tracking off and on.

    nice -n 10 python benchmarks/families_step_time.py --diffusers-git DIR [--steps 30] [--skip 5] [--reps 2]

DIR is a git dir of github.com/huggingface/diffusers; the scripts
(examples/dreambooth/train_dreambooth_lora_{sdxl,flux,sd3}.py) are read from it with `git show`
and run unmodified except for the module-level `check_min_version(...)` (it refuses an installed
diffusers older than the snapshot's dev version), offline, single process on the CPU.

Every run is a fresh process started through one timing wrapper: a global torch optimizer-step
post-hook stamps each optimizer step, and s/step is (stamp[steps] - stamp[skip]) / (steps - skip),
so loading, the first steps and the final saving are excluded, for both trainers alike. Runs are
interleaved (rep 1 of every family x condition, then rep 2, ...) so machine load hits all alike;
the figure per condition is the median over reps. Settings shared by both trainers: the family's
tiny resolution, batch 2, LoRA rank 4, learning rate 1e-4, fp32, no prior preservation, no
validation, no gradient checkpointing, 2 torch threads; T5 prompts of 16 tokens (the tiny
tokenizer's length). Ours: criterion none; "untracked" never evaluates L_det (evalEvery larger
than the run), "tracked" evaluates it after every step (evalEvery 1, reference batch 4).

Writes benchmarks/results/families_step_time.json and .md.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests" / "trainer"))  # the tiny family pipelines the tests build
import tiny_families  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results"
SCRIPTS = {family: f"examples/dreambooth/train_dreambooth_lora_{family}.py" for family in ("sdxl", "flux", "sd3")}
CONDITIONS = ("diffusers", "ours_untracked", "ours_tracked")
NEVER = 100_000  # an evalEvery larger than any run: L_det is never evaluated
BATCH, RANK, LR, THREADS, PROMPT = 2, 4, 1e-4, 2, "a photo of sks triangle"

TIMED_RUN = '''
import atexit, json, os, runpy, sys, time
import torch
from torch.optim.optimizer import register_optimizer_step_post_hook
threads = int(os.environ["BENCH_THREADS"])
torch.set_num_threads(threads)
stamps = []
register_optimizer_step_post_hook(lambda optimizer, args, kwargs: stamps.append(time.perf_counter()))
atexit.register(lambda: open(os.environ["BENCH_TIMING_OUT"], "w").write(json.dumps({"stamps": stamps})))
script, sys.argv = sys.argv[1], sys.argv[1:]
runpy.run_path(script, run_name="__main__")
'''
OUR_ENTRY = "import sys\nfrom personalize.run import main\nsys.exit(main())\n"


def concept_images(folder: Path) -> Path:
    """Four 32x32 PNGs of a red triangle on different backgrounds."""
    from PIL import Image, ImageDraw

    folder.mkdir(parents=True, exist_ok=True)
    for i, background in enumerate([(255, 255, 255), (20, 20, 20), (200, 220, 255), (230, 255, 200)]):
        image = Image.new("RGB", (32, 32), background)
        ImageDraw.Draw(image).polygon([(16, 3 + i), (29, 28), (3, 28)], fill=(220, 30, 30))
        image.save(folder / f"img{i}.png")
    return folder


def extract_script(git_dir: str, path: str, work: Path) -> Path:
    text = subprocess.run(["git", "-C", git_dir, "show", f"HEAD:{path}"], check=True, capture_output=True,
                          text=True).stdout
    out = work / Path(path).name
    out.write_text(text.replace("\ncheck_min_version(", "\n# version gate off: check_min_version("))
    return out


def diffusers_command(script: Path, family: str, pipeline: Path, concept: Path, output: Path, steps: int) -> list[str]:
    command = [str(script), f"--pretrained_model_name_or_path={pipeline}", f"--instance_data_dir={concept}",
               f"--instance_prompt={PROMPT}", f"--resolution={tiny_families.RESOLUTION[family]}",
               f"--train_batch_size={BATCH}", f"--max_train_steps={steps}", f"--rank={RANK}",
               f"--learning_rate={LR}", "--mixed_precision=no", "--seed=0", "--checkpointing_steps=100000",
               "--dataloader_num_workers=0", f"--output_dir={output}"]
    if family in ("flux", "sd3"):
        command.append(f"--max_sequence_length={tiny_families.T5_MAX_LENGTH}")
    return command


def our_command(entry: Path, family: str, pipeline: Path, concept: Path, output: Path, steps: int,
                eval_every: int, work: Path) -> list[str]:
    spec = {
        "baseModel": {"path": str(pipeline)},
        "method": "lora",
        "concept": {"images": {"path": str(concept)}, "classNoun": "triangle", "token": "auto",
                    "captionTemplate": "a photo of {token} {class_noun}"},
        "lora": {"rank": RANK},
        "priorPreservation": {"enabled": False},
        "training": {"maxSteps": steps, "batchSize": BATCH, "learningRate": LR, "seed": 0,
                     "resolution": tiny_families.RESOLUTION[family]},
        "earlyStopping": {"criterion": "none", "evalEvery": eval_every, "referenceBatchSize": 4},
        "validation": {"prompts": []},
    }
    config = work / f"{family}_{eval_every}.yaml"
    config.write_text(yaml.safe_dump({"apiVersion": "personalization.dvar.dev/v1alpha1", "kind": "PersonalizationJob",
                                      "metadata": {"name": f"bench-{family}"}, "spec": spec}))
    return [str(entry), "--config", str(config), "--output", str(output)]


def torchvision_path(work: Path) -> str:
    """The scripts import torchvision.transforms; the lock has no torchvision (PyPI's wheels for this
    CPU torch are CUDA builds whose compiled ops cannot load). As diffusers_examples.sh does: the
    matching wheel, unzipped, with its fake-kernel registrations emptied (only the pure-Python
    transforms are used). Returns a PYTHONPATH entry ("" when the venv imports it already)."""
    if subprocess.run([sys.executable, "-c", "import torchvision.transforms"], capture_output=True).returncode == 0:
        return ""
    import torch

    major, minor = torch.__version__.split("+")[0].split(".")[:2]
    # not a folder named torchvision next to the runner: the script directory is on sys.path
    wheels, unpacked = work / "wheels", work / "tv"
    subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--only-binary=:all:",
                    f"torchvision==0.{int(minor) + 15}.*", "-d", str(wheels)], check=True)
    wheel = next(wheels.glob("torchvision-*.whl"))
    subprocess.run([sys.executable, "-m", "zipfile", "-e", str(wheel), str(unpacked)], check=True)
    (unpacked / "torchvision" / "_meta_registrations.py").write_text("# emptied: compiled ops cannot load here\n")
    return str(unpacked)


def timed(command: list[str], work: Path, name: str, pythonpath: str = "") -> tuple[list[float], int, str]:
    timing = work / f"{name}.timing.json"
    env = {**os.environ, "PYTHONPATH": pythonpath, "BENCH_THREADS": str(THREADS), "BENCH_TIMING_OUT": str(timing), "OMP_NUM_THREADS": str(THREADS),
           "MKL_NUM_THREADS": str(THREADS), "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
           "HF_HOME": str(work / "hf_home"), "WANDB_MODE": "disabled", "TOKENIZERS_PARALLELISM": "false"}
    proc = subprocess.run([sys.executable, str(work / "timed_run.py"), *command], cwd=work, env=env,
                          capture_output=True, text=True)
    stamps = json.loads(timing.read_text())["stamps"] if timing.exists() else []
    return stamps, proc.returncode, (proc.stdout + proc.stderr)[-2500:]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--diffusers-git", required=True)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--skip", type=int, default=5)
    parser.add_argument("--reps", type=int, default=2)
    parser.add_argument("--families", default="sdxl,flux,sd3")
    parser.add_argument("--note", default="", help="how to read this run (machine load, ...), kept in the results")
    parser.add_argument("--render-only", action="store_true",
                        help="rewrite the .md (and the note) from the existing .json without running")
    args = parser.parse_args()
    if args.render_only:
        report = json.loads((RESULTS / "families_step_time.json").read_text())
        report["note"] = args.note or report.get("note", "")
        (RESULTS / "families_step_time.json").write_text(json.dumps(report, indent=2) + "\n")
        (RESULTS / "families_step_time.md").write_text(markdown(report))
        return 0
    families = args.families.split(",")
    commit = subprocess.run(["git", "-C", args.diffusers_git, "rev-parse", "HEAD"], check=True, capture_output=True,
                            text=True).stdout.strip()

    work = Path(tempfile.mkdtemp(prefix="families_step_time."))
    (work / "timed_run.py").write_text(TIMED_RUN)
    entry = work / "personalize_train.py"
    entry.write_text(OUR_ENTRY)
    concept = concept_images(work / "concept")
    pipelines = {f: tiny_families.BUILDERS[f](work / "pipelines" / f) for f in families}
    scripts = {f: extract_script(args.diffusers_git, SCRIPTS[f], work) for f in families}
    extra_path = torchvision_path(work)

    seconds: dict[str, dict[str, list[float]]] = {f: {c: [] for c in CONDITIONS} for f in families}
    failures: dict[str, dict[str, str]] = {f: {} for f in families}
    for rep in range(args.reps):
        for family in families:
            for condition in CONDITIONS:
                output = work / "out" / f"{family}_{condition}_{rep}"
                if condition == "diffusers":
                    command = diffusers_command(scripts[family], family, pipelines[family], concept, output, args.steps)
                else:
                    eval_every = 1 if condition == "ours_tracked" else NEVER
                    command = our_command(entry, family, pipelines[family], concept, output, args.steps, eval_every, work)
                started = time.monotonic()
                stamps, code, tail = timed(command, work, f"{family}_{condition}_{rep}",
                                           extra_path if condition == "diffusers" else "")
                if code != 0 or len(stamps) < args.steps:
                    failures[family][condition] = f"exit {code}, {len(stamps)} optimizer steps; log tail:\n{tail}"
                    print(f"{family} {condition} rep {rep}: FAILED (exit {code})\n{tail}", file=sys.stderr, flush=True)
                    continue
                value = (stamps[args.steps - 1] - stamps[args.skip - 1]) / (args.steps - args.skip)
                seconds[family][condition].append(value)
                print(f"{family} {condition} rep {rep}: {value:.4f} s/step ({time.monotonic() - started:.0f} s wall)",
                      file=sys.stderr, flush=True)

    results = {}
    for family in families:
        medians = {c: statistics.median(v) for c, v in seconds[family].items() if v}
        ratios = {}
        if "diffusers" in medians:
            ratios |= {f"{c}_over_diffusers": round(medians[c] / medians["diffusers"], 3)
                       for c in ("ours_untracked", "ours_tracked") if c in medians}
        if "ours_untracked" in medians and "ours_tracked" in medians:
            ratios["tracked_over_untracked"] = round(medians["ours_tracked"] / medians["ours_untracked"], 3)
        results[family] = {"script": SCRIPTS[family], "seconds_per_step": {c: [round(x, 5) for x in v]
                                                                          for c, v in seconds[family].items()},
                           "median_seconds_per_step": {c: round(m, 5) for c, m in medians.items()},
                           "ratios": ratios, "failures": failures[family]}
    import diffusers
    import peft
    import torch
    import transformers

    report = {
        "world": None,  # no tiny world: random-weight tiny SDXL, FLUX.1 and SD3 pipelines
        "settings": {"steps": args.steps, "timed_steps": f"{args.skip + 1}-{args.steps}", "reps": args.reps,
                     "batch_size": BATCH, "lora_rank": RANK, "learning_rate": LR, "torch_threads": THREADS,
                     "resolution": {f: tiny_families.RESOLUTION[f] for f in families},
                     "t5_tokens": tiny_families.T5_MAX_LENGTH, "reference_batch_size_tracked": 4},
        "diffusers_examples_commit": commit,
        "versions": {"torch": torch.__version__, "diffusers": diffusers.__version__,
                     "transformers": transformers.__version__, "peft": peft.__version__,
                     "python": platform.python_version()},
        "machine": {"cpu_count": os.cpu_count(), "platform": platform.platform()},
        "families": results,
        "note": args.note,
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "families_step_time.json").write_text(json.dumps(report, indent=2) + "\n")
    (RESULTS / "families_step_time.md").write_text(markdown(report))
    print(markdown(report))
    return 0


def markdown(report: dict) -> str:
    s = report["settings"]
    lines = [
        "# LoRA s/step per model family: ours vs diffusers' scripts, L_det tracking off and on",
        "",
        f"`benchmarks/families_step_time.py`; tiny random-weight pipelines (tests/trainer/tiny_families.py), CPU, "
        f"{s['torch_threads']} torch threads, batch {s['batch_size']}, rank {s['lora_rank']}, fp32, "
        f"steps {s['timed_steps']} of {s['steps']} timed by an optimizer-step hook, median of {s['reps']} interleaved "
        f"runs. diffusers examples at {report['diffusers_examples_commit'][:12]}; "
        + ", ".join(f"{k} {v}" for k, v in report["versions"].items()) + ".",
        "",
        "| family | diffusers script | s/step diffusers | s/step ours untracked | s/step ours tracked (evalEvery 1) "
        "| untracked / diffusers | tracked / untracked |",
        "|---|---|---|---|---|---|---|",
    ]
    for family, r in report["families"].items():
        m, q = r["median_seconds_per_step"], r["ratios"]

        def cell(key, table):
            value = table.get(key)
            return "failed" if value is None else (f"{value:.4f}" if table is m else f"{value:.3f}")

        lines.append(f"| {family} | `{Path(r['script']).name}` | {cell('diffusers', m)} | {cell('ours_untracked', m)} "
                     f"| {cell('ours_tracked', m)} | {cell('ours_untracked_over_diffusers', q)} "
                     f"| {cell('tracked_over_untracked', q)} |")
    lines += ["", "Per-run values (s/step, in run order):", ""]
    for family, r in report["families"].items():
        runs = "; ".join(f"{c} " + ", ".join(f"{v:.3f}" for v in values) for c, values in r["seconds_per_step"].items())
        lines.append(f"- {family}: {runs}")
    if report.get("note"):
        lines += ["", "## Reading these numbers", "", report["note"]]
    failed = [(f, c, why) for f, r in report["families"].items() for c, why in r["failures"].items()]
    if failed:
        lines += ["", "## Runs that failed", ""]
        for family, condition, why in failed:
            lines += [f"- {family} / {condition}:", "", "```", why.strip()[-1500:], "```", ""]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
