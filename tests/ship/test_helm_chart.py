"""The Helm chart: lints, renders with defaults and with every option on, and every rendered
object is valid for Kubernetes 1.28 and for the newest version kubernetes-validate bundles.

The chart is also checked against the code it deploys: the operator's settings parser reads the
Deployment's environment, the ClusterRole covers the Role the operator creates for each trainer
(Kubernetes refuses to let a subject grant verbs it does not hold), and the PodMonitor selects
the pods of the Job the operator builds.
"""

from __future__ import annotations

import inspect
import json

import jsonschema
import pytest
import yaml

from pj_operator import children, kube
from pj_operator import settings as settings_mod
from ship_helpers import ALL_ON, CHART, CRD_FILE, NAMESPACE, RELEASE, by_kind, load_chart, manifests, one, render

helm_python = pytest.importorskip("helm_python", reason="helm-python-sdk is not installed")
kubernetes_validate = pytest.importorskip("kubernetes_validate", reason="kubernetes-validate is not installed")

KUBE_VERSIONS = ["1.28", kubernetes_validate.latest_version()]
MONITORING_KINDS = {"PodMonitor", "ServiceMonitor", "PrometheusRule"}


@pytest.fixture(scope="module")
def default_objects():
    return manifests(render())


@pytest.fixture(scope="module")
def all_on_objects():
    return manifests(render(ALL_ON))


# ---- lint and render ---------------------------------------------------------------------------


@pytest.mark.parametrize("values", [None, ALL_ON], ids=["defaults", "all-on"])
def test_lint_has_no_errors_or_warnings(values):
    report = helm_python.lint(str(CHART), values, strict=True, namespace=NAMESPACE)
    assert report["errors"] == []
    # Severity 1 is informational ("icon is recommended"); 2 = warning, 3 = error.
    problems = [m for m in report["messages"] if m["severity"] >= 2]
    assert problems == []


def test_defaults_render_the_operator_and_dashboards_only(default_objects):
    kinds = sorted(o["kind"] for o in default_objects)
    assert kinds == ["ClusterRole", "ClusterRoleBinding", "ConfigMap", "ConfigMap", "Deployment", "ServiceAccount"]


def test_all_on_renders_every_monitoring_object(all_on_objects):
    kinds = sorted(o["kind"] for o in all_on_objects)
    assert kinds == sorted(
        ["ClusterRole", "ClusterRoleBinding", "ConfigMap", "ConfigMap", "Deployment", "ServiceAccount",
         "Service", "ServiceMonitor", "PodMonitor", "PrometheusRule"]
        + ["Role", "RoleBinding"] * 2  # one pair per watched namespace
    )


def test_notes_render_with_every_option():
    notes = render(ALL_ON)[f"{CHART.name}/templates/NOTES.txt"]
    assert "team-a, team-b" in notes
    assert "Kueue" in notes
    assert "PodMonitor" in notes and "ServiceMonitor" in notes and "PrometheusRule" in notes


# ---- schema validity ---------------------------------------------------------------------------


@pytest.mark.parametrize("version", KUBE_VERSIONS)
@pytest.mark.parametrize("values", [None, ALL_ON], ids=["defaults", "all-on"])
def test_builtin_objects_validate_strictly(values, version):
    objects = [o for o in manifests(render(values)) if o["kind"] not in MONITORING_KINDS]
    assert objects
    for obj in objects:
        # Raises ValidationError (unknown fields included, strict mode) or SchemaNotFoundError.
        kubernetes_validate.validate(obj, version, strict=True)


# The Prometheus Operator's CRDs are not bundled with kubernetes-validate: these schemas pin the
# part of monitoring.coreos.com/v1 the chart uses, with unknown fields rejected.
_LABELS = {"type": "object", "additionalProperties": {"type": "string"}}
_DURATION = {"type": "string", "pattern": r"^(0|(([0-9]+)y)?(([0-9]+)w)?(([0-9]+)d)?(([0-9]+)h)?(([0-9]+)m)?(([0-9]+)s)?(([0-9]+)ms)?)$"}
_META = {
    "type": "object",
    "required": ["name", "namespace"],
    "additionalProperties": False,
    "properties": {"name": {"type": "string"}, "namespace": {"type": "string"}, "labels": _LABELS,
                   "annotations": _LABELS},
}
_SELECTOR = {"type": "object", "additionalProperties": False, "required": ["matchLabels"],
             "properties": {"matchLabels": _LABELS}}
