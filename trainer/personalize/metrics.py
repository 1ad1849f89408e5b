"""Prometheus metrics of one training run, served on /metrics and optionally pushed at the end.

All series carry the labels `namespace`, `personalizationjob`, `method`, `criterion` (bounded
cardinality: one series set per job). Base units: seconds; no `_total` since there are no
counters. The registry is private to the run (not prometheus_client's global one), so tests and
several runs in one process never collide, and the exposition holds only training metrics.

Values not yet known (deterministic loss before the first evaluation, convergence value before
the window is full) are NaN, which Prometheus stores as "no meaningful value" and graphs as a
gap, rather than 0, which would read as "converged".
"""

from __future__ import annotations

import logging
import math
from typing import Optional
from urllib.error import URLError

from prometheus_client import CollectorRegistry, Gauge, Histogram, generate_latest, push_to_gateway, start_http_server

from personalize.errors import TrainerInputError

log = logging.getLogger(__name__)

LABELS = ("namespace", "personalizationjob", "method", "criterion")
PUSH_JOB = "personalization-trainer"
# Step times of the tiny CPU world (~0.1 s) up to large models on one GPU (seconds to a minute).
STEP_SECONDS_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
# A sample grid: a tiny world's second up to a few minutes of a large model's sampling.
SAMPLE_SECONDS_BUCKETS = (0.1, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0)
# The per-step training statistics (training_stats.py) by their StepRecord key.
STAT_GAUGES = {
    "lr": ("personalization_learning_rate", "Learning rate of the last optimizer step."),
    "grad_norm": ("personalization_gradient_norm", "L2 norm of the last step's gradient, before clipping."),
    "update_ratio": ("personalization_update_ratio", "Norm of the last update over the norm of the trained weights."),
    "update_cosine": ("personalization_update_cosine", "Cosine between the last two updates (near 0: steps cancel out)."),
    "adam_snr": ("personalization_adam_snr", "Mean of AdamW's m_hat^2/v_hat over the last steps (1: steady gradient)."),
}


