"""The operator's rows of docs/bad-input.md, each driven through the running operator.

All cases run in one operator session (one fake cluster, one kopf run) created once for the
module; each parametrised test then checks its own resource. The document must hold exactly the
rows that `bad_input_cases.render_rows()` makes from the same list.
"""

from __future__ import annotations

import kopf.testing
import kubernetes
import pytest

from bad_input_cases import CASES, DOC, documented_rows, render_rows
from fake_cluster import FakeCluster, wait_for
from pj_operator.settings import Settings
from pj_operator.validation import validate_job


@pytest.fixture(scope="module")
def outcomes(tmp_path_factory):
    """name -> (status, Warning events, number of Jobs created) after the operator saw every case."""
    cluster = FakeCluster().start()
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("KUBECONFIG", str(cluster.write_kubeconfig(tmp_path_factory.mktemp("kube") / "kubeconfig")))
        mp.delenv("KUBERNETES_SERVICE_HOST", raising=False)
        kubernetes.client.Configuration.set_default(None)
        try:
            args = ["run", "--standalone", "--all-namespaces", "-m", "pj_operator.handlers"]
            with kopf.testing.KopfRunner(args, timeout=60) as runner:
                wait_for(lambda: cluster.watching("personalizationjobs"), what="kopf's watch")
                for case in CASES:
                    cluster.create(case.manifest())

                def settled(name):
                    status = (cluster.pj(name) or {}).get("status") or {}
                    warned = [e for e in cluster.events_for(name) if e["type"] == "Warning"]
                    return status.get("phase") == "Failed" and warned and (status, warned)

                results = {case.resource_name: wait_for(lambda: settled(case.resource_name), what=case.key)
                           for case in CASES}
            assert runner.exception is None, runner.output
            assert cluster.violations == [], cluster.violations  # every case got past the CRD schema
            jobs = len(cluster.creations("jobs"))
        finally:
            cluster.stop()
    return {name: (status, warned, jobs) for name, (status, warned) in results.items()}


@pytest.mark.parametrize("case", CASES, ids=[c.key for c in CASES])
def test_bad_input_is_rejected_with_its_documented_message(case, outcomes):
    # The same message straight from the validator, without a cluster.
    checked = validate_job(case.manifest(), Settings())
    assert not checked.ok and "; ".join(checked.problems) == case.message

    status, warnings, jobs = outcomes[case.resource_name]
    conditions = {c["type"]: c for c in status["conditions"]}
    for type_ in ("Valid", "Failed"):
        assert conditions[type_]["reason"] == "InvalidSpec"
        assert conditions[type_]["message"] == case.message
    assert (conditions["Valid"]["status"], conditions["Failed"]["status"]) == ("False", "True")
    assert [(e["reason"], e["message"]) for e in warnings] == [("InvalidSpec", case.message)]
    assert jobs == 0  # nothing was created for any case


def test_the_document_holds_exactly_these_rows():
    assert len(CASES) >= 10 and len({c.key for c in CASES}) == len(CASES)
    assert DOC.exists(), "run: python tests/operator/bad_input_cases.py"
    assert documented_rows(DOC.read_text()) == render_rows(), "run: python tests/operator/bad_input_cases.py"