_NS_SELECTOR = {"type": "object", "additionalProperties": False, "minProperties": 1,
                "properties": {"any": {"type": "boolean"}, "matchNames": {"type": "array", "items": {"type": "string"}}}}
_ENDPOINT = {
    "type": "object",
    "additionalProperties": False,
    "required": ["port"],
    "properties": {"port": {"type": "string"}, "path": {"type": "string"}, "interval": _DURATION,
                   "scrapeTimeout": _DURATION, "honorLabels": {"type": "boolean"}},
}


def _cr(kind: str, spec: dict) -> dict:
    return {
        "type": "object",
        "additionalProperties": False,
        "required": ["apiVersion", "kind", "metadata", "spec"],
        "properties": {"apiVersion": {"const": "monitoring.coreos.com/v1"}, "kind": {"const": kind},
                       "metadata": _META, "spec": spec},
    }


MONITORING_SCHEMAS = {
    "PodMonitor": _cr("PodMonitor", {
        "type": "object", "additionalProperties": False, "required": ["selector", "podMetricsEndpoints"],
        "properties": {"selector": _SELECTOR, "namespaceSelector": _NS_SELECTOR,
                       "podMetricsEndpoints": {"type": "array", "minItems": 1, "items": _ENDPOINT}},
    }),
    "ServiceMonitor": _cr("ServiceMonitor", {
        "type": "object", "additionalProperties": False, "required": ["selector", "endpoints"],
        "properties": {"selector": _SELECTOR, "namespaceSelector": _NS_SELECTOR,
                       "endpoints": {"type": "array", "minItems": 1, "items": _ENDPOINT}},
    }),
    "PrometheusRule": _cr("PrometheusRule", {
        "type": "object", "additionalProperties": False, "required": ["groups"],
        "properties": {"groups": {"type": "array", "minItems": 1, "items": {
            "type": "object", "additionalProperties": False, "required": ["name", "rules"],
            "properties": {"name": {"type": "string"}, "interval": _DURATION, "rules": {
                "type": "array", "minItems": 1, "items": {
                    "type": "object", "additionalProperties": False, "required": ["alert", "expr"],
                    "properties": {"alert": {"type": "string", "pattern": "^[A-Za-z_][A-Za-z0-9_]*$"},
                                   "expr": {"type": "string", "minLength": 1}, "for": _DURATION,
                                   "labels": _LABELS, "annotations": _LABELS}}}}}}},
    }),
}


def test_monitoring_objects_have_the_prometheus_operator_structure(all_on_objects):
    for obj in all_on_objects:
        if obj["kind"] in MONITORING_KINDS:
            jsonschema.validate(obj, MONITORING_SCHEMAS[obj["kind"]])


def test_monitoring_schemas_reject_a_misspelled_field(all_on_objects):
    pod_monitor = json.loads(json.dumps(one(all_on_objects, "PodMonitor")))
    pod_monitor["spec"]["podMetricsEndpoints"][0]["honourLabels"] = True
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(pod_monitor, MONITORING_SCHEMAS["PodMonitor"])


# ---- the CRD -----------------------------------------------------------------------------------


def test_chart_crd_is_the_generated_crd():
    with load_chart() as chart:
        crds = chart.crds
    assert [c["filename"] for c in crds] == [f"{CHART.name}/crds/personalizationjobs.yaml"]
    assert crds[0]["data"] == CRD_FILE.read_text(), (
        "charts/personalization-operator/crds/ drifted from crds/: "
        "cp crds/personalizationjobs.yaml charts/personalization-operator/crds/"
    )


@pytest.mark.parametrize("version", KUBE_VERSIONS)
def test_crd_validates_strictly(version):
    kubernetes_validate.validate(yaml.safe_load(CRD_FILE.read_text()), version, strict=True)


# ---- the operator Deployment -------------------------------------------------------------------


