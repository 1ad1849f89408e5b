"""`personalization-operator` as a command: usage, version, and what it does without a cluster.

Outside a pod, no usable kubeconfig is one `error:` line and exit 2; in a pod
(KUBERNETES_SERVICE_HOST set) the operator starts and kopf keeps retrying its login.
"""

from __future__ import annotations

import dataclasses
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib

from pj_operator import main as main_module
from pj_operator.settings import Settings

PROJECT_VERSION = tomllib.loads((Path(__file__).resolve().parents[2] / "pyproject.toml").read_text())["project"]["version"]


@pytest.fixture()
def no_cluster(tmp_path, monkeypatch):
    """Not in a pod, no kubeconfig anywhere; kopf.run records its call instead of running."""
    monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)
    monkeypatch.delenv("KUBECONFIG", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))  # no ~/.kube/config
    calls = []
    monkeypatch.setattr(main_module.kopf, "run", lambda **kwargs: calls.append(kwargs))
    return calls


def test_help_prints_usage_and_every_setting_variable(capsys):
    with pytest.raises(SystemExit) as exit_:
        main_module.main(["--help"])
    out = capsys.readouterr().out
    assert exit_.value.code == 0
    assert out.startswith("usage: personalization-operator")
    for field in dataclasses.fields(Settings):
        assert f"PJ_{field.name.upper()}" in out, field.name


def test_version_is_the_project_version(capsys):
    with pytest.raises(SystemExit) as exit_:
        main_module.main(["--version"])
    assert exit_.value.code == 0
    assert capsys.readouterr().out == f"personalization-operator {PROJECT_VERSION}\n"


def test_an_unknown_option_is_a_usage_error(capsys, no_cluster):
    with pytest.raises(SystemExit) as exit_:
        main_module.main(["--namespace", "x"])
    assert exit_.value.code == 2 and no_cluster == []


def test_without_a_cluster_it_prints_one_error_line_and_exits_2(capsys, no_cluster):
    assert main_module.main([]) == 2
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: no Kubernetes cluster"), captured.err
    assert "KUBERNETES_SERVICE_HOST" in lines[0] and ".kube/config" in lines[0]
    assert no_cluster == []  # kopf never started


def test_an_unreadable_kubeconfig_is_the_same_error(tmp_path, monkeypatch, capsys, no_cluster):
    broken = tmp_path / "kubeconfig"
    broken.write_text("apiVersion: v1\nkind: Config\ncurrent-context: nowhere\n")
    monkeypatch.setenv("KUBECONFIG", str(broken))
    assert main_module.main([]) == 2
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert line.startswith("error: no Kubernetes cluster") and str(broken) in line
    assert no_cluster == []


def test_with_a_kubeconfig_it_starts_kopf(tmp_path, monkeypatch, no_cluster):
    kubeconfig = tmp_path / "kubeconfig"
    kubeconfig.write_text(
        "apiVersion: v1\nkind: Config\ncurrent-context: c\n"
        "clusters: [{name: k, cluster: {server: 'http://127.0.0.1:1'}}]\n"
        "users: [{name: u, user: {token: t}}]\n"
        "contexts: [{name: c, context: {cluster: k, user: u}}]\n")
    monkeypatch.setenv("KUBECONFIG", str(kubeconfig))
    monkeypatch.setenv("PJ_METRICS_PORT", "0")
    assert main_module.main([]) == 0
    assert len(no_cluster) == 1


def test_in_a_pod_it_leaves_the_retrying_to_kopf(monkeypatch, no_cluster):
    monkeypatch.setenv("KUBERNETES_SERVICE_HOST", "10.96.0.1")
    monkeypatch.setenv("PJ_METRICS_PORT", "0")
    assert main_module.main([]) == 0
    assert len(no_cluster) == 1


def test_a_bad_setting_is_one_error_line(monkeypatch, capsys, no_cluster):
    monkeypatch.setenv("KUBERNETES_SERVICE_HOST", "10.96.0.1")
    monkeypatch.setenv("PJ_MAX_CONCURRENT_JOBS", "-1")
    assert main_module.main([]) == 2
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert line == "error: PJ_MAX_CONCURRENT_JOBS must be >= 0"
    assert no_cluster == []


def _console_script() -> str:
    script = shutil.which("personalization-operator", path=os.path.dirname(sys.executable))
    assert script, "the console script is not installed next to this Python"
    return script


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_console_script_without_a_cluster_exits_2_with_no_traceback(tmp_path):
    env = {k: v for k, v in os.environ.items() if k not in ("KUBERNETES_SERVICE_HOST", "KUBECONFIG")}
    env["HOME"] = str(tmp_path)
    done = subprocess.run([_console_script()], env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 2
    assert done.stdout == "" and len(done.stderr.strip().splitlines()) == 1, done.stderr


def test_console_script_in_a_pod_keeps_retrying_instead_of_exiting(tmp_path):
    """A pod whose service account is not usable yet: the operator's start-up activity fails, kopf
    logs that it will try again, and the process stays up until it is told to stop."""
    env = {k: v for k, v in os.environ.items() if k != "KUBECONFIG"}
    env.update(HOME=str(tmp_path), KUBERNETES_SERVICE_HOST="127.0.0.1",
               KUBERNETES_SERVICE_PORT=str(_closed_port()), PJ_METRICS_PORT="0", PJ_HEALTH_PORT="0")
    log = tmp_path / "operator.log"
    with log.open("w") as out:
        process = subprocess.Popen([_console_script()], env=env, stdout=out, stderr=subprocess.STDOUT)
        try:
            deadline = time.monotonic() + 120  # generous: start-up on a busy machine, not a timing test
            while "will try again" not in log.read_text() and time.monotonic() < deadline:
                assert process.poll() is None, f"exited {process.returncode}:\n{log.read_text()}"
                time.sleep(0.2)
            assert "will try again" in log.read_text(), log.read_text()
            assert process.poll() is None, log.read_text()
        finally:
            process.terminate()
            process.wait(60)
