"""Fixtures: a strict fake cluster per test, and the operator (kopf in a thread) running against it."""

from __future__ import annotations

import contextlib
import os
from typing import Iterator

import kopf.testing
import kubernetes
import pytest

from fake_cluster import FakeCluster, wait_for

# The queue pump's period; short so capacity tests move quickly (it is read at operator start).
os.environ.setdefault("PJ_POLL_INTERVAL", "0.3")
os.environ.setdefault("PJ_RETRY_DELAY", "0.5")
# Our API client's back-off for 429/5xx (0.5 s doubling in production): short, same logic.
os.environ.setdefault("PJ_API_BACKOFF", "0.01")
# Most tests follow one job through its own Job; the packing tests turn packing on (its default).
os.environ.setdefault("PJ_PACKING_ENABLED", "false")


@pytest.fixture()
def cluster(tmp_path, monkeypatch) -> Iterator[FakeCluster]:
    fake = FakeCluster().start()
    monkeypatch.setenv("KUBECONFIG", str(fake.write_kubeconfig(tmp_path / "kubeconfig")))
    monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)
    # kopf's login (and our Kube.from_environment) read the kubeconfig into the kubernetes
    # client's process-wide default configuration: start every test from a clean one.
    kubernetes.client.Configuration.set_default(None)
    yield fake
    fake.stop()
    assert fake.violations == [], "objects the API server would have rejected:\n" + "\n".join(fake.violations)


@pytest.fixture()
def run_operator(cluster, monkeypatch):
    """Context manager: the operator runs inside the `with` block (can be used several times)."""

    @contextlib.contextmanager
    def run(extra_args: tuple[str, ...] = (), **env: str) -> Iterator[kopf.testing.KopfRunner]:
        for key, value in env.items():
            monkeypatch.setenv(key, value)
        before = len(cluster.requests)
        scope = [] if "--namespace" in extra_args else ["--all-namespaces"]
        args = ["run", "--standalone", *scope, "-m", "pj_operator.handlers", *extra_args]
        with kopf.testing.KopfRunner(args, timeout=30) as runner:
            # Objects created before kopf's watch is established would arrive in its initial
            # listing instead; wait so that tests see the steady-state path.
            def watches_started() -> bool:
                return all(cluster.watching(plural, since=before)
                           for plural in ("personalizationjobs", "jobs", "pods", "events"))

            wait_for(watches_started, what="kopf's watch requests")
            yield runner
        assert runner.exit_code == 0, runner.output
        assert runner.exception is None, runner.output

    return run


def pytest_configure(config):
    # kmock 0.8 loads its bundled discovery data with a deprecated importlib API.
    config.addinivalue_line("filterwarnings", "ignore:read_binary is deprecated:DeprecationWarning:kmock")
