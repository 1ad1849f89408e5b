"""A throwaway Prometheus for tests and benchmarks: Debian's `prometheus` binary on 127.0.0.1
with its own config and data directory, stopped by PID; plus a small HTTP API client."""

from __future__ import annotations

import json
import shutil
import socket
import subprocess
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any, Optional

import yaml

PROMETHEUS = shutil.which("prometheus")
PROMTOOL = shutil.which("promtool")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def http_get(url: str, timeout: float = 5.0) -> bytes:
    with urllib.request.urlopen(url, timeout=timeout) as resp:
        return resp.read()


class PromQLError(Exception):
    """Prometheus refused a query (status "error": bad_data for a parse error, ...)."""


class Prometheus:
    """`with Prometheus(workdir, targets, rule_files) as prom: prom.query(...)`.

    targets: {scrape job name: ["host:port", ...]}. Every job scrapes every second with
    honor_labels (as the chart's PodMonitor does), so the exporters' own `namespace` label wins.
    labels: {scrape job name: {label: value}} that the job's targets get, as a PodMonitor's
    target gets its `pod`.
    """

    def __init__(self, workdir: Path, targets: dict[str, list[str]], rule_files: list[Path] = (),
                 interval: str = "1s", labels: Optional[dict[str, dict[str, str]]] = None):
        self.workdir = Path(workdir)
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.config = {
            "global": {"scrape_interval": interval, "scrape_timeout": interval, "evaluation_interval": interval},
            "rule_files": [str(p) for p in rule_files],
            "scrape_configs": [
                {"job_name": job, "honor_labels": True,
                 "static_configs": [{"targets": list(addrs), "labels": (labels or {}).get(job, {})}]}
                for job, addrs in targets.items()
            ],
        }
        self.proc: Optional[subprocess.Popen] = None

    def __enter__(self) -> "Prometheus":
        self.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.stop()

    def start(self, ready_timeout: float = 30.0) -> None:
        assert PROMETHEUS, "prometheus is not installed"
        self.workdir.mkdir(parents=True, exist_ok=True)
        config_file = self.workdir / "prometheus.yml"
        config_file.write_text(yaml.safe_dump(self.config, sort_keys=False))
        self.log_file = self.workdir / "prometheus.log"
        with self.log_file.open("wb") as log:
            self.proc = subprocess.Popen(
                [PROMETHEUS, f"--config.file={config_file}", f"--storage.tsdb.path={self.workdir / 'data'}",
                 f"--web.listen-address=127.0.0.1:{self.port}", "--storage.tsdb.retention.time=1h",
                 "--web.enable-lifecycle"],
                stdout=log, stderr=subprocess.STDOUT,
            )
        deadline = time.monotonic() + ready_timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"prometheus exited ({self.proc.returncode}):\n{self.log_file.read_text()[-3000:]}")
            try:
                http_get(f"{self.url}/-/ready", timeout=1)
                return
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                time.sleep(0.2)
        self.stop()
        raise RuntimeError("prometheus did not become ready")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()  # SIGTERM to this PID only
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=5)
        self.proc = None

    # ---- HTTP API ------------------------------------------------------------------------

    def api(self, path: str, **params: Any) -> Any:
        url = f"{self.url}/api/v1/{path}"
        if params:
            url += "?" + urllib.parse.urlencode(params)
        try:
            body = http_get(url)
        except urllib.error.HTTPError as err:
            body = err.read()
        reply = json.loads(body)
        if reply.get("status") != "success":
            raise PromQLError(f"{reply.get('errorType')}: {reply.get('error')}")
        return reply["data"]

    def query(self, expr: str, at: Optional[float] = None) -> list[dict[str, Any]]:
        """Instant query; the result list (vector/matrix entries; a scalar becomes one entry)."""
        params = {"query": expr}
        if at is not None:
            params["time"] = f"{at:.3f}"
        data = self.api("query", **params)
        if data["resultType"] in ("scalar", "string"):
            return [{"metric": {}, "value": data["result"]}]
        return data["result"]

    def wait_for(self, expr: str, timeout: float, poll: float = 0.1) -> list[dict[str, Any]]:
        deadline = time.monotonic() + timeout
        while True:
            result = self.query(expr)
            if result:
                return result
            if time.monotonic() > deadline:
                raise TimeoutError(f"no data for {expr!r} within {timeout}s")
            time.sleep(poll)

    def targets_up(self) -> dict[str, str]:
        return {t["labels"]["job"]: t["health"] for t in self.api("targets")["activeTargets"]}


def promtool(*args: str, stdin: Optional[bytes] = None, cwd: Optional[Path] = None) -> subprocess.CompletedProcess:
    assert PROMTOOL, "promtool is not installed"
    return subprocess.run([PROMTOOL, *args], input=stdin, capture_output=True, cwd=cwd, timeout=120)