def test_deployment_runs_one_hardened_operator(all_on_objects):
    deploy = one(all_on_objects, "Deployment")
    spec = deploy["spec"]
    assert spec["replicas"] == 1
    assert spec["strategy"] == {"type": "Recreate"}
    pod = spec["template"]["spec"]
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["runAsUser"] != 0
    assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
    (container,) = pod["containers"]
    sc = container["securityContext"]
    assert sc["allowPrivilegeEscalation"] is False
    assert sc["readOnlyRootFilesystem"] is True
    assert sc["capabilities"]["drop"] == ["ALL"]
    assert container["resources"]["requests"] and container["resources"]["limits"]["memory"]
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert ports == {"metrics": 8080, "health": 8081}
    probe = container["livenessProbe"]["httpGet"]
    assert probe["path"] == "/healthz" and ports[probe["port"]] == 8081
    assert container["image"] == "ghcr.io/dvar-dev/personalization-operator:1.2.3"
    assert pod["serviceAccountName"] == one(all_on_objects, "ServiceAccount")["metadata"]["name"]


def _env(deploy: dict) -> dict[str, str]:
    (container,) = deploy["spec"]["template"]["spec"]["containers"]
    return {e["name"]: e["value"] for e in container["env"] if "value" in e}


def test_operator_settings_parse_the_rendered_environment(all_on_objects):
    env = _env(one(all_on_objects, "Deployment"))
    settings = settings_mod.Settings.from_env(env)
    assert settings.trainer_image == "ghcr.io/dvar-dev/personalization-trainer:1.2.3-cuda"
    assert settings.image_pull_policy == "Always"
    assert settings.max_concurrent_jobs == 8
    assert settings.kueue_enabled is True
    assert settings.namespaces == ("team-a", "team-b")
    assert (settings.default_cpu, settings.default_memory) == ("8", "32Gi")
    assert (settings.metrics_port, settings.health_port) == (8080, 8081)
    assert settings.standalone is True
    # The trainer image's user (Dockerfile) is the UID the operator runs trainer pods as.
    assert settings.trainer_uid == 10001


def test_defaults_give_the_operator_a_cap_and_no_kueue(default_objects):
    settings = settings_mod.Settings.from_env(_env(one(default_objects, "Deployment")))
    assert settings.kueue_enabled is False
    assert settings.max_concurrent_jobs == 4
    assert settings.namespaces == ()
    # Trainer pods keep /metrics up past the pod monitor's scrape interval, inside their grace period.
    assert settings.trainer_metrics_linger_seconds == 30
    assert settings.termination_grace_period_seconds > settings.trainer_metrics_linger_seconds


def test_the_operators_own_defaults_are_the_charts_defaults(default_objects):
    """An operator started without the chart's environment behaves as the chart installs it."""
    from_chart = settings_mod.Settings.from_env(_env(one(default_objects, "Deployment")))
    assert from_chart == settings_mod.Settings.from_env({})
    assert settings_mod.Settings() == settings_mod.Settings.from_env({})


def test_trainer_pods_serve_metrics_off_the_exporters_port_range(default_objects):
    settings = settings_mod.Settings.from_env(_env(one(default_objects, "Deployment")))
    # 9100-9999 are exporters' default ports; GPU nodes often run DCGM exporter on 9400.
    assert not 9100 <= settings.trainer_metrics_port <= 9999


def test_the_trainer_port_and_service_account_annotations_reach_what_the_operator_creates():
    from personalize.spec import parse_job

    irsa = {"eks.amazonaws.com/role-arn": "arn:aws:iam::111122223333:role/trainer"}
    values = {"operator": {"trainerMetricsPort": 8123, "trainerServiceAccountAnnotations": irsa}}
    settings = settings_mod.Settings.from_env(_env(one(manifests(render(values)), "Deployment")))
    job = parse_job({"spec": {"method": "lora", "baseModel": {"builtin": "tiny-world"},
                              "concept": {"images": {"path": "images"}, "classNoun": "dog"}}})
    made = {m["kind"]: m for m in children.all_children(job, "demo", "team-a", settings)}
    (container,) = made["Job"]["spec"]["template"]["spec"]["containers"]
    assert container["ports"] == [{"name": "metrics", "containerPort": 8123, "protocol": "TCP"}]
    assert container["command"][container["command"].index("--metrics-port") + 1] == "8123"
    assert made["ServiceAccount"]["metadata"]["annotations"] == irsa


