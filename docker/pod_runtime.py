"""Run one container of a Kubernetes pod spec from a buildah image, the way a kubelet would.

`oci_config` is the pure part: pod spec + container + the image's config -> an OCI runtime
config (what runc reads), applying what the kubelet applies:
  command/args over the image's entrypoint/cmd; image env, then the container's env;
  runAsUser/runAsGroup (container over pod over the image's USER), fsGroup as a supplementary
  group, runAsNonRoot refused for uid 0; readOnlyRootFilesystem; capabilities dropped;
  allowPrivilegeEscalation=false -> no_new_privs; volumes: emptyDir -> tmpfs, configMap and
  persistentVolumeClaim -> host directories the caller provides, readOnly honoured; the
  termination message file bind-mounted from the host.
Not modelled (not used by our pods): subPath, valueFrom/envFrom, projected volumes, probes.

`PodContainer` runs it with runc on a fresh buildah container's root filesystem. No network
namespace of its own: containers share the caller's, the "pod network" of the run.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Optional

DEFAULT_TERMINATION_MESSAGE_PATH = "/dev/termination-log"
DEFAULT_CAPABILITIES = ["CAP_CHOWN", "CAP_DAC_OVERRIDE", "CAP_FOWNER", "CAP_FSETID", "CAP_KILL", "CAP_SETGID",
                        "CAP_SETUID", "CAP_SETPCAP", "CAP_NET_BIND_SERVICE", "CAP_SYS_CHROOT", "CAP_MKNOD",
                        "CAP_AUDIT_WRITE", "CAP_SETFCAP"]  # a container runtime's default set


# The OCI runtime. runc, not crun: crun 1.8 refuses to start on hosts whose cgroup v2 hierarchy
# has controllers next to v1 ("hybrid mode"), as CI machines like this one do.
RUNTIME = "runc"


class PodSpecError(ValueError):
    """What a kubelet would refuse to start (e.g. runAsNonRoot with uid 0)."""


@dataclass(frozen=True)
class ImageConfig:
    entrypoint: list[str]
    cmd: list[str]
    env: list[str]
    working_dir: str
    user: str

    @classmethod
    def of(cls, image: str) -> "ImageConfig":
        out = subprocess.run(["buildah", "inspect", "--type", "image", image], capture_output=True, text=True,
                             check=True).stdout
        config = json.loads(out)["OCIv1"].get("config") or {}
        return cls(entrypoint=config.get("Entrypoint") or [], cmd=config.get("Cmd") or [],
                   env=config.get("Env") or [], working_dir=config.get("WorkingDir") or "/",
                   user=config.get("User") or "0")


@dataclass(frozen=True)
class HostVolumes:
    """Where the host keeps what a cluster would provide: ConfigMap contents, claims' volumes."""
    config_maps: Mapping[str, Path]  # ConfigMap name -> directory with one file per key
    claims: Mapping[str, Path]  # PersistentVolumeClaim name -> directory
    termination_log: Path  # the file behind the container's terminationMessagePath


def _image_user(user: str) -> tuple[Optional[int], Optional[int]]:
    name, _, group = user.partition(":")
    as_int = lambda s: int(s) if s.isdigit() else None  # noqa: E731  (a name would need /etc/passwd)
    return as_int(name), as_int(group) if group else None


