"""benchmarks/operator_load.py --scale: the report of steady-state runs at scale."""

from __future__ import annotations

from script_module import load_script

ol = load_script("operator_load", "operator_load_under_test")


def run(by_verb: dict[str, float], quarters=None) -> dict:
    cpu = {"operator": 1.0, "fake_apiserver": 2.0}
    if quarters is not None:
        cpu["operator_by_quarter_of_the_window"] = quarters
    return {"count": 2000, "namespaces": 200,
            "steady_state": {"requests_per_minute": sum(by_verb.values()),
                             "list_requests_per_minute": sum(v for k, v in by_verb.items() if k.startswith("list ")),
                             "requests_per_minute_by_verb_and_resource": by_verb, "cpu_seconds_per_minute": cpu,
                             "operator_rss_mib": 300.0},
            "operator_peak_rss_mib_at_end": 310.0, "never_starting_pod": {"seconds_to_failed": 69.6},
            "command": "python benchmarks/operator_load.py --scale x", "commit": "abc1234",
            "machine": {"cpus": 2, "load_average_at_start": [0.5, 0.5, 0.5]}}


def test_a_listing_pump_is_told_how_often_it_really_ticked_and_older_runs_keep_their_columns():
    report = ol.scale_report({"runs": {
        "before": run({"list personalizationjobs": 2.5, "list jobs": 500.0, "list pods": 500.0}, [5.8, 4.6]),
        "after": run({"watch pods": 1.0}),  # a run from before the CPU was split by quarter
    }})
    rows = {line.split("|")[1].strip(): [c.strip() for c in line.split("|")[2:-1]] for line in report.splitlines()
            if line.startswith("| ") and not line.startswith("| |")}
    assert rows["API requests per minute, steady state"] == ["1002.5", "1.0"]
    assert rows["of which LIST"] == ["1002.5", "0"]
    assert rows["the same, by quarter of the window"] == ["5.8 / 4.6", "-"]
    assert "2.5 ticks a minute, one every 24 s" in report
    assert report.count("ticks a minute") == 1  # the watching run has no pump listings
