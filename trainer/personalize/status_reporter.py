"""Write the trainer's progress and decision into the PersonalizationJob's status subresource.

The operator tells the trainer which resource it serves through `PJ_NAMESPACE` and `PJ_NAME`.
Without them (a local run) `StatusReporter.from_env()` returns None and only files are written.

Patches are JSON merge patches of `{"status": <TrainerReport>}`: they touch only the fields the
trainer owns and leave the operator's (phase, conditions, ...) alone.

- Progress patches are rate-limited: at most one per `min_interval` seconds (default 5, env
  `PJ_STATUS_INTERVAL`); reports in between are dropped (the next one carries newer numbers).
  A progress patch that still fails after its retries is logged and forgotten: status is a
  view of training, never a reason to stop it. Patching is synchronous (so a late progress
  patch can never overwrite the final one), so after each failed progress patch the interval
  doubles (capped at `max_progress_interval`) to keep a dead API server from stalling training;
  a success resets it.
- The final patch is always sent, retried with exponential backoff, and raises
  `StatusReportError` if it cannot be delivered. The run is finished then: its artifacts,
  result.json and termination message are written, so the CLI exits EXIT_STATUS_UNREPORTED (3),
  which the operator's Job never retries (podFailurePolicy FailJob) and maps to Succeeded from
  the termination message.
- Retried: 409 Conflict, 429 Too Many Requests (honouring Retry-After), 5xx, and connection
  errors/timeouts. Anything else (403, 404, 422, ...) will not get better by retrying.
"""

from __future__ import annotations

import logging
import os
import time
from typing import Any, Callable, Optional

import urllib3
from kubernetes import client, config
from kubernetes.client.exceptions import ApiException

from personalize.spec import API_GROUP, API_VERSION, PLURAL, TrainerReport

log = logging.getLogger(__name__)

ENV_NAMESPACE = "PJ_NAMESPACE"
ENV_NAME = "PJ_NAME"
ENV_INTERVAL = "PJ_STATUS_INTERVAL"
DEFAULT_MIN_INTERVAL = 5.0
MERGE_PATCH = "application/merge-patch+json"


# Exit code of a run that finished and kept its result but could not write its final status.
EXIT_STATUS_UNREPORTED = 3


class StatusReportError(RuntimeError):
    """The status could not be written (final patch after all retries, or no cluster config)."""


def _retryable(status: Optional[int]) -> bool:
    return status in (409, 429) or (status is not None and 500 <= status <= 599)


def _retry_after_seconds(err: ApiException) -> Optional[float]:
    headers = err.headers or {}
    value = headers.get("Retry-After") if hasattr(headers, "get") else None
    try:
        return max(0.0, float(value)) if value is not None else None
    except ValueError:  # an HTTP date: not worth parsing for a few seconds of backoff
        return None


