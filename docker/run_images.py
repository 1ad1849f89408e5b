"""Run the two built images as a cluster would, and check what they do (called by docker/images.sh).

1. Both CLIs in their images: `--help` (usage, exit 0), `--version`; the operator with no
   cluster: one `error:` line, exit 2.
2. The operator image, as the Helm chart's Deployment runs it (its env, non-root, read-only root,
   /tmp emptyDir), against the test suite's strict fake API server, reached over a kubeconfig
   mounted into the container (it stands in for the service account token: the fake server
   speaks plain HTTP). A PersonalizationJob is created; the operator must create its ConfigMap,
   ServiceAccount, Role, RoleBinding and Job and report a phase.
3. The trainer image, as the pod of that Job (its command, env, uid, read-only root, the
   ConfigMap at /etc/personalization/job.yaml, the output claim at /output, the concept claim
   read-only), on one tiny-world Textual Inversion job; the same kubeconfig lets it patch the
   resource's status (and OMP_NUM_THREADS=1 is added: CI's cores are shared). Exit code 0,
   result.json, the artifact and the termination message are checked.
4. This script plays the Job controller and kubelet around it (pod running, Job complete with the
   trainer's termination message); the operator must report Succeeded with the trainer's
   early-stop decision, and stop cleanly on SIGTERM. No request may break the API's schemas.

Runs inside a network namespace of its own (docker/images.sh): every container shares it.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import sys
import time
from pathlib import Path
from typing import Any, Callable

import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / "tests" / "operator"), str(ROOT / "tests" / "ship")]

from fake_cluster import FakeCluster, WaitTimeout  # noqa: E402  (the test suite's fake API server)
from pod_runtime import HostVolumes, PodContainer  # noqa: E402
from ship_helpers import by_kind, manifests, render  # noqa: E402

import personalize  # noqa: E402
from personalize.world.shapes import concept_by_name, write_concept_images  # noqa: E402
from pj_operator import names  # noqa: E402

TRAINER_UID = 10001  # the trainer image's user, and the chart's operator.trainerUID
PJ_NAME = "image-smoke"
NAMESPACE = "default"
CONCEPT = "red_striped_triangle"
# Container start-up and the trainer's run on a shared 2-core machine: generous, not a timing test.
STARTUP_TIMEOUT = 300
TRAINER_TIMEOUT = 1800


class CheckFailed(Exception):
    pass


def say(message: str) -> None:
    print(f"[images] {message}", flush=True)


def check(condition: Any, message: str) -> None:
    if not condition:
        raise CheckFailed(message)


def wait_for(predicate: Callable[[], Any], what: str, timeout: float = STARTUP_TIMEOUT,
             alive: PodContainer | None = None) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if alive is not None and not alive.running():
            raise CheckFailed(f"waiting for {what}: the container exited; its log:\n{alive.log()[-3000:]}")
        if time.monotonic() > deadline:
            raise CheckFailed(f"timed out waiting for {what}")
        time.sleep(0.2)


# ---- 1. the CLIs -----------------------------------------------------------------------------


def run_cli(image: str, args: list[str], work: Path, name: str) -> tuple[int, str]:
    """The image's entrypoint with `args`, as its own user, read-only root, no cluster."""
    pod = {"securityContext": {"runAsNonRoot": True}, "volumes": [{"name": "tmp", "emptyDir": {}}]}
    container = {"name": name, "args": args, "env": [{"name": "HOME", "value": "/tmp"}],
                 "securityContext": {"readOnlyRootFilesystem": True, "allowPrivilegeEscalation": False,
                                     "capabilities": {"drop": ["ALL"]}},
                 "volumeMounts": [{"name": "tmp", "mountPath": "/tmp"}]}
    host = HostVolumes(config_maps={}, claims={}, termination_log=work / f"{name}.termination-log")
    with PodContainer(image, pod, container, host, work, name) as run:
        code = run.wait(STARTUP_TIMEOUT)
        return code, run.log()


def check_clis(operator_image: str, trainer_image: str, work: Path) -> None:
    version = personalize.version()
    for image, prog in ((operator_image, "personalization-operator"), (trainer_image, "personalize-train")):
        code, out = run_cli(image, ["--help"], work, f"{prog}-help")
        check(code == 0 and f"usage: {prog}" in out, f"{prog} --help: exit {code}, output:\n{out}")
        code, out = run_cli(image, ["--version"], work, f"{prog}-version")
        check(code == 0 and out.strip() == f"{prog} {version}", f"{prog} --version: exit {code}, output:\n{out}")
    code, out = run_cli(trainer_image, ["pack", "--help"], work, "personalize-train-pack-help")
    check(code == 0 and "--jobs" in out, f"personalize-train pack --help: exit {code}, output:\n{out}")
    code, out = run_cli(operator_image, [], work, "operator-no-cluster")
    lines = out.strip().splitlines()
    check(code == 2 and len(lines) == 1 and lines[0].startswith("error: no Kubernetes cluster"),
          f"personalization-operator without a cluster: exit {code}, output:\n{out}")
    say(f"CLIs: --help and --version ({version}) in both images, pack --help in the trainer's; the operator without a cluster: "
        f"exit {code}, {lines[0]!r}")