def test_notes_watch_and_follow_the_example_they_apply(default_objects):
    notes = render()[f"{CHART.name}/templates/NOTES.txt"]
    applied = next(line.split()[-1] for line in notes.splitlines() if "kubectl apply -f" in line)
    example = yaml.safe_load((CHART.parents[1] / applied).read_text())["metadata"]
    namespace, name = example["namespace"], example["name"]
    assert f"kubectl get pj -n {namespace} -w" in notes
    assert f"kubectl describe pj -n {namespace} {name}" in notes
    assert f"kubectl logs -n {namespace} -f job/{name}" in notes  # the Job has the resource's name


def test_a_metrics_linger_beyond_the_grace_period_is_refused_at_render():
    # The operator would refuse these settings at start; the chart says so at install instead.
    with pytest.raises(helm_python.HelmError, match="trainerMetricsLingerSeconds must be below"):
        render({"operator": {"trainerMetricsLingerSeconds": 60, "trainerTerminationGracePeriodSeconds": 60}})
    env = _env(one(manifests(render({"operator": {"trainerMetricsLingerSeconds": 0}})), "Deployment"))
    assert env["PJ_TRAINER_METRICS_LINGER_SECONDS"] == "0"


def test_the_hub_cache_claim_reaches_the_operator_settings(default_objects, all_on_objects):
    assert settings_mod.Settings.from_env(_env(one(default_objects, "Deployment"))).hub_cache_claim == ""
    assert settings_mod.Settings.from_env(_env(one(all_on_objects, "Deployment"))).hub_cache_claim == "hf-cache"


def test_every_pj_variable_is_one_the_operator_reads(all_on_objects):
    source = inspect.getsource(settings_mod.Settings.from_env)
    names = [n for n in _env(one(all_on_objects, "Deployment")) if n.startswith("PJ_") and n != "PJ_EXTRA"]
    unread = [n for n in names if f'"{n.removeprefix("PJ_")}"' not in source]
    assert unread == []


# ---- RBAC --------------------------------------------------------------------------------------


def _grants(cluster_role: dict) -> set[tuple[str, str, str]]:
    return {
        (group, resource, verb)
        for rule in cluster_role["rules"]
        for group in rule["apiGroups"]
        for resource in rule["resources"]
        for verb in rule["verbs"]
    }


def _all_grants(objects: list[dict]) -> set[tuple[str, str, str]]:
    """Everything the operator may do somewhere: its ClusterRole and its Roles together."""
    return set().union(*(_grants(o) for o in objects if o["kind"] in ("ClusterRole", "Role")))


@pytest.mark.parametrize("values", ["default", "all_on"])
def test_cluster_role_has_no_wildcards_and_no_secrets(values, default_objects, all_on_objects):
    grants = _all_grants(default_objects if values == "default" else all_on_objects)
    assert not any("*" in g for grant in grants for g in grant)
    assert not any(resource == "secrets" for _, resource, _ in grants)
    # Objects are patched (merge patches), never replaced; `update` only for the finalizers
    # subresource that blockOwnerDeletion needs.
    assert {(g, r) for g, r, v in grants if v == "update"} == {("personalization.dvar.dev", "personalizationjobs/finalizers")}


def test_cluster_role_covers_the_role_the_operator_grants_trainers(default_objects):
    grants = _grants(one(default_objects, "ClusterRole"))
    trainer_role = children.role("demo", "team-a")
    wanted = _grants(trainer_role)
    assert wanted, "the trainer Role grants nothing?"
    assert wanted <= grants, f"RBAC escalation check would refuse the trainer Role: missing {wanted - grants}"


