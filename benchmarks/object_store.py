"""What the object-store path costs on the tiny world, against moto's S3 server on 127.0.0.1:

1. Upload: the output folder of a tiny-world DreamBooth run (its `pipeline/` folder plus the other
   artifacts and result.json) uploaded by the trainer (`OutputUpload.upload`: sha256 of each file,
   up to 4 files at a time, the upload state after each file, result.json last) against boto3's
   `upload_file` of the same files one after the other (s3transfer's defaults: multipart above
   8 MB), each client connected beforehand; alternating, `--repeats` times, medians.
2. Resume: the same DreamBooth job with `output.uri` and `checkpointEvery`, SIGTERMed after
   `--interrupt-at` steps (its checkpoint is then local and in the store); then resumed twice with
   the real CLI: from the local checkpoint (a copy of the output folder) and from the store (an
   empty output folder and a cold image cache, as on another node). Reported: the pull time the
   trainer logs, and the seconds from process start to the first resumed step, side by side.

    python benchmarks/object_store.py [--repeats 5] [--interrupt-at 3]

Writes benchmarks/results/object_store.json and object_store.md.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests" / "trainer"))
from storage_servers import MotoS3  # noqa: E402

from personalize.world.provenance import installed_world  # noqa: E402
from personalize.world.shapes import concept_by_name, write_concept_images  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results"
STEP_LINE = re.compile(r"step\s+(\d+)/")
RESTORED = re.compile(r"checkpoint (checkpoint-\d+) restored from \S+ \(([\d.]+) s\)")


def job_config(folder: Path, bucket: str, images: Path) -> Path:
    spec = {
        "baseModel": {"builtin": "tiny-world"}, "method": "dreambooth",
        "concept": {"images": {"uri": f"s3://{bucket}/cat/"}, "classNoun": "triangle"},
        "priorPreservation": {"enabled": False},
        "training": {"maxSteps": 6, "batchSize": 2, "checkpointEvery": 2, "learningRate": 5e-4},
        "earlyStopping": {"criterion": "none", "referenceBatchSize": 2},
        "validation": {"numImagesPerPrompt": 1, "inferenceSteps": 2},
        "output": {"uri": f"s3://{bucket}/runs/cat"},
    }
    path = folder / "job.yaml"
    path.write_text(yaml.safe_dump({"apiVersion": "personalization.dvar.dev/v1alpha1", "kind": "PersonalizationJob",
                                    "metadata": {"name": "bench", "namespace": "default"}, "spec": spec}))
    return path


def run_cli(config: Path, output: Path, env: dict, sigterm_at: int | None = None) -> tuple[int, str, float | None]:
    """Run personalize-train; (exit code, output, seconds from start to the first step line)."""
    started = time.monotonic()
    proc = subprocess.Popen([sys.executable, "-m", "personalize.cli", "--config", str(config), "--output", str(output)],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    lines, first_step, sent = [], None, False
    for line in proc.stdout:
        lines.append(line)
        match = STEP_LINE.match(line)
        if match and first_step is None:
            first_step = time.monotonic() - started
        if sigterm_at is not None and not sent and match and int(match.group(1)) >= sigterm_at:
            proc.send_signal(signal.SIGTERM)
            sent = True
    return proc.wait(timeout=900), "".join(lines), first_step


def upload_side_by_side(moto: MotoS3, bucket: str, folder: Path, repeats: int) -> dict:
    from personalize.storage.locations import open_location
    from personalize.storage.uploads import STATE_FILE, OutputUpload, artifact_files

    files = artifact_files(folder)
    size = sum((folder / f).stat().st_size for f in files)
    client = moto.client()
    times = {"trainer": [], "boto3": []}
    for i in range(repeats):
        for kind in ("trainer", "boto3") if i % 2 == 0 else ("boto3", "trainer"):
            prefix = f"bench/{kind}-{uuid.uuid4().hex[:8]}"
            (folder / STATE_FILE).unlink(missing_ok=True)
            if kind == "trainer":
                upload = OutputUpload(open_location(f"s3://{bucket}/{prefix}", "output.uri"), folder, "bench")
                upload.location.fs.ls(bucket)  # the client's session is made here, as boto3's was beforehand
                started = time.perf_counter()
                upload.upload()
            else:
                started = time.perf_counter()
                for rel in files:
                    client.upload_file(str(folder / rel), bucket, f"{prefix}/{rel}")
            times[kind].append(time.perf_counter() - started)
    (folder / STATE_FILE).unlink(missing_ok=True)
    med = {k: statistics.median(v) for k, v in times.items()}
    return {"files": len(files), "bytes": size, "pipeline_files": sum(f.startswith("pipeline/") for f in files),
            "seconds": times, "median_seconds": med, "ratio_trainer_over_boto3": med["trainer"] / med["boto3"]}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--interrupt-at", type=int, default=3)
    args = parser.parse_args()

    moto = MotoS3()
    try:
        with tempfile.TemporaryDirectory() as tmp_name:
            tmp = Path(tmp_name)
            client = moto.client()
            bucket = "bench"
            client.create_bucket(Bucket=bucket)
            images = tmp / "images"
            write_concept_images(concept_by_name("red_striped_triangle"), 6, images, seed=0)
            for p in sorted(images.iterdir()):
                client.put_object(Bucket=bucket, Key=f"cat/{p.name}", Body=p.read_bytes())
            config = job_config(tmp, bucket, images)
            env = dict(os.environ, OMP_NUM_THREADS="1", **moto.env(), PJ_CACHE_DIR=str(tmp / "cache-a"),
                       AWS_EC2_METADATA_DISABLED="true")
            env.pop("PJ_NAME", None)
            env.pop("PJ_NAMESPACE", None)

            node_a = tmp / "node-a"
            code, out, _ = run_cli(config, node_a, env, sigterm_at=args.interrupt_at)
            assert code == 143, out[-3000:]
            local_copy = tmp / "node-a-again"
            shutil.copytree(node_a, local_copy)
            code, out_local, first_local = run_cli(config, local_copy, env)
            assert code == 0, out_local[-3000:]
            # The second resume must find the checkpoint in the store: the first one's success removed it.
            node_a_ckpt = next((node_a / "checkpoints").glob("checkpoint-*"))
            for p in sorted(node_a_ckpt.iterdir()):
                client.upload_file(str(p), bucket, f"runs/cat/checkpoints/{node_a_ckpt.name}/{p.name}")
            client.upload_file(str(node_a_ckpt / "manifest.json"), bucket,
                               f"runs/cat/checkpoints/{node_a_ckpt.name}/manifest.json")
            client.delete_object(Bucket=bucket, Key="runs/cat/result.json")
            env_b = dict(env, PJ_CACHE_DIR=str(tmp / "cache-b"))
            node_b = tmp / "node-b"
            code, out_store, first_store = run_cli(config, node_b, env_b)
            assert code == 0, out_store[-3000:]
            restored = RESTORED.search(out_store)
            assert restored, out_store[-3000:]
            checkpoint_bytes = sum(p.stat().st_size for p in node_a_ckpt.iterdir())
            resume = {
                "checkpoint_bytes": checkpoint_bytes,
                "pull_seconds": float(restored.group(2)),
                "first_step_seconds": {"local_checkpoint": first_local, "object_store_checkpoint": first_store},
                "ratio_store_over_local": first_store / first_local,
            }
            os.environ.update(moto.env(), AWS_EC2_METADATA_DISABLED="true")  # for the in-process uploader
            upload = upload_side_by_side(moto, bucket, node_b, args.repeats)
    finally:
        moto.close()

    result = {"world": installed_world(), "machine": {"cpus": os.cpu_count(), "python": platform.python_version()},
              "store": "moto[server] S3 on 127.0.0.1", "upload": upload, "resume": resume}
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "object_store.json").write_text(json.dumps(result, indent=2) + "\n")
    u, r = upload, resume
    (RESULTS / "object_store.md").write_text(
        "# Object store on the tiny world (moto's S3 server on 127.0.0.1)\n\n"
        f"Reproduce: `python benchmarks/object_store.py --repeats {args.repeats} --interrupt-at {args.interrupt_at}`; "
        "2 shared cores, so absolute seconds are noisy: compare the side-by-side ratios.\n\n"
        f"Upload of a DreamBooth output folder ({u['files']} files, {u['pipeline_files']} of them in `pipeline/`, "
        f"{u['bytes'] / 1e6:.1f} MB), median of {args.repeats}:\n\n"
        "| uploader | median s |\n|---|---|\n"
        f"| trainer (`OutputUpload`, s3fs) | {u['median_seconds']['trainer']:.3f} |\n"
        f"| boto3 `upload_file` per file | {u['median_seconds']['boto3']:.3f} |\n"
        f"| ratio trainer / boto3 | {u['ratio_trainer_over_boto3']:.2f} |\n\n"
        f"Resume of the DreamBooth job from a {r['checkpoint_bytes'] / 1e6:.1f} MB checkpoint: pull from the store "
        f"{r['pull_seconds']:.3f} s; process start to first resumed step "
        f"{r['first_step_seconds']['object_store_checkpoint']:.1f} s from the store (empty output folder, cold image "
        f"cache) vs {r['first_step_seconds']['local_checkpoint']:.1f} s from a local checkpoint "
        f"(ratio {r['ratio_store_over_local']:.2f}).\n"
    )
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
