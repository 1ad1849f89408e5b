"""StatusReporter against an in-memory Kubernetes API (kmock), with a fake clock and fake sleep."""

from __future__ import annotations

import asyncio
import logging
import socket
import threading
from collections.abc import Callable, Iterator
from typing import Any

import kmock
import pytest
import yaml
from kubernetes import client

from personalize.spec import EarlyStop, PersonalizationJobStatus, Progress, StopReason, TrainerReport
from personalize.status_reporter import StatusReporter, StatusReportError

RESOURCE = "personalization.dvar.dev/v1alpha1/personalizationjobs"
NAMESPACE, NAME = "team-a", "dog-ti"


class KubeServer:
    """kmock's KubernetesEmulator served from its own event loop in a background thread.

    The kubernetes client is synchronous; running the server in the test's thread would
    deadlock, so every interaction with the emulator goes through `call` on its loop.
    """

    def __init__(self) -> None:
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._run, name="kmock", daemon=True)
        self.url = ""

    def _run(self) -> None:
        asyncio.run(self._serve())

    async def _serve(self) -> None:
        self.loop = asyncio.get_running_loop()
        self._stop = asyncio.Event()
        async with kmock.KubernetesEmulator() as emulator, kmock.Server(emulator) as server:
            self.emulator = emulator
            self.url = str(server.url).rstrip("/")
            self._ready.set()
            await self._stop.wait()

    def __enter__(self) -> "KubeServer":
        self._thread.start()
        assert self._ready.wait(10), "kmock did not start"
        return self

    def __exit__(self, *exc: Any) -> None:
        self.loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(10)

    def call(self, fn: Callable[[kmock.KubernetesEmulator], Any]) -> Any:
        async def run() -> Any:
            return fn(self.emulator)

        return asyncio.run_coroutine_threadsafe(run(), self.loop).result(10)

    def patches(self) -> list[Any]:
        return self.call(lambda k: list(k["patch"]))

    def stored_status(self) -> dict[str, Any]:
        return self.call(lambda k: _plain(k.objects[RESOURCE, NAMESPACE, NAME]).get("status", {}))


