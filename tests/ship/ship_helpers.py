"""Shared by the tests/ship tests: where things are, how the chart renders, what 'all options
on' means, and the PromQL the chart ships (dashboard panels and alert rules)."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any, Iterator

import yaml

ROOT = Path(__file__).resolve().parents[2]
CHART = ROOT / "charts" / "personalization-operator"
CRD_FILE = ROOT / "crds" / "personalizationjobs.yaml"
EXAMPLES = ROOT / "examples"
RELEASE = "pj"
NAMESPACE = "pj-system"

# Every switch of values.yaml turned on (and every list/map given an entry), so that every
# template branch renders at least once.
ALL_ON: dict[str, Any] = {
    "image": {
        "operator": {"tag": "1.2.3", "pullPolicy": "Always"},
        "trainer": {"tag": "1.2.3-cuda", "pullPolicy": "Always"},
    },
    "imagePullSecrets": [{"name": "registry-credentials"}],
    "operator": {
        "maxConcurrentJobs": 8,
        "kueue": {"enabled": True},
        "watchNamespaces": ["team-a", "team-b"],
        "defaultTrainerResources": {"cpu": "8", "memory": "32Gi"},
        "extraEnv": [{"name": "PJ_EXTRA", "value": "1"}],
        "hubCache": {"claimName": "hf-cache"},
        "trainerImagePullSecrets": ["trainer-registry"],
        "pendingDeadlineSeconds": 1800,
        "trainerServiceAccountAnnotations": {"eks.amazonaws.com/role-arn": "arn:aws:iam::111122223333:role/trainer"},
    },
    "admission": {
        "allowedImagePrefixes": ["registry.example.com/ml/"],
        "allowedPriorityClasses": ["batch-low", "batch-high"],
    },
    "serviceAccount": {"annotations": {"iam.gke.io/gcp-service-account": "pj@example.iam.gserviceaccount.com"}},
    "podAnnotations": {"example.com/scrape": "false"},
    "podLabels": {"team": "ml-platform"},
    "priorityClassName": "system-cluster-critical",
    "nodeSelector": {"kubernetes.io/os": "linux"},
    "tolerations": [{"key": "dedicated", "operator": "Equal", "value": "ops", "effect": "NoSchedule"}],
    "affinity": {
        "nodeAffinity": {
            "requiredDuringSchedulingIgnoredDuringExecution": {
                "nodeSelectorTerms": [
                    {"matchExpressions": [{"key": "kubernetes.io/arch", "operator": "In", "values": ["amd64"]}]}
                ]
            }
        }
    },
    "monitoring": {
        "podMonitor": {"enabled": True, "labels": {"release": "kube-prometheus-stack"}, "interval": "10s"},
        "serviceMonitor": {"enabled": True, "labels": {"release": "kube-prometheus-stack"}},
        "prometheusRule": {
            "enabled": True,
            "labels": {"release": "kube-prometheus-stack"},
            "alertLabels": {"team": "ml-platform"},
        },
        "dashboards": {
            "enabled": True,
            "namespace": "monitoring",
            "annotations": {"grafana_folder": "Personalization"},
        },
    },
}


def load_chart():
    import helm_python

    return helm_python.Chart.load(str(CHART))


def render(values: dict[str, Any] | None = None) -> dict[str, str]:
    """Template path -> rendered text, as `helm template` would produce (offline)."""
    with load_chart() as chart:
        return chart.render(values, name=RELEASE, namespace=NAMESPACE)


def manifests(rendered: dict[str, str]) -> list[dict[str, Any]]:
    """Every Kubernetes object in the rendered templates (NOTES.txt is text, not a manifest)."""
    objects = []
    for path, text in sorted(rendered.items()):
        if path.endswith("NOTES.txt"):
            continue
        for doc in yaml.safe_load_all(text):
            if doc is not None:
                objects.append(doc)
    return objects


def operator_env(values: dict[str, Any] | None = None) -> dict[str, str]:
    """The PJ_* environment the chart's Deployment gives the operator (what Settings.from_env reads)."""
    (container,) = one(manifests(render(values)), "Deployment")["spec"]["template"]["spec"]["containers"]
    return {e["name"]: e["value"] for e in container["env"] if "value" in e and e["name"].startswith("PJ_")}


