"""Operator metrics of packing and of what a concept costs (names listed in docs/operator.md).

- `personalization_packs`, `personalization_pack_members`: packs whose Job runs or is about to,
  and the members holding a slot in them (from the pack book, at scrape time).
- `personalization_concept_gpu_seconds{packing}`: GPU-seconds per finished concept, a histogram.
  A solo job's is its Job's time from start to completion times its GPUs; a pack's GPU time is
  split among its members by their steps (concept-steps). Its `_count` over its `_sum` is
  concepts per GPU-second: the fleet dashboard shows 3600 x that, packed and solo.
- `personalization_concept_steps_total{packing}`: steps of those concepts; with the histogram's
  sum it gives GPU-seconds per concept-step, solo and packed (what packing saved, fleet-wide).
"""

from __future__ import annotations

import threading
from typing import Any, Optional

from prometheus_client import REGISTRY, Counter, Histogram
from prometheus_client.core import GaugeMetricFamily

from personalize.spec import Phase

from . import lifecycle, metrics, status
from .pack_book import BOOK

PACKED, SOLO = "packed", "solo"

CONCEPT_GPU_SECONDS = Histogram(
    "personalization_concept_gpu_seconds",
    "GPU-seconds per finished concept: a solo Job's GPU time, or its share of its pack's GPU time "
    "(split by steps).",
    ["packing"],
    buckets=(30, 60, 120, 300, 600, 1200, 1800, 3600, 7200, 14400, 28800),
)
CONCEPT_STEPS = Counter(
    "personalization_concept_steps", "Training steps of the finished concepts counted in "
    "personalization_concept_gpu_seconds.", ["packing"],
)
for _packing in (PACKED, SOLO):
    CONCEPT_GPU_SECONDS.labels(packing=_packing)
    CONCEPT_STEPS.labels(packing=_packing)


class PackCollector:
    def collect(self):
        packs, members = BOOK.counts()
        yield GaugeMetricFamily("personalization_packs", "Packs whose Job runs or is about to start.", value=packs)
        yield GaugeMetricFamily("personalization_pack_members",
                                "PersonalizationJobs holding a slot in a pack.", value=members)


REGISTRY.register(PackCollector())

_recorded: set[str] = set()
_recorded_lock = threading.Lock()


def _job_seconds(job: Optional[dict]) -> float:
    """From the Job's start to its completion (or its failure; now while it runs)."""
    if not job:
        return 0.0
    st = job.get("status") or {}
    started = lifecycle.parse_time(st.get("startTime"))
    ended = next((lifecycle.job_condition(job, t) for t in ("Complete", "Failed") if lifecycle.job_condition(job, t)),
                 None)
    finished = lifecycle.parse_time(st.get("completionTime") or (ended or {}).get("lastTransitionTime")
                                    or lifecycle.now_iso())
    if started is None or finished is None:
        return 0.0
    return max((finished - started).total_seconds(), 0.0)


def _steps(st: dict) -> int:
    return int((st.get("progress") or {}).get("step") or (st.get("earlyStop") or {}).get("step") or 0)


def record_solo(job: Optional[dict], final_status: dict[str, Any], gpus: int) -> None:
    """A solo job succeeded: its Job's GPU time is its concept's."""
    seconds = _job_seconds(job) * gpus
    if seconds > 0:
        CONCEPT_GPU_SECONDS.labels(packing=SOLO).observe(seconds)
        CONCEPT_STEPS.labels(packing=SOLO).inc(_steps(final_status))


def record_member_completion(before: dict, patch: dict, reason: str, sharing: int) -> None:
    """A member finished: the completion counters, with early stopping's savings and tracking
    cost charged at its share of the GPU (1 / the members training beside it)."""
    spec = before.get("spec") or {}
    final_status = {**(before.get("status") or {}), **patch}
    metrics.record_completion(patch["phase"], reason, spec.get("method", ""), final_status, 1.0 / max(sharing, 1))


def record_pack_end(namespace: str, pack: str, job: Optional[dict]) -> None:
    """Once per pack Job: its GPU time split among its members by their steps; the concepts that
    succeeded are observed."""
    uid = ((job or {}).get("metadata") or {}).get("uid")
    view = BOOK.pack(namespace, pack)
    if not uid or view is None:
        return
    with _recorded_lock:
        if uid in _recorded:
            return
        _recorded.add(uid)
    statuses = [(status.latest(namespace, name) or {}).get("status") or {} for name in view.members]
    steps = [_steps(st) for st in statuses]
    total = sum(steps)
    seconds = _job_seconds(job)
    if total <= 0 or seconds <= 0:
        return
    for st, own in zip(statuses, steps):
        if st.get("phase") == Phase.succeeded.value and own > 0:
            CONCEPT_GPU_SECONDS.labels(packing=PACKED).observe(seconds * own / total)
            CONCEPT_STEPS.labels(packing=PACKED).inc(own)