def _security(pod_spec: Mapping[str, Any], container: Mapping[str, Any], image: ImageConfig) -> dict[str, Any]:
    pod_ctx = pod_spec.get("securityContext") or {}
    ctx = container.get("securityContext") or {}
    image_uid, image_gid = _image_user(image.user)
    uid = ctx.get("runAsUser", pod_ctx.get("runAsUser", image_uid))
    gid = ctx.get("runAsGroup", pod_ctx.get("runAsGroup", image_gid if image_gid is not None else 0))
    if ctx.get("runAsNonRoot", pod_ctx.get("runAsNonRoot")):
        if uid is None:
            raise PodSpecError(f"runAsNonRoot and the image's user {image.user!r} is not numeric")
        if uid == 0:
            raise PodSpecError("runAsNonRoot and the container would run as uid 0")
    uid = 0 if uid is None else uid
    groups = [g for g in [pod_ctx.get("fsGroup"), *pod_ctx.get("supplementalGroups", [])] if g is not None]
    drop = (ctx.get("capabilities") or {}).get("drop") or []
    add = (ctx.get("capabilities") or {}).get("add") or []
    caps = [] if "ALL" in drop else [c for c in DEFAULT_CAPABILITIES if c.removeprefix("CAP_") not in drop]
    caps += [f"CAP_{c}" for c in add if f"CAP_{c}" not in caps]
    return {
        "user": {"uid": uid, "gid": gid, "additionalGids": groups},
        "capabilities": {key: list(caps) for key in ("bounding", "effective", "permitted")},
        "noNewPrivileges": ctx.get("allowPrivilegeEscalation", True) is False,
        "readonly": bool(ctx.get("readOnlyRootFilesystem")),
    }


def _mounts(pod_spec: Mapping[str, Any], container: Mapping[str, Any], host: HostVolumes) -> list[dict[str, Any]]:
    volumes = {v["name"]: v for v in pod_spec.get("volumes") or []}
    mounts = []
    for mount in container.get("volumeMounts") or []:
        volume = volumes[mount["name"]]
        if "subPath" in mount:
            raise PodSpecError("subPath is not modelled")
        read_only = ["ro"] if mount.get("readOnly") else ["rw"]
        if "emptyDir" in volume:
            mounts.append({"destination": mount["mountPath"], "type": "tmpfs", "source": "tmpfs",
                           "options": ["nosuid", "nodev", "mode=1777", *read_only]})
            continue
        if "configMap" in volume:
            source = host.config_maps[volume["configMap"]["name"]]
            read_only = ["ro"]  # the kubelet always mounts ConfigMaps read-only
        elif "persistentVolumeClaim" in volume:
            source = host.claims[volume["persistentVolumeClaim"]["claimName"]]
        else:
            raise PodSpecError(f"volume {mount['name']!r}: kind not modelled: {sorted(volume)}")
        mounts.append({"destination": mount["mountPath"], "type": "bind", "source": str(source),
                       "options": ["rbind", *read_only]})
    termination_path = container.get("terminationMessagePath", DEFAULT_TERMINATION_MESSAGE_PATH)
    mounts.append({"destination": termination_path, "type": "bind", "source": str(host.termination_log),
                   "options": ["bind", "rw"]})
    return mounts


def oci_config(base: dict[str, Any], image: ImageConfig, pod_spec: Mapping[str, Any], container: Mapping[str, Any],
               host: HostVolumes, rootfs: str, hostname: str = "pod") -> dict[str, Any]:
    """`base`: the runtime's default config (`runc spec`), whose /proc, /dev, masked paths etc. stay."""
    if any("valueFrom" in e for e in container.get("env") or []) or container.get("envFrom"):
        raise PodSpecError("valueFrom/envFrom are not modelled")
    config = json.loads(json.dumps(base))
    if "command" in container:
        args = list(container["command"]) + list(container.get("args") or [])
    else:
        args = list(image.entrypoint) + list(container.get("args") if "args" in container else image.cmd)
    env = dict(e.split("=", 1) for e in image.env)
    env.update({e["name"]: e["value"] for e in container.get("env") or []})
    security = _security(pod_spec, container, image)
    process = config["process"]
    process.update({
        "terminal": False,
        "args": args,
        "env": [f"{k}={v}" for k, v in env.items()],
        "cwd": container.get("workingDir") or image.working_dir,
        "user": security["user"],
        "capabilities": security["capabilities"],
        "noNewPrivileges": security["noNewPrivileges"],
    })
    config["root"] = {"path": rootfs, "readonly": security["readonly"]}
    config["hostname"] = hostname
    config["mounts"] = [m for m in config["mounts"] if m["destination"] != "/dev/shm"] + _mounts(pod_spec, container, host)
    if not any(m["destination"] == "/dev/shm" for m in config["mounts"]):
        config["mounts"].append({"destination": "/dev/shm", "type": "tmpfs", "source": "shm",
                                 "options": ["nosuid", "noexec", "nodev", "mode=1777", "size=65536k"]})
    linux = config.setdefault("linux", {})
    linux["namespaces"] = [ns for ns in linux.get("namespaces", []) if ns["type"] not in ("network", "user", "cgroup")]
    linux.pop("uidMappings", None)
    linux.pop("gidMappings", None)
    return config