# ---- 2. the operator, as the chart deploys it ---------------------------------------------------


def chart_operator_pod(operator_image: str, trainer_image: str) -> tuple[dict, dict]:
    """(pod spec, operator container) of the chart's Deployment, for our two images."""
    repository, _, tag = operator_image.rpartition(":")
    trainer_repository, _, trainer_tag = trainer_image.rpartition(":")
    values = {
        "image": {"operator": {"repository": repository, "tag": tag},
                  "trainer": {"repository": trainer_repository, "tag": trainer_tag}},
        # No scrape will come: the trainer need not keep /metrics up after it finished.
        "operator": {"trainerMetricsLingerSeconds": 0},
    }
    (deployment,) = [d for d in by_kind(manifests(render(values)), "Deployment")
                     if d["spec"]["template"]["spec"]["containers"][0]["name"] == "operator"]
    pod = deployment["spec"]["template"]["spec"]
    return pod, pod["containers"][0]


def with_kubeconfig(pod: dict, container: dict, kube_dir: Path) -> tuple[dict, dict]:
    """The pod with the kubeconfig mounted (read-only) in place of the service account token."""
    pod, container = copy.deepcopy(pod), copy.deepcopy(container)
    pod.setdefault("volumes", []).append({"name": "kubeconfig", "persistentVolumeClaim": {"claimName": "kubeconfig"}})
    container.setdefault("volumeMounts", []).append(
        {"name": "kubeconfig", "mountPath": "/var/run/kubeconfig", "readOnly": True})
    container.setdefault("env", []).append({"name": "KUBECONFIG", "value": "/var/run/kubeconfig/config"})
    return pod, container


def pj_manifest() -> dict:
    """The README demo's job (demo/job.yaml), with its photos and output on claims, as in a cluster."""
    manifest = yaml.safe_load((ROOT / "demo" / "job.yaml").read_text())
    manifest["metadata"] = {"name": PJ_NAME, "namespace": NAMESPACE}
    manifest["spec"]["concept"]["images"] = {"claimName": "concept-images", "path": CONCEPT}
    manifest["spec"]["output"] = {"claimName": "artifacts", "path": f"runs/{PJ_NAME}"}
    # The job's own Job, ConfigMap and pod: the road this smoke walks. A packable job would go to a
    # pack Job by default (the chart enables packing); the pack command's --help is checked above,
    # packed training itself by tests/trainer/test_packed_training.py.
    manifest["spec"]["packing"] = "never"
    return manifest


def phase(cluster: FakeCluster) -> str | None:
    return ((cluster.pj(PJ_NAME) or {}).get("status") or {}).get("phase")


def run(args: argparse.Namespace) -> None:
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    check_clis(args.operator_image, args.trainer_image, work)

    # The cluster's storage: the concept photos, an output claim writable by the pod's fsGroup.
    claims = {name: work / "claims" / name for name in ("concept-images", "artifacts", "kubeconfig")}
    for path in claims.values():
        path.mkdir(parents=True, exist_ok=True)
    write_concept_images(concept_by_name(CONCEPT), 8, claims["concept-images"] / CONCEPT, seed=0)
    os.chown(claims["artifacts"], 0, TRAINER_UID)
    claims["artifacts"].chmod(0o2775)  # what the kubelet does for fsGroup

    cluster = FakeCluster().start()
    try:
        cluster.write_kubeconfig(claims["kubeconfig"] / "config")
        claims["kubeconfig"].joinpath("config").chmod(0o644)
        pod, container = with_kubeconfig(*chart_operator_pod(args.operator_image, args.trainer_image),
                                         claims["kubeconfig"])
        operator_host = HostVolumes(config_maps={}, claims=claims, termination_log=work / "operator.termination-log")
        with PodContainer(args.operator_image, pod, container, operator_host, work, "operator") as operator:
            wait_for(lambda: cluster.watching("personalizationjobs") and cluster.watching("jobs"),
                     "the operator's watch requests", alive=operator)
            say("operator image: running as the chart's Deployment (uid "
                f"{pod['securityContext']['runAsUser']}, read-only root), watching the fake API server")
            cluster.create(pj_manifest())
            job = check_children(cluster, operator)
            result = run_trainer(cluster, job, claims, work, args.trainer_image)
            check_succeeded(cluster, operator, result)
            code = operator.stop(timeout=60)
            check(code == 0, f"the operator exited {code} on SIGTERM; its log:\n{operator.log()[-3000:]}")
            say("operator image: stopped cleanly on SIGTERM (exit 0)")
        check(cluster.violations == [], "requests the API server would have rejected:\n" + "\n".join(cluster.violations))
    finally:
        cluster.stop()


