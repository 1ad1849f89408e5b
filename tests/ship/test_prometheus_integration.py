"""A real Prometheus (Debian's package) scraping a real tiny `personalize-train` run, the
operator's metrics module and two scripted trainers, with the chart's alert rules loaded.

Checks: the trainer's series arrive with the contract labels; every PromQL expression of every
dashboard panel and every alert rule parses and returns data; Prometheus evaluates the rules
without errors and raises every alert; `promtool check metrics` accepts both expositions; and
`promtool test rules` passes the alert unit tests (charts/personalization-operator/tests/).
"""

from __future__ import annotations

import shutil

import pytest
import yaml

from prom_harness import PROMETHEUS, PROMTOOL, PromQLError, promtool
from ship_helpers import (
    CHART,
    alert_rules,
    dashboard_queries,
    dashboard_variable_queries,
    dashboards,
    grafana_substitute,
    rendered_rule_groups,
)

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        PROMETHEUS is None or PROMTOOL is None,
        reason="prometheus/promtool are not installed (apt-get install -y prometheus; .ci/run does this)",
    ),
]

TRAINER_METRICS = {
    "personalization_deterministic_loss",
    "personalization_training_loss",
    "personalization_convergence_value",
    "personalization_convergence_threshold",
    "personalization_step",
    "personalization_max_steps",
    "personalization_early_stopped",
    "personalization_step_duration_seconds_bucket",
    "personalization_step_duration_seconds_sum",
    "personalization_step_duration_seconds_count",
    "personalization_evaluation_duration_seconds_bucket",
    "personalization_evaluation_duration_seconds_sum",
    "personalization_evaluation_duration_seconds_count",
    "personalization_timestep_deterministic_loss",
    "personalization_timestep_deterministic_loss_ratio",
    "personalization_learning_rate",
    "personalization_gradient_norm",
    "personalization_update_ratio",
    "personalization_update_cosine",
    "personalization_adam_snr",
    "personalization_sample_duration_seconds_sum",
}
OPERATOR_METRICS = {
    "personalization_jobs": "phase",
    "personalization_job_completions_total": "reason",
    "personalization_steps_saved_total": "method",
    "personalization_gpu_seconds_saved_total": "method",
    "personalization_tracking_gpu_seconds_total": "method",
    "personalization_reconcile_errors_total": "handler",
    "personalization_job_info": "token",
    "personalization_job_queue_wait_seconds": "personalizationjob",
}
# The dashboards' time range when their queries are replayed (covers the whole session).
RANGE = {"$__range": "5m"}


@pytest.fixture(scope="module")
def live(tmp_path_factory):
    import live_session

    session = live_session.start(tmp_path_factory.mktemp("live-prometheus"))
    try:
        yield session
    finally:
        session.close()


def test_the_tiny_trainer_ran_and_stopped_early(live):
    assert live.trainer_returncode == 0, live.trainer_log[-3000:]
    assert live.first_step_wall is not None and live.first_sample_wall is not None
    stopped = live.prom.query('personalization_early_stopped{job="trainer"}', at=live.eval_time)
    assert [s["value"][1] for s in stopped] == ["1"]


def test_trainer_series_arrive_with_the_contract_labels(live):
    series = live.prom.query('{job="trainer", __name__=~"personalization_.+"}', at=live.eval_time)
    names = {s["metric"]["__name__"] for s in series}
    assert TRAINER_METRICS <= names, f"missing: {TRAINER_METRICS - names}"
    for s in series:
        labels = s["metric"]
        assert labels["namespace"] == "ship-test"  # the trainer's own label (honor_labels)
        assert labels["personalizationjob"] == "live-ti"
        assert labels["method"] == "textualInversion"
        assert labels["criterion"] == "dvar"