class PodContainer:
    """One container run: `start()`, then `wait()` or `stop()`; always `remove()` (or use `with`)."""

    def __init__(self, image: str, pod_spec: Mapping[str, Any], container: Mapping[str, Any], host: HostVolumes,
                 work: Path, name: str):
        self.image, self.pod_spec, self.container, self.host = image, pod_spec, container, host
        self.id = f"pj-ci-{name}-{uuid.uuid4().hex[:8]}"
        self.bundle = work / self.id
        self.log_path = work / f"{name}.log"
        self._buildah_container: Optional[str] = None
        self._process: Optional[subprocess.Popen] = None
        self._log = None

    def start(self) -> "PodContainer":
        image = ImageConfig.of(self.image)
        self._buildah_container = subprocess.run(["buildah", "from", "--pull-never", "--name", self.id, self.image],
                                                 capture_output=True, text=True, check=True).stdout.strip()
        rootfs = subprocess.run(["buildah", "mount", self._buildah_container], capture_output=True, text=True,
                                check=True).stdout.strip()
        self.bundle.mkdir(parents=True)
        subprocess.run([RUNTIME, "spec"], cwd=self.bundle, capture_output=True, check=True)
        base = json.loads((self.bundle / "config.json").read_text())
        config = oci_config(base, image, self.pod_spec, self.container, self.host, rootfs,
                            hostname=self.container.get("name", "pod"))
        self.host.termination_log.touch()
        self.host.termination_log.chmod(0o666)  # as the kubelet leaves it, so non-root containers can write it
        (self.bundle / "config.json").write_text(json.dumps(config, indent=1))
        self._log = self.log_path.open("wb")
        self._process = subprocess.Popen([RUNTIME, "run", "--bundle", str(self.bundle), self.id],
                                         stdin=subprocess.DEVNULL, stdout=self._log, stderr=subprocess.STDOUT)
        return self

    def wait(self, timeout: Optional[float] = None) -> int:
        assert self._process is not None
        return self._process.wait(timeout)

    def running(self) -> bool:
        return self._process is not None and self._process.poll() is None

    def stop(self, timeout: float = 60) -> int:
        """SIGTERM, as the kubelet sends at deletion; SIGKILL after `timeout` (the grace period)."""
        assert self._process is not None
        if self.running():
            subprocess.run([RUNTIME, "kill", self.id, "TERM"], capture_output=True)
            try:
                return self._process.wait(timeout)
            except subprocess.TimeoutExpired:
                subprocess.run([RUNTIME, "kill", self.id, "KILL"], capture_output=True)
        return self._process.wait(30)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def termination_message(self) -> str:
        return self.host.termination_log.read_text() if self.host.termination_log.exists() else ""

    def remove(self) -> None:
        if self._process is not None and self.running():
            self.stop(timeout=10)
        subprocess.run([RUNTIME, "delete", "--force", self.id], capture_output=True)
        if self._log is not None:
            self._log.close()
        if self._buildah_container:
            subprocess.run(["buildah", "rm", self._buildah_container], capture_output=True)
        shutil.rmtree(self.bundle, ignore_errors=True)

    def __enter__(self) -> "PodContainer":
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.remove()
