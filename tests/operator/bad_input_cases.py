"""The operator's rows of the bad-input table (docs/bad-input.md), kept in one list.

Each case is a PersonalizationJob that the CRD schema accepts (so `kubectl apply` succeeds) but
the operator rejects before creating anything: the resource goes to phase Failed with
`Valid=False` / `Failed=True`, reason `InvalidSpec`, and this exact message, plus a Warning
Event `InvalidSpec` with the same message. `test_bad_input_table.py` drives every case through
the operator and checks that the document's rows are exactly `render_rows()`.
The trainer's rows (T1, T2, ...) live in tests/trainer/trainer_bad_input_cases.py; this script
writes both tables.

    python tests/operator/bad_input_cases.py      # rewrite the operator and trainer rows in docs/bad-input.md
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/: the shared table format
import bad_input_table as table  # noqa: E402
from bad_input_table import DOC, HEADER  # noqa: E402
INTRO = """# Bad input: what the user sees

Two tables: the operator's rows (`O1`...) and, below them, the trainer's (`T1`...).

Rows `O1`, `O2`, ... are rejected by the operator before it creates anything (the CRD schema
accepts them, so `kubectl apply` succeeds): the PersonalizationJob goes to phase `Failed` with
conditions `Valid=False` and `Failed=True`, reason `InvalidSpec` and the message shown (one
`field: problem` per problem, joined by `; `), and a Warning Event `InvalidSpec` with the same
message; no Job, ConfigMap or RBAC object is created. Fixing the spec lets the job proceed.
Their input column lists what is set on top of an otherwise valid textualInversion job.
These rows are generated from `tests/operator/bad_input_cases.py`
(`python tests/operator/bad_input_cases.py`); `tests/operator/test_bad_input_table.py` drives
each through the running operator.

