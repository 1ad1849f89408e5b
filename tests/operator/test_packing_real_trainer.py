"""The operator's pack against the real trainer on the tiny world: the pack Job's own command line,
run on the pack's ConfigMap as a kubelet would mount it, patches each member's status on the fake
API server, and the operator finishes each member from its own report."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

from fake_cluster import condition, pj_manifest, status_of, wait_for
from pj_operator import lifecycle

CONCEPTS = {"tri": "red_striped_triangle", "star": "blue_dotted_star"}


def tiny_job(name: str, images: Path) -> dict:
    return pj_manifest(
        name,
        concept={"images": {"path": str(images)}, "classNoun": "shape", "token": f"<{name}>"},
        training={"maxSteps": 6, "batchSize": 1, "learningRate": 1e-2},
        earlyStopping={"window": 4, "referenceBatchSize": 2},
        validation={"prompts": []},
        output={"path": f"runs/{name}"},
    )


def as_mounted(config: dict, folder: Path) -> Path:
    """The ConfigMap as the kubelet shows it in the pod: one file per key."""
    folder.mkdir()
    for key, text in config["data"].items():
        (folder / key).write_text(text)
    return folder


def with_value(command: list[str], flag: str, value: str) -> list[str]:
    out = list(command)
    out[out.index(flag) + 1] = value
    return out


def test_the_real_pack_trainer_runs_the_operators_pack_and_each_member_ends_on_its_own_report(
        cluster, run_operator, tmp_path):
    from personalize.world import concept_by_name, write_concept_images

    images = {}
    for name, concept in CONCEPTS.items():
        images[name] = tmp_path / "images" / name
        write_concept_images(concept_by_name(concept), 4, images[name], seed=len(images))
    with run_operator(PJ_PACKING_ENABLED="true", PJ_MAX_CONCURRENT_JOBS="0", PJ_PACKING_MAX_SLOTS="2"):
        for name in CONCEPTS:
            cluster.create(tiny_job(name, images[name]))
        wait_for(lambda: cluster.creations("jobs"), what="the pack's Job (full: at once)")
        pack = cluster.pack_of("tri")
        assert cluster.pack_of("star") == pack
        cluster.start_pod(pack)
        cluster.pod_running(pack)
        wait_for(lambda: all(status_of(cluster, n).get("phase") == "Running" for n in CONCEPTS))

        container = cluster.job(pack)["spec"]["template"]["spec"]["containers"][0]
        command = container["command"]
        jobs = as_mounted(cluster.get("v1", "ConfigMap", "default", f"{pack}-config"), tmp_path / "jobs")
        out = tmp_path / "out"
        command = with_value(command, "--jobs", str(jobs))
        command = with_value(command, "--output", str(out))
        command = with_value(command, "--idle-exit", "0")  # the test stands in for the idle wait
        command = with_value(command, "--metrics-port", "0")
        assert command[:2] == ["personalize-train", "pack"]
        trainer = shutil.which("personalize-train", path=str(Path(sys.executable).parent))
        env = {**os.environ, "PJ_NAMESPACE": "default", "OMP_NUM_THREADS": "1"}
        env.update({e["name"]: e["value"] for e in container["env"] if e["name"] in ("PJ_NAMESPACE",)})
        done = subprocess.run([trainer, *command[1:]], env=env, capture_output=True, text=True, timeout=600)
        assert done.returncode == 0, done.stderr[-3000:]

        for name in CONCEPTS:
            status = wait_for(lambda: status_of(cluster, name).get("phase") == "Succeeded" and status_of(cluster, name),
                              what=f"{name} Succeeded from its own report", timeout=60)
            assert condition(status, "Succeeded")["reason"] in (lifecycle.EARLY_STOPPED, lifecycle.MAX_STEPS)
            assert status["pack"]["job"] == pack and status["progress"]["step"] >= 1
            result = json.loads((out / name / "result.json").read_text())
            assert result["earlyStop"]["reason"] == status["earlyStop"]["reason"]
        record = json.loads((out / "pack.json").read_text())
        assert {slot["name"]: slot["phase"] for slot in record["slots"]} == {n: "Succeeded" for n in CONCEPTS}
        assert record["maxSlots"] == 2  # the operator's PJ_PACKING_MAX_SLOTS reached the trainer
        cluster.job_succeeded(pack)
