"""Packed against solo training: concept-steps per second and peak memory, measured side by side.

    python benchmarks/packing.py [--methods textualInversion,lora] [--sizes 1,2,4,8] [--steps 20]
    python benchmarks/packing.py --model sd15 --precision bf16 --sizes 1,2,4,8,16   # on a GPU
    python benchmarks/packing.py --model sdxl --size tiny                           # the same path on CPU

For each method and pack size N: N concepts of the tiny world train a fixed number of steps
(criterion none, so every run does the same work) solo, one after the other, and then together
in one pack; the two are interleaved per size so that machine load hits both alike. Reported:
concept-steps per second of each, their ratio, and the process's peak RSS growth. Results go to
benchmarks/results/packing.{json,md}. Timing includes each run's setup (loading the pipeline for
solo runs, once for the pack), as a user pays it. `--model sd15|sdxl` trains randomly initialised
full-size architectures (random_pipelines.py; nothing is downloaded) at 512/1024 px; peak memory is
then the GPU's (torch.cuda.max_memory_allocated) when one is present.
"""

from __future__ import annotations

import argparse
import json
import resource
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch
import yaml

from personalize.world import concept_by_name, write_concept_images

CONCEPTS = ["red_striped_triangle", "blue_dotted_star", "yellow_checkered_circle", "green_striped_hexagon",
            "purple_dotted_square", "orange_checkered_diamond", "pink_striped_heart", "white_dotted_cross",
            "blue_checkered_triangle", "red_dotted_circle", "green_striped_circle", "orange_checkered_square",
            "yellow_dotted_triangle", "pink_checkered_star", "blue_striped_diamond", "purple_checkered_hexagon"]
RESULTS = Path(__file__).parent / "results"


def manifest(name: str, images: Path, method: str, steps: int, index: int, base: dict, training: dict) -> dict:
    return {"apiVersion": "personalization.dvar.dev/v1alpha1", "kind": "PersonalizationJob", "metadata": {"name": name},
            "spec": {"baseModel": base, "method": method,
                     "concept": {"images": {"path": str(images)}, "classNoun": "shape",
                                 "token": f"<c{index}>" if method != "lora" else "sks"},
                     "training": {"maxSteps": steps, "seed": index, **training},
                     "earlyStopping": {"criterion": "none"}, "validation": {"prompts": []}}}


def peak_memory_mb() -> float:
    """The GPU's peak allocation when there is one, else the process's peak RSS."""
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def solo_training_seconds(root: Path, manifests: list[dict]) -> float:
    """The solo runs' time in training steps (result.json stages' seconds: no loading or outputs)."""
    return sum(stage["seconds"] for m in manifests
               for stage in json.loads((root / m["metadata"]["name"] / "result.json").read_text())["stages"])


def model_scaling(sizes: list[int], batch: int, repeats: int = 5) -> dict[int, float]:
    """The frozen tiny-world models' own batch scaling, what a pack of N gains on the model compute
    alone on this machine: N x seconds(batch) / seconds(N x batch) for one text-encoder and UNet
    forward and backward to their inputs (what every packed method runs). A pack also shares the
    per-step work around the models (drawing data, launching the optimizers' kernels, logging), so
    it may gain more than this.
    Sizes are interleaved over `repeats` rounds and the fastest round of each is kept."""
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextModel

    from personalize.world.tiny_models import TINY_WORLD_DIR, load_tokenizer

    unet = UNet2DConditionModel.from_pretrained(TINY_WORLD_DIR / "unet", torch_dtype=torch.float32).requires_grad_(False)
    text_encoder = CLIPTextModel.from_pretrained(TINY_WORLD_DIR / "text_encoder", torch_dtype=torch.float32)
    text_encoder.requires_grad_(False)
    # the gradient flows back to the token embeddings, as to a trained token's rows
    text_encoder.get_input_embeddings().register_forward_hook(lambda module, args, out: out.requires_grad_(True))
    ids = load_tokenizer()(["a photo of a red striped triangle"], padding="max_length", return_tensors="pt").input_ids
    side = unet.config.sample_size

    def seconds(rows: int) -> float:
        started = time.perf_counter()
        hidden = text_encoder(ids.repeat(rows, 1)).last_hidden_state
        latents = torch.randn(rows, unet.config.in_channels, side, side, requires_grad=True)
        out = unet(latents, torch.full((rows,), 500), encoder_hidden_states=hidden).sample
        out.square().mean().backward()
        return time.perf_counter() - started

    best = {n: float("inf") for n in {1, *sizes}}
    seconds(batch)  # warm-up
    for _ in range(repeats):
        for n in best:
            best[n] = min(best[n], seconds(n * batch))
    return {n: round(n * best[1] / best[n], 2) for n in sizes}


def solo(manifests: list[dict], root: Path) -> float:
    from personalize.job_runner import JobRunner
    from personalize.preflight import preflight
    from personalize.spec import parse_job

    started = time.monotonic()
    for m in manifests:
        job = parse_job(m)
        JobRunner(job, preflight(job, root / m["metadata"]["name"])).execute()
    return time.monotonic() - started