"""

PREFIX = "O"  # the operator's rows are numbered O1, O2, ...

CONCEPT_PVC = {"path": "concept", "claimName": "concept-images"}
KUEUE_LABEL = "kueue.x-k8s.io/queue-name"
# Kueue is off by default (as the chart's operator.kueue.enabled).
KUEUE_OFF = ("{}: Kueue integration is disabled in this operator (PJ_KUEUE_ENABLED); "
             "the chart value operator.kueue.enabled turns it on")


@dataclass(frozen=True)
class Case:
    key: str  # also the resource's name in the test (a DNS label), unless `name` is given
    area: str
    spec: dict[str, Any]  # overrides of fake_cluster.pj_manifest's spec
    message: str  # the exact condition message
    name: str = ""
    labels: dict[str, str] = field(default_factory=dict)  # metadata.labels of the resource

    @property
    def resource_name(self) -> str:
        return self.name or self.key

    def manifest(self) -> dict[str, Any]:
        """The resource as the test creates it."""
        from fake_cluster import pj_manifest

        manifest = pj_manifest(self.resource_name, **self.spec)
        if self.labels:
            manifest["metadata"]["labels"] = dict(self.labels)
        return manifest


CASES: list[Case] = [
    Case("window-too-long", "spec", {"earlyStopping": {"window": 500}},
         "spec.earlyStopping.window: 500 steps is not below maxSteps 400, so the criterion could never stop "
         "early (lower the window or use criterion: none)"),
    Case("eval-every-beyond-window", "spec", {"earlyStopping": {"window": 60, "evalEvery": 100}},
         "spec.earlyStopping.evalEvery: 100 is larger than the window (60 steps)"),
    Case("min-steps-beyond-default", "spec", {"method": "lora", "training": {"minSteps": 1500}},
         "spec.training.minSteps: 1500 exceeds the resolved maxSteps 1000 of method lora"),
    Case("section-of-other-method", "spec", {"lora": {"rank": 8}},
         "spec.lora: only used by method lora, not by textualInversion"),
    Case("prompt-needs-class-noun", "spec",
         {"concept": {"images": CONCEPT_PVC, "initializerToken": "dog", "captionTemplate": "a photo of {token}"},
          "validation": {"prompts": ["a photo of {token} {class_noun}"]}},
         "spec.validation.prompts[0]: uses {class_noun} but concept.classNoun is not set"),
    Case("prior-preservation-ti", "spec", {"priorPreservation": {"enabled": True}},
         "spec: priorPreservation.enabled: not supported by method textualInversion"),
    Case("name-not-dns-label", "spec", {},
         "metadata.name: 'cat.v2' must be a DNS label of at most 63 characters", name="cat.v2"),
    Case("model-two-sources", "model", {"baseModel": {"path": "models/sd", "hubId": "org/sd"}},
         "spec.baseModel: set exactly one of path, hubId, builtin"),
    Case("images-two-sources", "images", {"concept": {"images": {"path": "c", "uri": "s3://b/c"}, "classNoun": "dog"}},
         "spec.concept.images: set exactly one of path, uri"),
    Case("images-ftp-scheme", "images", {"concept": {"images": {"uri": "ftp://host/cat"}, "classNoun": "dog"}},
         "spec.concept.images: URI scheme 'ftp' is not allowed; use one of s3, gs, https"),
    Case("images-path-escape", "images",
         {"concept": {"images": {"path": "../../etc", "claimName": "concept-images"}, "classNoun": "dog"}},
         "spec.concept.images: '../../etc' must not contain '..'"),
    Case("images-uri-credentials", "images",
         {"concept": {"images": {"uri": "s3://KEY:hunter2@photos/cat"}, "classNoun": "dog"}},
         "spec.concept.images: URI must not contain credentials, a query string or a fragment; reference a "
         "Secret with secretRef instead"),
    Case("images-presigned-url", "images",
         {"concept": {"images": {"uri": "https://photos.example.com/cat?X-Amz-Signature=abc"}, "classNoun": "dog"}},
         "spec.concept.images: URI must not contain credentials, a query string or a fragment; reference a "
         "Secret with secretRef instead"),
    Case("output-absolute-path", "output", {"output": {"path": "/etc", "claimName": "artifacts"}},
         "spec.output: '/etc' must be relative to the volume when claimName is set"),
    Case("output-path-escape", "output", {"output": {"path": "runs/../../other-team", "claimName": "artifacts"}},
         "spec.output: 'runs/../../other-team' must not contain '..'"),
    Case("output-file-scheme", "output",
         {"output": {"path": "runs/x", "claimName": "artifacts", "uri": "file:///var/data"}},
         "spec.output: URI scheme 'file' is not allowed; use one of s3, gs, https"),
    Case("output-bad-claim-name", "output", {"output": {"path": "runs/x", "claimName": "Not_A_Name"}},
         "spec.output.claimName: 'Not_A_Name' is not a valid PersistentVolumeClaim name"),
    Case("output-bad-secret-name", "output",
         {"output": {"path": "runs/x", "claimName": "artifacts", "uri": "s3://b/x",
                     "secretRef": {"name": "My_Secret"}}},
         "spec.output.secretRef.name: 'My_Secret' is not a valid Secret name"),
    Case("node-selector-key", "resources", {"resources": {"nodeSelector": {"gpu type": "a100"}}},
         "spec.resources.nodeSelector: 'gpu type' is not a valid label key"),
    Case("node-selector-value", "resources", {"resources": {"nodeSelector": {"zone": "eu west"}}},
         "spec.resources.nodeSelector.zone: 'eu west' is not a valid label value"),
    Case("toleration-exists-value", "resources",
         {"resources": {"tolerations": [{"key": "nvidia.com/gpu", "operator": "Exists", "value": "yes"}]}},
         "spec.resources.tolerations[0]: value must be empty when operator is Exists"),
    Case("toleration-seconds", "resources",
         {"resources": {"tolerations": [{"key": "spot", "operator": "Exists", "effect": "NoSchedule",
                                         "tolerationSeconds": 60}]}},
         "spec.resources.tolerations[0]: tolerationSeconds only applies to effect NoExecute"),
    Case("priority-class-name", "resources", {"resources": {"priorityClassName": "Urgent!"}},
         "spec.resources.priorityClassName: 'Urgent!' is not a valid name"),
    Case("queue-name-label", "resources", {"queueName": "gpu queue"},
         "spec.queueName: 'gpu queue' is not a valid label value; " + KUEUE_OFF.format("spec.queueName")),
    Case("pull-secret-name", "resources", {"imagePullSecrets": ["Registry_Creds"]},
         "spec.imagePullSecrets[0]: 'Registry_Creds' is not a valid Secret name"),
    Case("pod-annotation-key", "resources", {"podAnnotations": {"safe to evict": "false"}},
         "spec.podAnnotations: 'safe to evict' is not a valid annotation key"),
    Case("system-priority-class", "policy", {"resources": {"priorityClassName": "system-cluster-critical"}},
         "spec.resources.priorityClassName: 'system-cluster-critical' is reserved for cluster-critical pods"),
    Case("queue-label-kueue-off", "resources", {}, KUEUE_OFF.format(f"metadata.labels[{KUEUE_LABEL!r}]"),
         labels={KUEUE_LABEL: "gpu-queue"}),
    Case("queue-label-disagrees", "resources", {"queueName": "gpu-a"},
         f"spec.queueName: 'gpu-a' differs from the label {KUEUE_LABEL}='gpu-b'; name one queue; "
         + KUEUE_OFF.format("spec.queueName"), labels={KUEUE_LABEL: "gpu-b"}),
    Case("service-account-name", "resources", {"serviceAccountName": "Trainer_SA"},
         "spec.serviceAccountName: 'Trainer_SA' is not a valid ServiceAccount name"),
]


def describe_input(case: Case) -> str:
    """The input column: the spec fields the case sets (or the name, or the labels), as compact JSON."""
    if case.name:
        return f"`metadata.name: {case.name}`"
    given = [f"`metadata.labels: {json.dumps(case.labels)}`"] if case.labels else []
    if case.spec or not given:
        given.append(f"`{json.dumps(case.spec, separators=(', ', ': '))}`")
    return " and ".join(given)


def render_rows() -> str:
    return table.render_rows(PREFIX, [(c.area, describe_input(c), f"`InvalidSpec`: `{c.message}`") for c in CASES])


def documented_rows(text: str) -> str:
    """The operator's rows as they are in the document."""
    return table.documented_rows(text, PREFIX)


def write_doc(path: Path = DOC) -> None:
    """Replace the operator rows where they are (or append them to the table); other rows stay."""
    text = path.read_text() if path.exists() else INTRO + HEADER
    if HEADER.splitlines()[0] not in text:
        text = text.rstrip("\n") + "\n\n" + HEADER
    replaced = table.replace_rows(text, PREFIX, render_rows())
    path.write_text(replaced if replaced is not None else text.rstrip("\n") + "\n" + render_rows())


def main(path: Path = DOC) -> None:
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "trainer"))
    import trainer_bad_input_cases as trainer_cases  # torch-free, like this module

    write_doc(path)
    trainer_cases.write_doc(path)
    print(f"wrote {len(CASES)} operator rows and {len(trainer_cases.CASES)} trainer rows to {path}")


if __name__ == "__main__":
    main(Path(sys.argv[1]) if len(sys.argv) > 1 else DOC)