# An example's first line names any chart value it needs beyond the defaults, as
# "chart value operator.kueue.enabled=true".
_CHART_VALUE = re.compile(r"chart value ([A-Za-z][A-Za-z0-9_.]*)=([^\s;,)]+)")


def example_chart_values(first_line: str) -> dict[str, Any]:
    """The chart values an example's first line names, as a values dict ({} for none)."""
    values: dict[str, Any] = {}
    for key, raw in _CHART_VALUE.findall(first_line):
        *parents, leaf = key.split(".")
        node = values
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = yaml.safe_load(raw)
    return values


def by_kind(objects: list[dict[str, Any]], kind: str) -> list[dict[str, Any]]:
    return [o for o in objects if o["kind"] == kind]


def one(objects: list[dict[str, Any]], kind: str) -> dict[str, Any]:
    found = by_kind(objects, kind)
    assert len(found) == 1, f"expected one {kind}, found {len(found)}"
    return found[0]


# ---- PromQL the chart ships ----------------------------------------------------------------


def dashboards() -> dict[str, dict[str, Any]]:
    return {p.name: json.loads(p.read_text()) for p in sorted((CHART / "dashboards").glob("*.json"))}


def dashboard_queries(dashboard: dict[str, Any]) -> Iterator[tuple[str, str]]:
    """(where, expr) for every panel target, annotation and templating query of a dashboard."""
    for panel in dashboard["panels"]:
        for target in panel.get("targets", []):
            yield f"panel {panel['title']!r} {target['refId']}", target["expr"]
    for ann in dashboard.get("annotations", {}).get("list", []):
        if "expr" in ann:
            yield f"annotation {ann['name']!r}", ann["expr"]


def dashboard_variable_queries(dashboard: dict[str, Any]) -> Iterator[tuple[str, str]]:
    for var in dashboard.get("templating", {}).get("list", []):
        if var["type"] == "query":
            yield var["name"], var["query"]["query"]


# Grafana replaces these before a query reaches Prometheus. Multi-value variables become a
# regex; `.*` (the "All" value) is what a fresh dashboard sends.
GRAFANA_VARIABLES = {
    "$__rate_interval": "1m",
    "$__range": "10m",
    "$__interval": "15s",
    "$namespace": ".*",
    "$pj": ".*",
    "$gpu_hour_price": "2.5",
}


def grafana_substitute(expr: str, variables: dict[str, str] | None = None) -> str:
    variables = {**GRAFANA_VARIABLES, **(variables or {})}
    # Longest names first: $__range must not be cut by a shorter variable's name.
    for name in sorted(variables, key=len, reverse=True):
        expr = expr.replace(name, variables[name])
    # $1, $2 ... are label_replace's references to its regex groups, not Grafana variables
    assert not re.search(r"\$(?!\d)", expr), f"unsubstituted Grafana variable in {expr!r}"
    return expr


def rendered_rule_groups(values: dict[str, Any] | None = None) -> dict[str, Any]:
    """The PrometheusRule's spec (a Prometheus rule file: {'groups': [...]}), rendered."""
    merged = {"monitoring": {"prometheusRule": {"enabled": True}}}
    if values:
        merged = _deep_merge(merged, values)
    rule = one(manifests(render(merged)), "PrometheusRule")
    return rule["spec"]


def alert_rules(groups: dict[str, Any]) -> list[dict[str, Any]]:
    return [r for g in groups["groups"] for r in g["rules"] if "alert" in r]


def _deep_merge(a: dict[str, Any], b: dict[str, Any]) -> dict[str, Any]:
    out = dict(a)
    for k, v in b.items():
        out[k] = _deep_merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out