class StatusReporter:
    """Patches `status` of one PersonalizationJob. Build it with `from_env()` in the trainer."""

    def __init__(
        self,
        namespace: str,
        name: str,
        api: client.CustomObjectsApi,
        *,
        min_interval: float = DEFAULT_MIN_INTERVAL,
        final_attempts: int = 6,
        progress_attempts: int = 2,
        base_delay: float = 0.5,
        max_delay: float = 8.0,
        request_timeout: float = 10.0,
        max_progress_interval: float = 300.0,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], None] = time.sleep,
    ):
        if final_attempts < 1 or progress_attempts < 1:
            raise ValueError("attempts must be >= 1")
        self.namespace = namespace
        self.name = name
        self.api = api
        self.min_interval = float(min_interval)
        self.final_attempts = final_attempts
        self.progress_attempts = progress_attempts
        self.base_delay = base_delay
        self.max_delay = max_delay
        self.request_timeout = request_timeout
        self.max_progress_interval = max_progress_interval
        self._clock = clock
        self._sleep = sleep
        self._last_progress_at: Optional[float] = None
        self._progress_failures_in_a_row = 0
        # Counters, for logs and tests.
        self.patches_sent = 0  # delivered patches
        self.progress_dropped = 0  # progress reports skipped by the rate limit
        self.progress_failed = 0  # progress patches given up after retries

    # ---- construction ------------------------------------------------------------------------

    @classmethod
    def from_env(cls, environ: Optional[dict[str, str]] = None, **kwargs: Any) -> Optional["StatusReporter"]:
        """A reporter for the resource named by PJ_NAMESPACE/PJ_NAME, or None if either is unset.

        Cluster access: the kubeconfig named by KUBECONFIG when set, else the pod's service
        account (in-cluster config). When the resource is named but no configuration loads, it
        raises StatusReportError right away: better than training for hours and then failing
        to report.
        """
        env = os.environ if environ is None else environ
        namespace, name = env.get(ENV_NAMESPACE), env.get(ENV_NAME)
        if not namespace or not name:
            return None
        if "min_interval" not in kwargs and env.get(ENV_INTERVAL):
            try:
                kwargs["min_interval"] = float(env[ENV_INTERVAL])
            except ValueError:
                raise StatusReportError(f"{ENV_INTERVAL}={env[ENV_INTERVAL]!r} is not a number of seconds") from None
        configuration = client.Configuration()
        try:
            if env.get("KUBECONFIG"):
                config.load_kube_config(config_file=env["KUBECONFIG"], client_configuration=configuration)
            else:
                config.load_incluster_config(client_configuration=configuration)
        except (config.ConfigException, OSError) as err:
            raise StatusReportError(
                f"cannot reach the Kubernetes API to report status of {namespace}/{name}: {err}"
            ) from None
        # Our own retry loop decides about retries; urllib3 must not retry behind its back.
        configuration.retries = False
        api = client.CustomObjectsApi(client.ApiClient(configuration))
        return cls(namespace, name, api, **kwargs)

    # ---- reporting ---------------------------------------------------------------------------

    def report(self, report: TrainerReport, final: bool = False) -> None:
        """Patch status with `report`: rate-limited unless `final`; a final failure raises."""
        body = {"status": report.to_api()}
        if final:
            self._patch(body, self.final_attempts)
            return
        now = self._clock()
        if self._last_progress_at is not None and now - self._last_progress_at < self.progress_interval:
            self.progress_dropped += 1
            return
        self._last_progress_at = now
        try:
            self._patch(body, self.progress_attempts)
        except StatusReportError as err:
            self.progress_failed += 1
            self._progress_failures_in_a_row += 1
            log.warning(
                "progress status patch failed (training continues; next try in %.0fs): %s", self.progress_interval, err
            )
        else:
            self._progress_failures_in_a_row = 0

    @property
    def progress_interval(self) -> float:
        """Current minimum spacing of progress patches: min_interval, doubled per failure in a row."""
        backoff = self.min_interval * 2.0 ** min(self._progress_failures_in_a_row, 30)
        return min(backoff, max(self.max_progress_interval, self.min_interval))

    def close(self) -> None:
        self.api.api_client.close()

    def __enter__(self) -> "StatusReporter":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    # ---- transport ---------------------------------------------------------------------------

    def _patch(self, body: dict[str, Any], attempts: int) -> None:
        where = f"{API_GROUP}/{API_VERSION} {PLURAL} {self.namespace}/{self.name}"
        delay = self.base_delay
        for attempt in range(1, attempts + 1):
            wait = delay
            try:
                self.api.patch_namespaced_custom_object_status(
                    API_GROUP,
                    API_VERSION,
                    self.namespace,
                    PLURAL,
                    self.name,
                    body,
                    _content_type=MERGE_PATCH,
                    _request_timeout=self.request_timeout,
                )
                self.patches_sent += 1
                return
            except ApiException as err:
                problem = f"HTTP {err.status} {err.reason or ''}".strip()
                if not _retryable(err.status):
                    raise StatusReportError(f"status patch of {where} rejected: {problem}") from None
                wait = _retry_after_seconds(err) if err.status == 429 else None
                wait = delay if wait is None else wait
            except (urllib3.exceptions.HTTPError, OSError) as err:
                problem = f"{type(err).__name__}: {err}"
            if attempt == attempts:
                raise StatusReportError(f"status patch of {where} failed after {attempts} attempt(s): {problem}")
            log.info("status patch of %s failed (%s); retry %d/%d in %.1fs", where, problem, attempt, attempts - 1, wait)
            self._sleep(min(wait, self.max_delay))
            delay = min(delay * 2, self.max_delay)