def check_children(cluster: FakeCluster, operator: PodContainer) -> dict:
    children = {
        "ConfigMap": ("v1", names.config_map_name(PJ_NAME)),
        "ServiceAccount": ("v1", names.trainer_account_name(PJ_NAME)),
        "Role": ("rbac.authorization.k8s.io/v1", names.trainer_account_name(PJ_NAME)),
        "RoleBinding": ("rbac.authorization.k8s.io/v1", names.trainer_account_name(PJ_NAME)),
        "Job": ("batch/v1", names.job_name(PJ_NAME)),
    }
    for kind, (api_version, name) in children.items():
        wait_for(lambda: cluster.get(api_version, kind, NAMESPACE, name), f"the {kind} {name}", alive=operator)
    first_phase = wait_for(lambda: phase(cluster), "a phase in the status", alive=operator)
    say(f"operator image: created {', '.join(children)}; phase {first_phase}")
    return cluster.job(names.job_name(PJ_NAME))


# ---- 3. the trainer, as the Job's pod ----------------------------------------------------------


def run_trainer(cluster: FakeCluster, job: dict, claims: dict[str, Path], work: Path, trainer_image: str) -> dict:
    pod = job["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    check(container["image"] == trainer_image, f"the Job runs {container['image']}, not {trainer_image}")
    config_map = cluster.get("v1", "ConfigMap", NAMESPACE, names.config_map_name(PJ_NAME))
    config_dir = work / "config-maps" / config_map["metadata"]["name"]
    config_dir.mkdir(parents=True, exist_ok=True)
    for key, text in config_map["data"].items():
        (config_dir / key).write_text(text)
    pod, container = with_kubeconfig(pod, container, claims["kubeconfig"])
    # One torch thread: on CI's 2 shared cores, two threads spinning at each barrier make every
    # step several times slower (the test suite runs one thread for the same reason). A node
    # would give the pod the CPUs it requests.
    container["env"].append({"name": "OMP_NUM_THREADS", "value": "1"})
    host = HostVolumes(config_maps={config_map["metadata"]["name"]: config_dir}, claims=claims,
                       termination_log=work / "trainer.termination-log")
    cluster.start_pod(names.job_name(PJ_NAME))
    start = time.monotonic()
    with PodContainer(trainer_image, pod, container, host, work, "trainer") as trainer:
        cluster.pod_running(names.job_name(PJ_NAME))
        wait_for(lambda: phase(cluster) == "Running", "phase Running", alive=trainer)
        code = trainer.wait(TRAINER_TIMEOUT)
        seconds = time.monotonic() - start
        check(code == 0, f"the trainer exited {code}; its log:\n{trainer.log()[-4000:]}")
        message = trainer.termination_message()
    output = claims["artifacts"] / "runs" / PJ_NAME
    result = json.loads((output / "result.json").read_text())
    stop = result["earlyStop"]
    check(stop["reason"] == "ConvergenceThreshold", f"the trainer did not stop by convergence: {stop}")
    check((output / "learned_embeds.safetensors").exists(), "no learned_embeds.safetensors in the output")
    check(message.strip(), "the trainer wrote no termination message")
    check(json.loads(message).get("earlyStop") == stop, f"termination message differs from result.json: {message!r}")
    say(f"job in the trainer image: {stop['reason']} at step {stop['step']} of {result['progress']['maxSteps']}, "
        f"exit 0, uid {pod['securityContext']['runAsUser']}, read-only root, config at "
        f"{container['command'][2]}, output on the claim ({seconds:.0f} s)")
    cluster.job_succeeded(names.job_name(PJ_NAME), termination_message=message)
    return result


def check_succeeded(cluster: FakeCluster, operator: PodContainer, result: dict) -> None:
    wait_for(lambda: phase(cluster) == "Succeeded", "phase Succeeded", alive=operator)
    status = cluster.pj(PJ_NAME)["status"]
    check(status["earlyStop"]["step"] == result["earlyStop"]["step"],
          f"status earlyStop {status['earlyStop']} differs from result.json {result['earlyStop']}")
    say(f"operator image: phase Succeeded, earlyStop step {status['earlyStop']['step']} in the status")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--operator-image", required=True)
    parser.add_argument("--trainer-image", required=True)
    parser.add_argument("--work", required=True, help="directory for logs, claims and bundles")
    args = parser.parse_args()
    try:
        run(args)
    except (CheckFailed, WaitTimeout) as err:
        say(f"FAILED: {err}")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