def _plain(obj: Any) -> Any:
    if hasattr(obj, "items"):
        return {k: _plain(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_plain(v) for v in obj]
    return obj


@pytest.fixture
def kube() -> Iterator[KubeServer]:
    with KubeServer() as server:
        server.call(
            lambda k: k.objects.__setitem__(
                (RESOURCE, NAMESPACE, NAME),
                {
                    "apiVersion": "personalization.dvar.dev/v1alpha1",
                    "kind": "PersonalizationJob",
                    "metadata": {"name": NAME, "namespace": NAMESPACE, "uid": "0d6f-test"},
                    "spec": {"method": "textualInversion"},
                    "status": {"phase": "Running"},  # the operator's field: must survive our patches
                },
            )
        )
        yield server


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0
        self.sleeps: list[float] = []

    def __call__(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        self.now += seconds


def make_reporter(url: str, clock: FakeClock, **kwargs: Any) -> StatusReporter:
    configuration = client.Configuration()
    configuration.host = url
    configuration.retries = False
    api = client.CustomObjectsApi(client.ApiClient(configuration))
    return StatusReporter(NAMESPACE, NAME, api, clock=clock, sleep=clock.sleep, **kwargs)


def progress(step: int) -> TrainerReport:
    return TrainerReport(progress=Progress(step=step, max_steps=100, percent=float(step)), deterministic_loss=0.5 - step / 1000)


FINAL = TrainerReport(
    progress=Progress(step=42, max_steps=100, percent=42.0),
    deterministic_loss=0.2,
    early_stop=EarlyStop(stopped=True, reason=StopReason.convergence_threshold, criterion="dvar", value=0.1, threshold=0.15, step=42, steps_saved=58),
)


def test_progress_is_rate_limited_and_final_always_arrives(kube):
    clock = FakeClock()
    reporter = make_reporter(kube.url, clock, min_interval=5.0)
    sent_steps = []
    for step, t in enumerate([0.0, 1.0, 2.5, 4.9, 5.0, 6.0, 9.9, 10.0], start=1):
        clock.now = 1000.0 + t
        reporter.report(progress(step))
    reporter.report(FINAL, final=True)  # 0 s after the last progress patch: not rate-limited
    patches = kube.patches()
    for request in patches[:-1]:
        sent_steps.append(request.data["status"]["progress"]["step"])
    assert sent_steps == [1, 5, 8]  # t=0, t=5, t=10
    assert reporter.progress_dropped == 5 and reporter.patches_sent == 4
    assert patches[-1].data == {"status": FINAL.to_api()}
    for request in patches:
        assert request.headers["Content-Type"] == "application/merge-patch+json"
        assert str(request.url).endswith(f"/namespaces/{NAMESPACE}/personalizationjobs/{NAME}/status")
        assert set(request.data) == {"status"}
        PersonalizationJobStatus.model_validate(request.data["status"])  # a valid status, wire form
    stored = kube.stored_status()
    assert stored["earlyStop"]["reason"] == "ConvergenceThreshold" and stored["progress"]["step"] == 42
    assert stored["phase"] == "Running"  # merge patch left the operator's field alone
    assert clock.sleeps == []


def test_conflict_then_success_is_retried(kube):
    kube.call(lambda k: k["patch"][:1] << 409)
    clock = FakeClock()
    reporter = make_reporter(kube.url, clock, base_delay=0.5)
    reporter.report(FINAL, final=True)
    assert len(kube.patches()) == 2
    assert clock.sleeps == [0.5]
    assert kube.stored_status()["earlyStop"]["step"] == 42


def test_server_errors_are_retried_with_exponential_backoff(kube):
    kube.call(lambda k: k["patch"][:3] << 500)
    clock = FakeClock()
    reporter = make_reporter(kube.url, clock, base_delay=0.5, max_delay=1.5, final_attempts=6)
    reporter.report(FINAL, final=True)
    assert len(kube.patches()) == 4
    assert clock.sleeps == [0.5, 1.0, 1.5]  # doubling, capped at max_delay


def test_too_many_requests_honours_retry_after(kube):
    kube.call(lambda k: k["patch"][:1] << 429 << kmock.headers({"Retry-After": "3"}))
    clock = FakeClock()
    reporter = make_reporter(kube.url, clock, base_delay=0.5)
    reporter.report(FINAL, final=True)
    assert len(kube.patches()) == 2 and clock.sleeps == [3.0]


def test_persistent_failure_raises_after_retries_for_final_only(kube, caplog):
    kube.call(lambda k: k["patch"] << 503)
    clock = FakeClock()
    reporter = make_reporter(kube.url, clock, final_attempts=4, progress_attempts=2)
    with caplog.at_level(logging.WARNING, logger="personalize.status_reporter"):
        reporter.report(progress(1))  # must not raise: training goes on
    assert reporter.progress_failed == 1
    assert "training continues" in caplog.text
    assert len(kube.patches()) == 2
    with pytest.raises(StatusReportError, match="failed after 4 attempt"):
        reporter.report(FINAL, final=True)
    assert len(kube.patches()) == 2 + 4


def test_failing_progress_patches_back_off_and_recover(kube):
    kube.call(lambda k: k["patch"][:2] << 503)  # the first progress patch fails (2 attempts)
    clock = FakeClock()
    reporter = make_reporter(kube.url, clock, min_interval=5.0, progress_attempts=2, base_delay=0.5)
    start = clock.now
    reporter.report(progress(1))  # fails: 2 requests, one 0.5 s backoff sleep
    assert reporter.progress_failed == 1 and reporter.progress_interval == 10.0
    clock.now = start + 6.0
    reporter.report(progress(2))  # within the doubled interval: dropped
    assert len(kube.patches()) == 2 and reporter.progress_dropped == 1
    clock.now = start + 11.0
    reporter.report(progress(3))  # delivered; the interval is back to normal
    assert len(kube.patches()) == 3 and reporter.progress_interval == 5.0
    assert kube.stored_status()["progress"]["step"] == 3


def test_non_retryable_error_fails_at_once(kube):
    kube.call(lambda k: k["patch"] << 422)
    clock = FakeClock()
    reporter = make_reporter(kube.url, clock)
    with pytest.raises(StatusReportError, match="HTTP 422"):
        reporter.report(FINAL, final=True)
    assert len(kube.patches()) == 1 and clock.sleeps == []


def test_unreachable_api_server():
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    clock = FakeClock()
    reporter = make_reporter(f"http://127.0.0.1:{port}", clock, final_attempts=3, request_timeout=2.0)
    reporter.report(progress(1))  # logged, not raised
    assert reporter.progress_failed == 1
    with pytest.raises(StatusReportError, match="failed after 3 attempt"):
        reporter.report(FINAL, final=True)
    assert len(clock.sleeps) == 1 + 2


def test_from_env_without_resource_is_none():
    assert StatusReporter.from_env({}) is None
    assert StatusReporter.from_env({"PJ_NAMESPACE": "a"}) is None


def test_from_env_without_cluster_config_fails_early(tmp_path):
    env = {"PJ_NAMESPACE": NAMESPACE, "PJ_NAME": NAME, "KUBECONFIG": str(tmp_path / "missing")}
    with pytest.raises(StatusReportError, match="cannot reach the Kubernetes API"):
        StatusReporter.from_env(env)


def test_from_env_with_kubeconfig_reports_end_to_end(kube, tmp_path):
    kubeconfig = tmp_path / "kubeconfig"
    kubeconfig.write_text(
        yaml.safe_dump(
            {
                "apiVersion": "v1",
                "kind": "Config",
                "clusters": [{"name": "kmock", "cluster": {"server": kube.url}}],
                "users": [{"name": "trainer", "user": {"token": "t0ken"}}],
                "contexts": [{"name": "kmock", "context": {"cluster": "kmock", "user": "trainer"}}],
                "current-context": "kmock",
            }
        )
    )
    env = {"PJ_NAMESPACE": NAMESPACE, "PJ_NAME": NAME, "KUBECONFIG": str(kubeconfig), "PJ_STATUS_INTERVAL": "30"}
    reporter = StatusReporter.from_env(env)
    assert reporter is not None and reporter.min_interval == 30.0
    with reporter:
        reporter.report(FINAL, final=True)
    [request] = kube.patches()
    assert request.headers["Authorization"] == "Bearer t0ken"
    assert kube.stored_status()["earlyStop"]["stepsSaved"] == 58
