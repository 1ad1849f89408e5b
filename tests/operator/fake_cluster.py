"""A fake cluster for operator tests: the strict kmock server in its own thread and event loop,
plus the parts of Kubernetes a test must play explicitly: the Job controller, the kubelet, the
garbage collector, the trainer writing its status, and a user creating resources.

Everything the test does goes through HTTP like any client, so kopf sees watch events for it.
"""

from __future__ import annotations

import asyncio
import collections
import datetime
import threading
import time
import uuid
from pathlib import Path
from typing import Any, Callable, Optional

import kmock
import kubernetes
import yaml

from pj_operator.kube import Kube
from pj_operator.names import PJ_API_VERSION

from fake_apiserver import StrictApiServer

PJ = (PJ_API_VERSION, "PersonalizationJob")
HARNESS_USER_AGENT = "fake-cluster-harness"


def now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


class WaitTimeout(AssertionError):
    pass


def wait_for(predicate: Callable[[], Any], timeout: float = 20.0, what: str = "condition") -> Any:
    """Poll until predicate() is truthy (returns it). Generous timeout: this is not a timing test."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise WaitTimeout(f"timed out waiting for {what}")
        time.sleep(0.05)


class FakeCluster:
    def __init__(self) -> None:
        self._loop = asyncio.new_event_loop()
        self._ready = threading.Event()
        self._stop: Optional[asyncio.Event] = None
        self._thread = threading.Thread(target=self._run, name="kmock", daemon=True)
        self.server: Optional[StrictApiServer] = None
        self.url = ""

    # ---- lifecycle of the fake API server ---------------------------------------------------

    def _run(self) -> None:
        asyncio.set_event_loop(self._loop)
        self._loop.run_until_complete(self._serve())

    async def _serve(self) -> None:
        self._stop = asyncio.Event()
        async with StrictApiServer() as server, kmock.Server(server) as http:
            self.server = server
            self.url = str(http.url).rstrip("/")
            self._ready.set()
            await self._stop.wait()

    def start(self) -> "FakeCluster":
        self._thread.start()
        self._ready.wait(10)
        configuration = kubernetes.client.Configuration()
        configuration.host = self.url
        client = kubernetes.client.ApiClient(configuration)
        client.user_agent = HARNESS_USER_AGENT  # tells the test's own requests from the operator's
        self.kube = Kube(client)
        return self

    def stop(self) -> None:
        self.kube.close()
        if self._stop is not None:
            self._loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(10)

    def write_kubeconfig(self, path: Path) -> Path:
        path.write_text(yaml.safe_dump({
            "apiVersion": "v1", "kind": "Config", "current-context": "kmock",
            "clusters": [{"name": "kmock", "cluster": {"server": self.url}}],
            "users": [{"name": "test", "user": {"token": "test-token"}}],
            "contexts": [{"name": "kmock", "context": {"cluster": "kmock", "user": "test", "namespace": "default"}}],
        }))
        return path

    def server_cpu_seconds(self) -> float:
        """CPU time used so far by the fake API server's thread (its event loop)."""

        async def cpu() -> float:
            return time.thread_time()

        return asyncio.run_coroutine_threadsafe(cpu(), self._loop).result(10)

    # ---- what the server saw -----------------------------------------------------------------

    @property
    def requests(self) -> list[kmock.Request]:
        return self.server.all_requests

    @property
    def violations(self) -> list[str]:
        return list(self.server.violations)

    def watching(self, plural: str, since: int = 0) -> bool:
        return any(r.action == kmock.action.WATCH and r.resource is not None and r.resource.plural == plural
                   for r in self.requests[since:])

    def operator_requests(self, since: int = 0) -> list[kmock.Request]:
        """Requests not sent by this harness (nor by kmock's own client): the operator's."""
        return [r for r in self.requests[since:]
                if r.headers.get("User-Agent", "") != HARNESS_USER_AGENT
                and not r.headers.get("User-Agent", "").startswith("kmock/")]

    def requests_by_verb(self, requests: list[kmock.Request]) -> dict[str, int]:
        """Counts by Kubernetes verb and resource, e.g. {'create jobs': 1, 'patch personalizationjobs/status': 3}."""
        counts: collections.Counter = collections.Counter()
        for r in requests:
            if r.action is None or r.resource is None:
                counts[f"{r.method.value.lower()} (discovery)"] += 1
                continue
            verb = {"FETCH": "get", "UPDATE": "patch"}.get(r.action.name, r.action.name.lower())
            target = (r.resource.plural or "?") + (f"/{r.subresource}" if r.subresource else "")
            counts[f"{verb} {target}"] += 1
        return dict(sorted(counts.items()))

    def creations(self, plural: str) -> list[kmock.Request]:
        return [r for r in self.requests
                if r.action == kmock.action.CREATE and r.resource is not None and r.resource.plural == plural]

    # ---- reading and writing like a client ---------------------------------------------------

    def get(self, api_version: str, kind: str, namespace: Optional[str], name: str) -> Optional[dict]:
        return self.kube.get(api_version, kind, namespace, name)

    def pj(self, name: str, namespace: str = "default") -> Optional[dict]:
        return self.kube.get(*PJ, namespace, name)

    def list(self, api_version: str, kind: str, namespace: Optional[str] = None) -> list[dict]:
        return self.kube.list(api_version, kind, namespace)

    def create(self, obj: dict) -> dict:
        return self.kube.create(obj)

    def patch_status(self, api_version: str, kind: str, namespace: str, name: str, status: dict) -> dict:
        return self.kube.patch(api_version, kind, namespace, name, {"status": status}, subresource="status")

    def delete(self, api_version: str, kind: str, namespace: Optional[str], name: str) -> bool:
        return self.kube.delete(api_version, kind, namespace, name)

    # ---- the garbage collector (asynchronous, in the fake API server) ---------------------------

    def pause_gc(self) -> None:
        """Hold the garbage collector: dependents of deleted owners stay until `resume_gc`."""
        self._loop.call_soon_threadsafe(setattr, self.server, "gc_paused", True)

    def resume_gc(self) -> None:
        self._loop.call_soon_threadsafe(self.server.resume_gc)

    # ---- the Job controller and the kubelet ----------------------------------------------------

    def job(self, name: str, namespace: str = "default") -> Optional[dict]:
        return self.get("batch/v1", "Job", namespace, name)

    def start_pod(self, job_name: str, namespace: str = "default", attempt: int = 0) -> dict:
        """The Job controller creates a pod from the template (the kubelet has not started it)."""
        job = self.job(job_name, namespace)
        template = job["spec"]["template"]
        labels = dict((template.get("metadata") or {}).get("labels") or {}, **{"batch.kubernetes.io/job-name": job_name,
                                                          "job-name": job_name})
        pod = {
            "apiVersion": "v1", "kind": "Pod",
            "metadata": {
                "name": f"{job_name}-{attempt}", "namespace": namespace, "labels": labels,
                "ownerReferences": [{"apiVersion": "batch/v1", "kind": "Job", "name": job_name,
                                     "uid": job["metadata"]["uid"], "controller": True}],
            },
            "spec": template["spec"],
            "status": {"phase": "Pending"},
        }
        self.create(pod)
        failed = (job.get("status") or {}).get("failed", 0)
        self.patch_status("batch/v1", "Job", namespace, job_name,
                          {"active": 1, "ready": 0, "failed": failed or None, "startTime": job.get("status", {}).get("startTime") or now()})
        return pod

    def pod_running(self, job_name: str, namespace: str = "default", attempt: int = 0) -> None:
        self.patch_status("v1", "Pod", namespace, f"{job_name}-{attempt}", {
            "phase": "Running",
            "containerStatuses": [{"name": "trainer", "image": "trainer", "imageID": "", "ready": True,
                                   "restartCount": 0, "state": {"running": {"startedAt": now()}}}],
        })
        self.patch_status("batch/v1", "Job", "default" if namespace is None else namespace, job_name,
                          {"active": 1, "ready": 1})

    def pod_waiting(self, job_name: str, reason: str, message: str, namespace: str = "default",
                    attempt: int = 0) -> None:
        """The kubelet cannot start the container: CreateContainerConfigError, ImagePullBackOff..."""
        self.patch_status("v1", "Pod", namespace, f"{job_name}-{attempt}", {
            "phase": "Pending",
            "containerStatuses": [{"name": "trainer", "image": "registry.invalid/trainer:nope", "imageID": "",
                                   "ready": False, "restartCount": 0,
                                   "state": {"waiting": {"reason": reason, "message": message}}}],
        })

    def pod_image_pull_backoff(self, job_name: str, namespace: str = "default", attempt: int = 0) -> None:
        self.pod_waiting(job_name, "ImagePullBackOff", "Back-off pulling image", namespace, attempt)

    def event_on(self, kind: str, name: str, reason: str, message: str, namespace: str = "default",
                 component: str = "kubelet") -> dict:
        """A Warning Event as a controller or the kubelet records it."""
        api_version = "batch/v1" if kind == "Job" else "v1"
        target = self.get(api_version, kind, namespace, name) or {"metadata": {}}
        return self.create({
            "apiVersion": "v1", "kind": "Event",
            "metadata": {"name": f"{name}.{uuid.uuid4().hex[:12]}", "namespace": namespace},
            "involvedObject": {"apiVersion": api_version, "kind": kind, "name": name, "namespace": namespace,
                               "uid": target["metadata"].get("uid", "")},
            "reason": reason, "message": message, "type": "Warning", "count": 1,
            "firstTimestamp": now(), "lastTimestamp": now(), "source": {"component": component},
        })

    def job_failed_create(self, job_name: str, message: str, namespace: str = "default") -> dict:
        """The Job controller could not create the pod (quota, admission webhook, PriorityClass)."""
        return self.event_on("Job", job_name, "FailedCreate", message, namespace, component="job-controller")

    def pod_failed(self, job_name: str, reason: str = "Error", namespace: str = "default", attempt: int = 0,
                   exit_code: int = 1, message: Optional[str] = None, disrupted: bool = False) -> str:
        """The pod's container exits; the Job controller applies the Job's podFailurePolicy.

        Returns the action taken: Ignore (not counted), FailJob (the Job fails at once) or Count
        (counted; the Job fails with BackoffLimitExceeded once failures exceed backoffLimit).
        `disrupted`: the pod carries the DisruptionTarget condition (preemption, eviction)."""
        terminated = {"reason": reason, "exitCode": exit_code, "finishedAt": now()}
        if message is not None:
            terminated["message"] = message
        pod_status: dict[str, Any] = {
            "phase": "Failed",
            "containerStatuses": [{"name": "trainer", "image": "trainer", "imageID": "", "ready": False,
                                   "restartCount": 0, "state": {"terminated": terminated}}],
        }
        if disrupted:
            pod_status["conditions"] = [{"type": "DisruptionTarget", "status": "True",
                                         "reason": "PreemptionByScheduler", "lastTransitionTime": now(),
                                         "message": "preempted by a higher-priority pod"}]
        pod = self.patch_status("v1", "Pod", namespace, f"{job_name}-{attempt}", pod_status)
        job = self.job(job_name, namespace)
        action, index = pod_failure_action(job, pod)
        failed = int((job.get("status") or {}).get("failed") or 0)
        if action == "Ignore":
            self.patch_status("batch/v1", "Job", namespace, job_name, {"active": 0, "ready": 0})
            return action
        failed += 1
        self.patch_status("batch/v1", "Job", namespace, job_name, {"active": 0, "ready": 0, "failed": failed})
        if action == "FailJob":
            self.job_failed(job_name, "PodFailurePolicy",
                            f"Container trainer for pod {namespace}/{job_name}-{attempt} failed with exit code "
                            f"{exit_code} matching FailJob rule at index {index}", namespace)
        elif failed > int(job["spec"].get("backoffLimit", 6)):
            self.job_failed(job_name, "BackoffLimitExceeded", "Job has reached the specified backoff limit",
                            namespace)
        return action

    def pod_preempted(self, job_name: str, namespace: str = "default", attempt: int = 0) -> str:
        """The scheduler preempts the pod: DisruptionTarget, SIGTERM, the trainer checkpoints, exits 143."""
        return self.pod_failed(job_name, namespace=namespace, attempt=attempt, exit_code=143, disrupted=True)

    def job_failed(self, job_name: str, reason: str, message: str, namespace: str = "default") -> None:
        self.patch_status("batch/v1", "Job", namespace, job_name, {
            "active": 0, "ready": 0,
            "conditions": [
                {"type": "FailureTarget", "status": "True", "reason": reason, "message": message,
                 "lastTransitionTime": now(), "lastProbeTime": now()},
                {"type": "Failed", "status": "True", "reason": reason, "message": message,
                 "lastTransitionTime": now(), "lastProbeTime": now()},
            ],
        })

    def job_succeeded(self, job_name: str, namespace: str = "default", attempt: int = 0,
                      termination_message: Optional[str] = None) -> None:
        """The trainer exits 0 (its pod must exist: `start_pod`); `termination_message` is what it
        wrote to /dev/termination-log (the kubelet copies it into the container status)."""
        terminated = {"reason": "Completed", "exitCode": 0, "finishedAt": now()}
        if termination_message is not None:
            terminated["message"] = termination_message
        self.patch_status("v1", "Pod", namespace, f"{job_name}-{attempt}", {
            "phase": "Succeeded",
            "containerStatuses": [{"name": "trainer", "image": "trainer", "imageID": "", "ready": False,
                                   "restartCount": 0, "state": {"terminated": terminated}}],
        })
        self.patch_status("batch/v1", "Job", namespace, job_name, {
            "active": 0, "ready": 0, "succeeded": 1, "completionTime": now(),
            "conditions": [
                {"type": "SuccessCriteriaMet", "status": "True", "reason": "CompletionsReached",
                 "lastTransitionTime": now(), "lastProbeTime": now()},
                {"type": "Complete", "status": "True", "reason": "CompletionsReached",
                 "lastTransitionTime": now(), "lastProbeTime": now()},
            ],
        })

    def kueue_admits(self, job_name: str, namespace: str = "default") -> None:
        """Kueue admits the workload: it unsuspends the Job (a spec patch on the main resource)."""
        self.kube.patch("batch/v1", "Job", namespace, job_name, {"spec": {"suspend": False}})

    # ---- scripted faults -------------------------------------------------------------------------

    def inject(self, verb: str, plural: str, status: int, times: int = 1, **options: Any):
        """The next `times` matching operator requests get HTTP `status` (see fake_apiserver.Fault)."""
        return self.server.inject(verb, plural, status, times, **options)

    def expire_watches(self, plural: str) -> None:
        """End the open watch streams of `plural` with 410 Gone (from the server's own loop)."""
        self._loop.call_soon_threadsafe(self.server.expire_watches, plural)

    # ---- the trainer -----------------------------------------------------------------------------

    def trainer_reports(self, name: str, report: dict, namespace: str = "default") -> dict:
        return self.patch_status(*PJ, namespace, name, report)

    # ---- the pack trainer (`personalize-train pack`): reads the pack's ConfigMap as its --jobs
    # folder and patches each member's own status, as a solo trainer patches its job's -----------

    def pack_of(self, name: str, namespace: str = "default") -> Optional[str]:
        return ((status_of(self, name, namespace).get("pack")) or {}).get("job")

    def pack_files(self, pack: str, namespace: str = "default") -> list[str]:
        """The members the pack's trainer sees: its --jobs folder, one `<member>.yaml` each."""
        config = self.get("v1", "ConfigMap", namespace, f"{pack}-config") or {}
        return sorted(key[:-len(".yaml")] for key in config.get("data") or {})

    def member_trains(self, name: str, step: int, namespace: str = "default", max_steps: int = 400) -> dict:
        return self.trainer_reports(name, {"progress": {"step": step, "maxSteps": max_steps,
                                                         "percent": round(100.0 * step / max_steps, 2)}}, namespace)

    def member_finishes(self, name: str, step: int = 180, namespace: str = "default", max_steps: int = 400,
                        converged: bool = True) -> dict:
        """The slot's criterion fired (or it reached maxSteps): its final report, as a solo run's."""
        early = ({"stopped": True, "reason": "ConvergenceThreshold", "criterion": "dvar", "value": 0.12,
                  "threshold": 0.15, "window": 60, "step": step, "stepsSaved": max_steps - step,
                  "fractionSaved": round((max_steps - step) / max_steps, 3)}
                 if converged else {"stopped": False, "reason": "MaxSteps", "step": max_steps, "stepsSaved": 0})
        step = step if converged else max_steps
        return self.trainer_reports(name, {"progress": {"step": step, "maxSteps": max_steps,
                                                         "percent": round(100.0 * step / max_steps, 2)},
                                           "earlyStop": early, "wallSeconds": 60.0}, namespace)

    def member_fails(self, name: str, message: str, namespace: str = "default") -> dict:
        """The trainer failed this slot alone (bad input): its final report says why."""
        return self.trainer_reports(name, {"earlyStop": {"stopped": False, "reason": "Failed"},
                                           "message": message}, namespace)

    # ---- helpers ---------------------------------------------------------------------------------

    def events_for(self, name: str, namespace: str = "default") -> list[dict]:
        return [e for e in self.list("v1", "Event", namespace)
                if e.get("involvedObject", {}).get("name") == name
                and e.get("involvedObject", {}).get("kind") == "PersonalizationJob"]

    def owned_by(self, uid: str) -> list[dict]:
        out = []
        for (_, _, _), obj in list(self.server.objects.items()):
            if obj.deleted:
                continue
            raw = obj.raw
            if any(ref.get("uid") == uid for ref in raw.get("metadata", {}).get("ownerReferences", [])):
                out.append(raw)
        return out