def test_cluster_role_lets_the_operator_create_and_watch_its_children(default_objects):
    grants = _grants(one(default_objects, "ClusterRole"))
    for api_version, kind in [("v1", "ConfigMap"), ("v1", "ServiceAccount"), ("rbac.authorization.k8s.io/v1", "Role"),
                              ("rbac.authorization.k8s.io/v1", "RoleBinding"), ("batch/v1", "Job")]:
        group = api_version.rpartition("/")[0]
        resource = kube.collection_path(api_version, kind, "ns").rsplit("/", 1)[-1]
        assert {(group, resource, "create"), (group, resource, "get")} <= grants, kind
    assert {("batch", "jobs", "list"), ("batch", "jobs", "watch"), ("", "pods", "list"),
            ("", "events", "create"), ("personalization.dvar.dev", "personalizationjobs", "watch"),
            ("scheduling.k8s.io", "priorityclasses", "list")} <= grants


def test_a_namespace_list_gets_roles_per_namespace_and_a_cluster_role_for_cluster_reads_only(
        default_objects, all_on_objects):
    cluster_wide = _grants(one(all_on_objects, "ClusterRole"))
    assert {resource for _, resource, _ in cluster_wide} == {"customresourcedefinitions", "namespaces",
                                                             "priorityclasses"}
    assert not {verb for _, _, verb in cluster_wide} - {"list", "watch"}
    roles = {o["metadata"]["namespace"]: o for o in all_on_objects if o["kind"] == "Role"}
    bindings = {o["metadata"]["namespace"]: o for o in all_on_objects if o["kind"] == "RoleBinding"}
    assert sorted(roles) == sorted(bindings) == ["team-a", "team-b"]
    # Each namespace grants what the cluster-wide install grants on namespaced resources.
    namespaced = _grants(one(default_objects, "ClusterRole")) - cluster_wide
    for namespace, role in roles.items():
        assert _grants(role) == namespaced, namespace
        assert bindings[namespace]["roleRef"] == {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role",
                                                  "name": role["metadata"]["name"]}
        assert bindings[namespace]["subjects"][0]["namespace"] == NAMESPACE
    assert not [o for o in default_objects if o["kind"] in ("Role", "RoleBinding")]


def test_pull_secrets_reach_trainer_pods_and_the_admission_policy_reaches_the_operator(
        default_objects, all_on_objects):
    settings = settings_mod.Settings.from_env(_env(one(all_on_objects, "Deployment")))
    assert settings.trainer_image_pull_secrets == ("registry-credentials", "trainer-registry")
    assert settings.allowed_image_prefixes == ("registry.example.com/ml/",)
    assert settings.allowed_priority_classes == ("batch-low", "batch-high")
    assert settings.pending_deadline_seconds == 1800
    defaults = settings_mod.Settings.from_env(_env(one(default_objects, "Deployment")))
    # By default a job may pick another tag of the configured trainer repository, nothing else.
    assert defaults.allowed_image_prefixes == ("ghcr.io/dvar-dev/personalization-trainer",)
    assert defaults.trainer_image_pull_secrets == ()
    any_image = settings_mod.Settings.from_env(_env(one(manifests(render(
        {"admission": {"allowedImagePrefixes": ["*"]}})), "Deployment")))
    assert any_image.allowed_image_prefixes == ()


def test_namespace_watch_is_granted_only_for_a_namespace_list(default_objects, all_on_objects):
    # kopf lists/watches namespaces only when it serves a namespace list, not cluster-wide.
    assert ("", "namespaces", "watch") not in _grants(one(default_objects, "ClusterRole"))
    assert ("", "namespaces", "watch") in _grants(one(all_on_objects, "ClusterRole"))


def test_binding_binds_the_role_to_the_operator_account(all_on_objects):
    binding = one(all_on_objects, "ClusterRoleBinding")
    assert binding["roleRef"]["name"] == one(all_on_objects, "ClusterRole")["metadata"]["name"]
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": f"{RELEASE}-personalization-operator",
                                    "namespace": NAMESPACE}]


# ---- monitoring wiring -------------------------------------------------------------------------


