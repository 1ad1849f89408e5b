"""docker/pod_runtime.py: the operator's trainer Job, turned into the OCI config crun runs, keeps
every promise the pod spec makes (user, read-only root, capabilities, volumes, command, env).

CI runs the images through this translation (docker/images.sh); if it were lax, an image that
only works as root or with a writable root would still pass there."""

from __future__ import annotations

import sys

import pytest

from pj_operator import children
from pj_operator.names import PJ_API_VERSION
from pj_operator.settings import Settings
from pj_operator.validation import validate_job

from ship_helpers import ROOT

sys.path.insert(0, str(ROOT / "docker"))
from pod_runtime import HostVolumes, ImageConfig, PodSpecError, oci_config  # noqa: E402

# What `crun spec` starts from, reduced to the parts oci_config must keep or change.
RUNTIME_DEFAULT = {
    "process": {"user": {"uid": 0, "gid": 0}, "args": ["sh"], "env": [], "cwd": "/",
                "capabilities": {"bounding": ["CAP_KILL"]}, "noNewPrivileges": True},
    "root": {"path": "rootfs", "readonly": True},
    "mounts": [{"destination": "/proc", "type": "proc", "source": "proc"},
               {"destination": "/dev/shm", "type": "tmpfs", "source": "shm", "options": ["size=65536k"]}],
    "linux": {"namespaces": [{"type": "pid"}, {"type": "network"}, {"type": "mount"}]},
}
TRAINER_IMAGE = ImageConfig(entrypoint=["personalize-train"], cmd=[], user="10001:10001", working_dir="/home/trainer",
                            env=["PATH=/usr/local/bin:/usr/bin", "HOME=/home/trainer", "PYTHONUNBUFFERED=1"])


def trainer_job() -> dict:
    settings = Settings(trainer_uid=10001)
    checked = validate_job({
        "apiVersion": PJ_API_VERSION, "kind": "PersonalizationJob",
        "metadata": {"name": "cat", "namespace": "default"},
        "spec": {"baseModel": {"builtin": "tiny-world"}, "method": "textualInversion",
                 "concept": {"images": {"claimName": "photos", "path": "cat"}, "classNoun": "cat"},
                 "output": {"claimName": "artifacts", "path": "runs/cat"}},
    }, settings)
    assert checked.ok, checked.problems
    return children.job(checked.job, "cat", "default", settings)


@pytest.fixture()
def host(tmp_path) -> HostVolumes:
    return HostVolumes(config_maps={"cat-config": tmp_path / "config"},
                       claims={"photos": tmp_path / "photos", "artifacts": tmp_path / "artifacts"},
                       termination_log=tmp_path / "termination-log")


def translate(pod: dict, container: dict, host: HostVolumes, image: ImageConfig = TRAINER_IMAGE) -> dict:
    return oci_config(RUNTIME_DEFAULT, image, pod, container, host, rootfs="/rootfs")


def test_the_trainer_job_runs_non_root_on_a_read_only_root_without_capabilities(host):
    pod = trainer_job()["spec"]["template"]["spec"]
    config = translate(pod, pod["containers"][0], host)
    process = config["process"]
    assert process["user"] == {"uid": 10001, "gid": 10001, "additionalGids": [10001]}  # fsGroup
    assert config["root"] == {"path": "/rootfs", "readonly": True}
    assert all(caps == [] for caps in process["capabilities"].values())
    assert process["noNewPrivileges"] is True
    assert {"type": "network"} not in config["linux"]["namespaces"]  # the run's shared "pod network"


def test_the_trainer_job_command_and_env_override_the_image(host):
    pod = trainer_job()["spec"]["template"]["spec"]
    container = pod["containers"][0]
    config = translate(pod, container, host)
    assert config["process"]["args"] == container["command"]
    env = dict(e.split("=", 1) for e in config["process"]["env"])
    assert env["HOME"] == "/tmp"  # the Job's value wins over the image's /home/trainer
    assert env["PATH"] == "/usr/local/bin:/usr/bin" and env["PJ_NAME"] == "cat"
    assert config["process"]["cwd"] == "/home/trainer"


def test_the_trainer_job_volumes_land_where_the_pod_mounts_them(host, tmp_path):
    pod = trainer_job()["spec"]["template"]["spec"]
    mounts = {m["destination"]: m for m in translate(pod, pod["containers"][0], host)["mounts"]}
    assert mounts["/etc/personalization"]["source"] == str(tmp_path / "config")
    assert "ro" in mounts["/etc/personalization"]["options"]
    assert mounts["/mnt/concept-images"]["source"] == str(tmp_path / "photos")
    assert "ro" in mounts["/mnt/concept-images"]["options"]
    assert mounts["/output"]["source"] == str(tmp_path / "artifacts") and "rw" in mounts["/output"]["options"]
    assert {mounts[d]["type"] for d in ("/tmp", "/cache", "/dev/shm")} == {"tmpfs"}
    assert mounts["/dev/termination-log"]["source"] == str(tmp_path / "termination-log")
    assert mounts["/proc"]["type"] == "proc"  # the runtime's own mounts stay


def test_without_a_command_the_image_entrypoint_gets_the_args(host):
    pod = {"securityContext": {"runAsNonRoot": True}}
    config = translate(pod, {"name": "cli", "args": ["--version"]}, host)
    assert config["process"]["args"] == ["personalize-train", "--version"]
    assert config["process"]["user"]["uid"] == 10001  # the image's USER
    assert config["root"]["readonly"] is False  # not asked for
    image = ImageConfig(entrypoint=["tini", "--"], cmd=["serve"], env=[], working_dir="/", user="1")
    assert translate({}, {"name": "c"}, host, image)["process"]["args"] == ["tini", "--", "serve"]


@pytest.mark.parametrize("image_user,pod_user", [("0", None), ("10001", 0), ("trainer", None)])
def test_run_as_non_root_refuses_root_or_an_unverifiable_user(host, image_user, pod_user):
    image = ImageConfig(entrypoint=["x"], cmd=[], env=[], working_dir="/", user=image_user)
    pod = {"securityContext": {"runAsNonRoot": True, **({"runAsUser": pod_user} if pod_user is not None else {})}}
    with pytest.raises(PodSpecError):
        translate(pod, {"name": "c"}, host, image)


def test_what_is_not_modelled_is_refused_rather_than_ignored(host):
    with pytest.raises(PodSpecError, match="envFrom"):
        translate({}, {"name": "c", "envFrom": [{"secretRef": {"name": "s"}}]}, host)
    pod = {"volumes": [{"name": "v", "hostPath": {"path": "/"}}]}
    with pytest.raises(PodSpecError, match="not modelled"):
        translate(pod, {"name": "c", "volumeMounts": [{"name": "v", "mountPath": "/host"}]}, host)