def packed(manifests: list[dict], root: Path) -> float:
    from personalize.packing import PackRunner

    jobs = root / "jobs"
    jobs.mkdir(parents=True)
    for m in manifests:
        (jobs / f"{m['metadata']['name']}.yaml").write_text(yaml.safe_dump(m))
    started = time.monotonic()
    PackRunner(jobs, root / "out", max_slots=len(manifests)).run()
    return time.monotonic() - started


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--methods", default="textualInversion,lora")
    parser.add_argument("--sizes", default="1,2,4,8")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--model", choices=("tiny-world", "sd15", "sdxl"), default="tiny-world")
    parser.add_argument("--size", choices=("full", "tiny"), default="full", help="sd15/sdxl: the published width or a CPU one")
    parser.add_argument("--precision", choices=("no", "bf16"), default="no")
    parser.add_argument("--batch-size", type=int, default=None, help="per concept (default 4 on the tiny world, 1 else)")
    parser.add_argument("--output", default=str(RESULTS / "packing"))
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    scratch = Path(tempfile.mkdtemp(prefix="packing-bench-"))
    sizes = [int(s) for s in args.sizes.split(",")]
    resolution = {"tiny-world": None, "sd15": 512, "sdxl": 1024}[args.model] if args.size == "full" else 64
    base = {"builtin": "tiny-world"}
    if args.model != "tiny-world":
        from random_pipelines import BUILDERS

        base = {"path": str(BUILDERS[args.model](scratch / args.model, size=args.size))}
    training = {"batchSize": args.batch_size or (4 if args.model == "tiny-world" else 1),
                "mixedPrecision": args.precision, **({"resolution": resolution} if resolution else {})}
    images = []
    for i, name in enumerate(CONCEPTS[: max(sizes)]):
        folder = scratch / "images" / name
        write_concept_images(concept_by_name(name), 8, folder, seed=i)
        images.append(folder)
    rows = []
    # what a pack gains on the model compute alone: the frozen models' own batch scaling (tiny world
    # only: the full-size architectures are measured by the packs themselves)
    ceiling = model_scaling(sizes, training["batchSize"]) if args.model == "tiny-world" else {}
    # one short run first: imports, allocator and kernel caches warm up outside the measurements
    solo([manifest("warm-up", images[0], args.methods.split(",")[0], 2, 0, base, training)], scratch / "warm-up")
    for method in args.methods.split(","):
        for n in sizes:
            manifests = [manifest(f"c{i}", images[i], method, args.steps, i, base, training) for i in range(n)]
            if torch.cuda.is_available():
                torch.cuda.reset_peak_memory_stats()
            rss_before = peak_memory_mb()
            solo_s = solo(manifests, scratch / f"{method}-{n}-solo")
            solo_peak = peak_memory_mb()
            if torch.cuda.is_available():
                torch.cuda.reset_peak_memory_stats()
            pack_s = packed(manifests, scratch / f"{method}-{n}-pack")
            concept_steps = n * args.steps
            solo_train = solo_training_seconds(scratch / f"{method}-{n}-solo", manifests)
            pack_train = json.loads((scratch / f"{method}-{n}-pack" / "out" / "pack.json").read_text())["trainingSeconds"]
            row = {"method": method, "slots": n, "conceptSteps": concept_steps,
                   "soloTrainingSeconds": round(solo_train, 2), "packTrainingSeconds": round(pack_train, 2),
                   "trainingSpeedup": round(solo_train / pack_train, 2),
                   "soloSeconds": round(solo_s, 2), "packSeconds": round(pack_s, 2),
                   "soloConceptStepsPerSecond": round(concept_steps / solo_s, 2),
                   "packConceptStepsPerSecond": round(concept_steps / pack_s, 2),
                   "speedup": round(solo_s / pack_s, 2), "soloPeakMemoryMb": round(solo_peak, 1),
                   "packPeakMemoryMb": round(peak_memory_mb(), 1), "memoryBeforeMb": round(rss_before, 1),
                   "modelScaling": ceiling.get(n)}
            rows.append(row)
            print(json.dumps(row), flush=True)
    shutil.rmtree(scratch, ignore_errors=True)
    out = Path(args.output)
    out.parent.mkdir(parents=True, exist_ok=True)
    device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu, 1 thread"
    from personalize.world.provenance import installed_world

    record = {"command": "python benchmarks/packing.py " + " ".join(argv), "device": device, "model": args.model,
              "world": installed_world() if args.model == "tiny-world" else None,
              "size": args.size, "precision": args.precision, "stepsPerConcept": args.steps, "training": training,
              "rows": rows}
    out.with_suffix(".json").write_text(json.dumps(record, indent=2) + "\n")
    memory = "peak GPU memory MB" if torch.cuda.is_available() else "peak RSS MB (process, cumulative)"
    lines = [f"# Packed against solo training ({args.model}, {args.size}, {device}, precision {args.precision})", "",
             f"`{record['command']}`: each concept trains {args.steps} steps at batch {training['batchSize']} "
             "(criterion none); solo runs one after the other, then the same concepts in one pack, side by side "
             "per row. Times include each run's setup (loading the pipeline).", "",
             "`steps only`: the same ratio over the time spent in training steps (solo: each result.json's "
             "stage seconds; pack: pack.json's trainingSeconds), without loading, joins and each concept's outputs "
             "(the convergence plot alone takes about a second per concept here).", "",
             "`model's own scaling`: N x the seconds of one text-encoder and UNet forward and backward at the "
             "concept's batch over the seconds at N times that batch, frozen tiny-world models alone, best of 5 "
             "interleaved rounds: what a pack of N gains on the model compute alone (a pack also shares the "
             "per-step work around the models, so it may gain more).", "",
             f"| method | slots | solo concept-steps/s | pack concept-steps/s | pack / solo | pack / solo, steps only | "
             f"model's own scaling | {memory}: solo | pack |",
             "|---|---|---|---|---|---|---|---|---|"]
    lines += [f"| {r['method']} | {r['slots']} | {r['soloConceptStepsPerSecond']} | {r['packConceptStepsPerSecond']} | "
              f"{r['speedup']} | {r['trainingSpeedup']} | {r['modelScaling'] if r['modelScaling'] else '-'} | "
              f"{r['soloPeakMemoryMb']} | {r['packPeakMemoryMb']} |" for r in rows]
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
