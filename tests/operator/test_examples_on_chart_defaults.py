"""Every manifest in examples/, applied to the operator as the Helm chart installs it: its
settings come from the environment the chart's Deployment renders with the default values (plus
any chart value an example's first line names), not from a list kept here. Each example must be
accepted (Valid, then Pending with its Job or Queued for capacity), never refused."""

from __future__ import annotations

import sys
from collections import defaultdict
from pathlib import Path

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "ship"))
from ship_helpers import EXAMPLES, example_chart_values, operator_env  # noqa: E402

from fake_cluster import PJ, condition, wait_for  # noqa: E402
from pj_operator.settings import Settings  # noqa: E402

FILES = sorted(EXAMPLES.glob("*.yaml"))


def settled(cluster, namespace: str, name: str):
    status = ((cluster.get(*PJ, namespace, name) or {}).get("status")) or {}
    valid = condition(status, "Valid")
    return status.get("phase") in ("Pending", "Queued", "Failed") and valid and status


def test_every_example_is_accepted_by_the_operator_the_chart_installs(cluster, run_operator):
    by_values: dict[str, list[Path]] = defaultdict(list)
    for path in FILES:
        by_values[yaml.safe_dump(example_chart_values(path.read_text().splitlines()[0]))].append(path)
    for values_text, paths in by_values.items():
        values = yaml.safe_load(values_text) or None
        env = operator_env(values)
        settings = Settings.from_env(env)
        manifests = [yaml.safe_load(p.read_text()) for p in paths]
        cluster.server.namespaces |= {m["metadata"]["namespace"] for m in manifests}
        jobs_before = len(cluster.creations("jobs"))
        outcomes = {}
        with run_operator(**env):
            # One at a time: each admission decision sees the previous one (the cap's documented
            # race between decisions made in the same instant is not under test here).
            for m in manifests:
                cluster.create(m)
                namespace, name = m["metadata"]["namespace"], m["metadata"]["name"]
                outcomes[name] = wait_for(lambda: settled(cluster, namespace, name), what=name)
        for name, status in outcomes.items():
            valid = condition(status, "Valid")
            assert (valid["status"], status["phase"]) != ("False", "Failed"), f"{name}: {valid['message']}"
            assert valid["status"] == "True", name
            if status["phase"] == "Queued":
                assert condition(status, "Queued")["reason"] in ("WaitingForCapacity", "WaitingForKueue"), name
        # As many admitted as the chart's cap lets in: one slot per Job, whose name each admitted
        # job's status holds; compatible examples the chart's packing puts in one pack share one
        # (a pack's Job is created once it has collected its members).
        slots = {s["jobName"] for s in outcomes.values() if s.get("jobName") and s["phase"] == "Pending"}
        waiting = sum(s["phase"] == "Queued" and condition(s, "Queued")["reason"] == "WaitingForCapacity"
                      for s in outcomes.values())
        cap = settings.max_concurrent_jobs or len(manifests)
        assert len(slots) == min(cap, len(slots) + waiting), (slots, waiting, cap)
        assert len(cluster.creations("jobs")) - jobs_before <= len(slots)