def pod_failure_action(job: dict, pod: dict) -> tuple[str, Optional[int]]:
    """The Job controller's reading of `spec.podFailurePolicy` for a failed pod: the action of the
    first matching rule (and its index), else Count. Implements what the operator uses: onExitCodes
    with In/NotIn (optionally per container) and onPodConditions (type, status)."""
    rules = ((job.get("spec") or {}).get("podFailurePolicy") or {}).get("rules") or []
    status = pod.get("status") or {}
    conditions = {(c.get("type"), c.get("status")) for c in status.get("conditions") or []}
    exits = [(cs.get("name"), cs["state"]["terminated"].get("exitCode"))
             for cs in status.get("containerStatuses") or [] if (cs.get("state") or {}).get("terminated")]
    for index, rule in enumerate(rules):
        on_exit = rule.get("onExitCodes")
        if on_exit:
            for container, code in exits:
                if on_exit.get("containerName") not in (None, container) or code == 0:
                    continue
                if (code in on_exit["values"]) == (on_exit["operator"] == "In"):
                    return rule["action"], index
        for pattern in rule.get("onPodConditions") or []:
            if (pattern["type"], pattern.get("status", "True")) in conditions:
                return rule["action"], index
    return "Count", None


def status_of(cluster: FakeCluster, name: str, namespace: str = "default") -> dict:
    """The resource's status as the API server has it ({} while it has none or is gone)."""
    return (cluster.pj(name, namespace) or {}).get("status") or {}


def condition(status: dict, type_: str) -> Optional[dict]:
    """The condition of `type_` in a status (whatever its value), or None."""
    return next((c for c in status.get("conditions") or [] if c["type"] == type_), None)


def pj_manifest(name: str, namespace: str = "default", **spec_overrides: Any) -> dict:
    spec = {
        "baseModel": {"builtin": "tiny-world"},
        "method": "textualInversion",
        "concept": {"images": {"path": "concept", "claimName": "concept-images"}, "classNoun": "dog"},
        "training": {"maxSteps": 400},
        "earlyStopping": {"window": 60},
        "resources": {"gpus": 1, "nodeSelector": {"nvidia.com/gpu.product": "A100"},
                      "tolerations": [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}]},
        "output": {"path": "runs/" + name, "claimName": "artifacts"},
        "backoffLimit": 2,
        "activeDeadlineSeconds": 7200,
        "ttlSecondsAfterFinished": 86400,
    }
    spec.update(spec_overrides)
    return {"apiVersion": PJ_API_VERSION, "kind": "PersonalizationJob",
            "metadata": {"name": name, "namespace": namespace}, "spec": spec}