class TrainerMetrics:
    def __init__(
        self,
        namespace: Optional[str],
        name: Optional[str],
        method: str,
        criterion: str,
        registry: Optional[CollectorRegistry] = None,
    ):
        self.registry = registry if registry is not None else CollectorRegistry()
        # A local run has no namespace/resource name; an empty label value is a valid "unset".
        self.labels = {
            "namespace": namespace or "",
            "personalizationjob": name or "",
            "method": str(method),
            "criterion": str(criterion),
        }

        def gauge(metric: str, doc: str) -> Gauge:
            return Gauge(metric, doc, LABELS, registry=self.registry).labels(**self.labels)

        def seconds_histogram(metric: str, doc: str) -> Histogram:
            return Histogram(metric, doc, LABELS, buckets=STEP_SECONDS_BUCKETS, registry=self.registry).labels(**self.labels)

        self.deterministic_loss = gauge(
            "personalization_deterministic_loss", "Loss on the fixed reference batch at the last evaluation."
        )
        self.training_loss = gauge("personalization_training_loss", "Training loss of the last optimizer step.")
        self.convergence_value = gauge(
            "personalization_convergence_value", "Current value of the convergence criterion (NaN until defined)."
        )
        self.convergence_threshold = gauge(
            "personalization_convergence_threshold", "Threshold below which the criterion stops training."
        )
        self.step = gauge("personalization_step", "Optimizer steps completed.")
        self.max_steps = gauge("personalization_max_steps", "Step budget of the run.")
        self.early_stopped = gauge(
            "personalization_early_stopped", "1 if the criterion stopped training before max steps, else 0."
        )
        self.step_duration = seconds_histogram(
            "personalization_step_duration_seconds",
            "Wall time of one training step (including any deterministic-loss evaluation).",
        )
        # Observed only at steps that evaluate the stop signal; its sum over the step duration's
        # sum is the share of training time that tracking costs on this hardware.
        self.evaluation_duration = seconds_histogram(
            "personalization_evaluation_duration_seconds",
            "Wall time one step spent evaluating the stop signal (deterministic loss or CLIP check).",
        )
        # One series per reference slot, named by its timestep (bounded by the reference batch size).
        self.timestep_loss = Gauge(
            "personalization_timestep_deterministic_loss",
            "Loss of one reference slot at the last evaluation, by its timestep (flow matching: sigma).",
            (*LABELS, "timestep"), registry=self.registry,
        )
        # ... and each divided by its first value: which timestep moves, and when, on one scale
        self.timestep_loss_ratio = Gauge(
            "personalization_timestep_deterministic_loss_ratio",
            "Loss of one reference slot at the last evaluation over its first evaluation's, by its timestep.",
            (*LABELS, "timestep"), registry=self.registry,
        )
        self._first_timestep_loss: dict[str, float] = {}
        self.stats = {key: gauge(metric, doc) for key, (metric, doc) in STAT_GAUGES.items()}
        self.sample_duration = Histogram(
            "personalization_sample_duration_seconds",
            "Wall time of drawing one validation grid while training (validation.everySteps).",
            LABELS, buckets=SAMPLE_SECONDS_BUCKETS, registry=self.registry,
        ).labels(**self.labels)
        for unknown in (self.deterministic_loss, self.training_loss, self.convergence_value, self.convergence_threshold,
                        *self.stats.values()):
            unknown.set(math.nan)
        self._server = None
        self._thread = None

    def observe(
        self,
        step: int,
        max_steps: int,
        train_loss: Optional[float],
        deterministic_loss: Optional[float],
        convergence_value: Optional[float],
        threshold: Optional[float],
        step_seconds: Optional[float],
        evaluation_seconds: Optional[float] = None,
        timestep_losses: Optional[dict[str, float]] = None,
        stats: Optional[dict[str, float]] = None,
    ) -> None:
        """Record one step. None means "not measured at this step": the gauge keeps its value."""
        for label, value in (timestep_losses or {}).items():
            self.timestep_loss.labels(**self.labels, timestep=label).set(value)
            first = self._first_timestep_loss.setdefault(label, value)
            self.timestep_loss_ratio.labels(**self.labels, timestep=label).set(value / first if first else math.nan)
        for key, value in (stats or {}).items():
            if key in self.stats:
                self.stats[key].set(value)  # NaN where undefined at this step (a gap)
        self.step.set(step)
        self.max_steps.set(max_steps)
        for gauge, value in (
            (self.training_loss, train_loss),
            (self.deterministic_loss, deterministic_loss),
            (self.convergence_value, convergence_value),
            (self.convergence_threshold, threshold),
        ):
            if value is not None:
                gauge.set(value)
        if step_seconds is not None:
            self.step_duration.observe(step_seconds)
        if evaluation_seconds is not None:
            self.evaluation_duration.observe(evaluation_seconds)

    def observe_samples(self, seconds: float) -> None:
        """One validation grid drawn while training, and what it took."""
        self.sample_duration.observe(seconds)

    def set_early_stopped(self, stopped: bool) -> None:
        self.early_stopped.set(1 if stopped else 0)

    def exposition(self) -> bytes:
        """The text format Prometheus scrapes (what /metrics serves)."""
        return generate_latest(self.registry)

    def serve(self, port: int, addr: str = "0.0.0.0") -> int:
        """Serve /metrics in a background thread; returns the bound port (useful with port 0)."""
        if self._server is not None:
            raise RuntimeError("metrics server already running")
        # A port that is taken or impossible is the user's to fix: one `error:` line, not a traceback.
        if not 0 <= port <= 65535:
            raise TrainerInputError(f"--metrics-port {port}: not a TCP port number (0-65535)")
        try:
            self._server, self._thread = start_http_server(port, addr=addr, registry=self.registry)
        except OSError as err:
            raise TrainerInputError(
                f"--metrics-port {port}: cannot serve /metrics on {addr}: {err.strerror or err}"
            ) from None
        return self._server.server_port

    def push(self, gateway_url: str, timeout: float = 10.0) -> bool:
        """Push the final values to a Pushgateway, grouped by namespace and job name.

        Best effort: a failure is logged and returns False (the run's result does not depend on it).
        """
        grouping = {"namespace": self.labels["namespace"], "personalizationjob": self.labels["personalizationjob"]}
        try:
            push_to_gateway(gateway_url, job=PUSH_JOB, registry=self.registry, grouping_key=grouping, timeout=timeout)
        except (URLError, OSError, ValueError) as err:
            log.warning("pushing metrics to %s failed: %s", gateway_url, err)
            return False
        return True

    def close(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            if self._thread is not None:
                self._thread.join(5)
            self._server = self._thread = None