def test_pod_monitor_selects_the_trainer_pods_the_operator_creates(all_on_objects):
    from personalize.spec import parse_job

    monitor = one(all_on_objects, "PodMonitor")
    job = parse_job({"spec": {"method": "lora", "baseModel": {"builtin": "tiny-world"},
                              "concept": {"images": {"path": "images"}, "classNoun": "dog"}}})
    batch_job = children.job(job, "demo", "team-a", settings_mod.Settings())
    pod = batch_job["spec"]["template"]
    labels = pod["metadata"]["labels"]
    for key, value in monitor["spec"]["selector"]["matchLabels"].items():
        assert labels.get(key) == value
    (endpoint,) = monitor["spec"]["podMetricsEndpoints"]
    port_names = {p["name"] for c in pod["spec"]["containers"] for p in c.get("ports", [])}
    assert endpoint["port"] in port_names
    assert endpoint["honorLabels"] is True
    assert monitor["metadata"]["labels"]["release"] == "kube-prometheus-stack"
    assert monitor["spec"]["namespaceSelector"] == {"matchNames": ["team-a", "team-b"]}


def test_pod_monitor_watches_all_namespaces_by_default():
    objects = manifests(render({"monitoring": {"podMonitor": {"enabled": True}}}))
    assert one(objects, "PodMonitor")["spec"]["namespaceSelector"] == {"any": True}


def test_service_monitor_reaches_the_operator_metrics_port(all_on_objects):
    monitor, service, deploy = (one(all_on_objects, k) for k in ("ServiceMonitor", "Service", "Deployment"))
    svc_labels = service["metadata"]["labels"]
    assert all(svc_labels.get(k) == v for k, v in monitor["spec"]["selector"]["matchLabels"].items())
    assert monitor["spec"]["namespaceSelector"] == {"matchNames": [NAMESPACE]}
    (endpoint,) = monitor["spec"]["endpoints"]
    (svc_port,) = [p for p in service["spec"]["ports"] if p["name"] == endpoint["port"]]
    pod_labels = deploy["spec"]["template"]["metadata"]["labels"]
    assert all(pod_labels.get(k) == v for k, v in service["spec"]["selector"].items())
    (container,) = deploy["spec"]["template"]["spec"]["containers"]
    assert svc_port["targetPort"] in {p["name"] for p in container["ports"]}
    assert monitor["metadata"]["labels"]["release"] == "kube-prometheus-stack"


def test_dashboards_are_labelled_config_maps_holding_the_chart_files(all_on_objects):
    maps = by_kind(all_on_objects, "ConfigMap")
    assert len(maps) == 2
    for cm in maps:
        assert cm["metadata"]["labels"]["grafana_dashboard"] == "1"
        assert cm["metadata"]["namespace"] == "monitoring"
        assert cm["metadata"]["annotations"] == {"grafana_folder": "Personalization"}
        ((key, text),) = cm["data"].items()
        assert json.loads(text) == json.loads((CHART / "dashboards" / key).read_text())


def test_dashboards_can_be_turned_off():
    objects = manifests(render({"monitoring": {"dashboards": {"enabled": False}}}))
    assert by_kind(objects, "ConfigMap") == []


def test_rule_values_reach_the_expressions():
    from ship_helpers import alert_rules, rendered_rule_groups

    groups = rendered_rule_groups({"monitoring": {"prometheusRule": {"stuckFor": "42m", "window": "3h"}}})
    exprs = {r["alert"]: r["expr"] for r in alert_rules(groups)}
    assert "offset 42m" in exprs["PersonalizationJobStuck"]
    assert "[3h]" in exprs["PersonalizationJobsFailing"]


# ---- values.schema.json ------------------------------------------------------------------------


def test_values_schema_accepts_defaults_and_all_on():
    with load_chart() as chart:
        chart.validate_schema(None)
        chart.validate_schema(ALL_ON)


@pytest.mark.parametrize("bad", [
    {"operator": {"maxConcurrentJobs": -1}},
    {"operator": {"watchNamespaces": ["Not_A_Namespace"]}},
    {"operator": {"concurrency": 3}},
    {"monitoring": {"podMonitor": {"interval": "fast"}}},
    {"image": {"operator": {"pullPolicy": "Sometimes"}}},
    {"operator": {"trainerMetricsLingerSeconds": -5}},
], ids=["negative-cap", "bad-namespace", "unknown-key", "bad-duration", "bad-pull-policy", "negative-linger"])
def test_values_schema_rejects_mistakes(bad):
    with load_chart() as chart:
        with pytest.raises(helm_python.HelmValuesError):
            chart.validate_schema(bad)
    # And rendering refuses them too, as `helm install` would.
    with pytest.raises(helm_python.HelmError):
        render(bad)
