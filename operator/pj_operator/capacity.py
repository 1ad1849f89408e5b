"""The concurrency cap: who may start now, and everyone else's place in the queue. Pure.

Recomputed from a fresh listing of all PersonalizationJobs every time a job asks, so nothing
about the queue lives in the operator's memory. A job holds a slot from the moment the operator
admits it (phase Pending) until it is Succeeded or Failed; the members of a pack hold one slot
together (one Job, one GPU), from its first member's admission to its last member's end. A job
that joins an open pack needs no slot of its own. Jobs with a Kueue queue name are
Kueue's business: they neither hold a slot nor wait here.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

from personalize.spec import Phase

from .names import KUEUE_QUEUE_LABEL

_HOLDING = (Phase.pending.value, Phase.running.value)


@dataclass(frozen=True)
class Decision:
    admit: bool
    position: int  # 1-based place among the waiting jobs (0 when admitted)
    waiting: int  # how many jobs wait, this one included
    running: int  # how many jobs hold a slot
    cap: int

    @property
    def message(self) -> str:
        return (f"waiting for capacity: position {self.position} of {self.waiting} in the queue "
                f"({self.running}/{self.cap} jobs running)")


def priority_values(priority_classes: list[dict[str, Any]]) -> tuple[dict[str, int], int]:
    """PriorityClass name -> value, and the value of jobs naming no class (the global default)."""
    values = {pc["metadata"]["name"]: int(pc.get("value", 0)) for pc in priority_classes}
    default = next((int(pc.get("value", 0)) for pc in priority_classes if pc.get("globalDefault")), 0)
    return values, default


def _uses_kueue(pj: dict) -> bool:
    """spec.queueName or the kueue.x-k8s.io/queue-name label (validation.parse_body)."""
    labels = (pj.get("metadata") or {}).get("labels") or {}
    return bool((pj.get("spec") or {}).get("queueName") or labels.get(KUEUE_QUEUE_LABEL))


def priority_class(pj: dict) -> Optional[str]:
    return ((pj.get("spec") or {}).get("resources") or {}).get("priorityClassName")


def queue_key(pj: dict, priorities: dict[str, int], default_priority: int) -> tuple:
    """Higher priority first, then older first; names break ties so every caller agrees."""
    pc = priority_class(pj)
    priority = priorities.get(pc, default_priority) if pc else default_priority
    meta = pj.get("metadata", {})
    return (-priority, meta.get("creationTimestamp", ""), meta.get("namespace", ""), meta.get("name", ""))


def is_waiting(pj: dict) -> bool:
    """Waiting for a slot: not yet admitted, not finished, not Kueue's, not being deleted."""
    if _uses_kueue(pj) or pj.get("metadata", {}).get("deletionTimestamp"):
        return False
    status = pj.get("status") or {}
    if status.get("jobName"):
        return False
    return status.get("phase") in (None, Phase.queued.value)


def holds_slot(pj: dict) -> bool:
    if _uses_kueue(pj):
        return False
    return (pj.get("status") or {}).get("phase") in _HOLDING


def slots_held(pjs: list[dict]) -> int:
    """How many slots the jobs hold: one per Job, so a pack's members hold one together."""
    return len({(pj["metadata"].get("namespace"), (pj.get("status") or {}).get("jobName") or pj["metadata"].get("name"))
                for pj in pjs if holds_slot(pj)})


def decide(me: dict, everyone: list[dict], cap: int, priorities: dict[str, int],
           default_priority: int = 0) -> Decision:
    """May `me` start now? `everyone` is the current listing (it may or may not include `me`)."""
    uid = me.get("metadata", {}).get("uid")
    others = [pj for pj in everyone if pj.get("metadata", {}).get("uid") != uid]
    running = slots_held(others)
    waiting = sorted([pj for pj in others if is_waiting(pj)] + [me],
                     key=lambda pj: queue_key(pj, priorities, default_priority))
    index = next(i for i, pj in enumerate(waiting) if pj.get("metadata", {}).get("uid") == uid)
    free = max(cap - running, 0)
    admit = index < free
    return Decision(admit=admit, position=0 if admit else index + 1, waiting=len(waiting), running=running,
                    cap=cap)