def test_trainer_values_follow_the_run(live):
    def value(name: str) -> float:
        (s,) = live.prom.query(f'{name}{{job="trainer"}}', at=live.eval_time)
        return float(s["value"][1])

    assert value("personalization_max_steps") == 300
    assert 120 <= value("personalization_step") < 300  # not before minSteps
    assert value("personalization_convergence_threshold") == pytest.approx(0.9)
    assert value("personalization_convergence_value") < 0.9
    assert value("personalization_step_duration_seconds_count") >= value("personalization_step") - 1


def test_operator_series_arrive_with_their_labels(live):
    for name, label in OPERATOR_METRICS.items():
        series = live.prom.query(f'{name}{{job="operator"}}', at=live.eval_time)
        assert series, name
        assert all(label in s["metric"] for s in series), name
    phases = {s["metric"]["phase"] for s in live.prom.query('personalization_jobs{job="operator"} > 0', at=live.eval_time)}
    assert {"Running", "Queued", "Pending", "Succeeded", "Failed"} <= phases
    # the scripted finished job reports its stages' tracking time: counted for its method only
    tracked = live.prom.query('personalization_tracking_gpu_seconds_total{job="operator"} > 0', at=live.eval_time)
    assert {s["metric"]["method"] for s in tracked} == {"textualInversion"}


def test_an_invalid_expression_is_reported_as_a_parse_error(live):
    """The checks below rely on a bad expression raising, not returning an empty result."""
    with pytest.raises(PromQLError, match="bad_data"):
        live.prom.query("sum by (method personalization_step")


def test_every_dashboard_query_parses_and_returns_data(live):
    empty = []
    count = 0
    for file, dashboard in dashboards().items():
        for where, expr in dashboard_queries(dashboard):
            count += 1
            if not live.prom.query(grafana_substitute(expr, RANGE), at=live.eval_time):
                empty.append(f"{file} {where}: {expr}")
    assert count >= 15
    assert empty == []


def test_dashboard_variables_offer_the_live_job(live):
    (dashboard,) = [d for d in dashboards().values() if any(v["name"] == "pj" for v in d["templating"]["list"])]
    offered = {}
    for name, query in dashboard_variable_queries(dashboard):
        # label_values(selector, label) is Grafana's call of the label-values API.
        inner = query.removeprefix("label_values(").removesuffix(")")
        selector, _, label = inner.rpartition(",")
        selector = grafana_substitute(selector.strip())
        offered[name] = live.prom.api(f"label/{label.strip()}/values", **{"match[]": selector})
    assert "ship-test" in offered["namespace"]
    assert "live-ti" in offered["pj"]


def test_stop_step_panel_shows_where_the_trainer_stopped(live):
    (panel,) = [p for d in dashboards().values() for p in d["panels"] if p["title"] == "Stop step"]
    (result,) = [r for r in live.prom.query(grafana_substitute(panel["targets"][0]["expr"], RANGE), at=live.eval_time)
                 if r["metric"]["personalizationjob"] == "live-ti"]
    result_json = (live.workdir / "output" / "result.json").read_text()
    stop_step = yaml.safe_load(result_json)["earlyStop"]["step"]
    assert float(result["value"][1]) == stop_step


# Which job each alert must find in the live data.
EXPECTED_ALERTS = {
    "PersonalizationJobStuck": ("personalizationjob", "hung"),
    "PersonalizationJobNotConverging": ("personalizationjob", "budget"),
    "PersonalizationJobNeverConverged": ("personalizationjob", "budget"),
    "PersonalizationJobsFailing": ("reason", "OOMKilled"),
    "PersonalizationOperatorReconcileErrors": ("handler", "on_create_or_resume"),
}


def test_every_alert_expression_parses_and_finds_its_job(live):
    rules = alert_rules(yaml.safe_load(live.rules_file.read_text()))
    assert {r["alert"] for r in rules} == set(EXPECTED_ALERTS)
    for rule in rules:
        result = live.prom.query(rule["expr"], at=live.eval_time)
        label, value = EXPECTED_ALERTS[rule["alert"]]
        assert [r["metric"][label] for r in result] == [value], rule["alert"]


def test_alert_expressions_stay_quiet_for_the_healthy_live_job(live):
    for rule in alert_rules(yaml.safe_load(live.rules_file.read_text())):
        result = live.prom.query(rule["expr"], at=live.eval_time)
        assert not any(r["metric"].get("personalizationjob") == "live-ti" for r in result), rule["alert"]


def test_prometheus_evaluates_the_rules_and_raises_every_alert(live):
    rules = [r for g in live.prom.api("rules")["groups"] for r in g["rules"]]
    assert {r["name"] for r in rules} == set(EXPECTED_ALERTS)
    assert all(r["health"] == "ok" for r in rules), [(r["name"], r.get("lastError")) for r in rules]
    active = {a["labels"]["alertname"] for a in live.prom.api("alerts")["alerts"] if a["state"] in ("pending", "firing")}
    assert active == set(EXPECTED_ALERTS)


@pytest.mark.parametrize("which", ["trainer", "operator"])
def test_promtool_accepts_the_exposition(live, which):
    text = live.trainer_exposition if which == "trainer" else live.operator_exposition
    assert "personalization_" in text
    result = promtool("check", "metrics", stdin=text.encode())
    assert result.returncode == 0, (result.stdout + result.stderr).decode()


def test_promtool_rejects_a_badly_named_counter():
    """`check metrics` must be able to fail for the test above to mean something."""
    bad = b"# HELP personalization_completions Jobs.\n# TYPE personalization_completions counter\npersonalization_completions 1\n"
    assert promtool("check", "metrics", stdin=bad).returncode != 0


# ---- promtool unit tests of the alert rules (no live data needed) ------------------------------

UNIT_TESTS = CHART / "tests" / "alerts_test.yaml"


def test_promtool_unit_tests_pass_on_the_rendered_rules(tmp_path):
    groups = rendered_rule_groups()
    (tmp_path / "alerts.rules.yaml").write_text(yaml.safe_dump(groups, sort_keys=False))
    shutil.copy(UNIT_TESTS, tmp_path / UNIT_TESTS.name)
    check = promtool("check", "rules", str(tmp_path / "alerts.rules.yaml"))
    assert check.returncode == 0, (check.stdout + check.stderr).decode()
    result = promtool("test", "rules", UNIT_TESTS.name, cwd=tmp_path)
    assert result.returncode == 0, (result.stdout + result.stderr).decode()


def test_every_alert_has_a_firing_and_a_quiet_unit_test():
    tests = yaml.safe_load(UNIT_TESTS.read_text())["tests"]
    cases = [case for t in tests for case in t.get("alert_rule_test", [])]
    for rule in alert_rules(rendered_rule_groups()):
        mine = [c for c in cases if c["alertname"] == rule["alert"]]
        assert any(c["exp_alerts"] for c in mine), f"{rule['alert']}: no test where it fires"
        assert any(not c["exp_alerts"] for c in mine), f"{rule['alert']}: no test where it stays quiet"


def test_unit_tests_catch_a_broken_rule(tmp_path):
    """Mutate one rule (drop the 'new counter series' half of the failure alert): the tests fail."""
    groups = rendered_rule_groups()
    for rule in alert_rules(groups):
        if rule["alert"] == "PersonalizationJobsFailing":
            rule["expr"] = 'sum by (namespace, reason) (increase(personalization_job_completions_total{reason!~"ConvergenceThreshold|MaxSteps|Completed"}[30m])) > 0'
    (tmp_path / "alerts.rules.yaml").write_text(yaml.safe_dump(groups, sort_keys=False))
    shutil.copy(UNIT_TESTS, tmp_path / UNIT_TESTS.name)
    assert promtool("test", "rules", UNIT_TESTS.name, cwd=tmp_path).returncode != 0
