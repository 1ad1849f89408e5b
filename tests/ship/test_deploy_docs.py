"""What README.md and docs/deploy.md show a user is what the project does:

- the README opens with the two commands, the demo's and the contributors' test command;
- every PersonalizationJob in them parses with the spec model, passes the CRD's schema and the
  operator's checks with the settings the chart's default values give it;
- every other Kubernetes object in them (the PVCs, the fetch pod) is valid for Kubernetes;
- every `kubectl get pj` listing is exactly what kubectl prints, from the CRD's printer columns,
  for the statuses its cells show;
- every `status.artifact` they print names the files the trainer writes for that job
  (`output.name`, `output.formats`, `output.snapshotEvery` up to the listed stop step), at the
  location the operator gives it."""

from __future__ import annotations

import datetime
import json
import re
import sys
from pathlib import Path

import jsonschema
import kubernetes_validate
import pytest
import yaml

from personalize.artifacts import artifact_name, at_step, kohya_file
from personalize.methods.lora import LORA_WEIGHTS
from personalize.spec import ArtifactFormat, Phase, StopReason, parse_job
from pj_operator import children, crdgen, validation
from pj_operator.settings import Settings
from ship_helpers import CRD_FILE, ROOT, operator_env

sys.path.insert(0, str(ROOT / "tests" / "operator"))
from kubectl_table import render  # noqa: E402

README = ROOT / "README.md"
DEPLOY = ROOT / "docs" / "deploy.md"
DOCS = [README, DEPLOY]
FENCE = re.compile(r"^```(\w*)\n(.*?)^```", re.S | re.M)
NOW = datetime.datetime(2026, 1, 1, tzinfo=datetime.timezone.utc)


def blocks(doc: Path, *languages: str) -> list[str]:
    return [body for lang, body in FENCE.findall(doc.read_text()) if lang in languages]


def objects(doc: Path) -> list[dict]:
    return [o for body in blocks(doc, "yaml") for o in yaml.safe_load_all(body) if o]


def jobs(doc: Path) -> list[dict]:
    return [o for o in objects(doc) if o.get("kind") == "PersonalizationJob"]


def doc_id(doc: Path) -> str:
    return doc.name


# ---- the README's first lines ------------------------------------------------------------------


def test_the_readme_opens_with_the_demo_and_the_contributors_test_command():
    lines = README.read_text().splitlines()
    assert lines[0].startswith("# ")
    first_block = FENCE.search(README.read_text())
    assert README.read_text().index(first_block.group(0)) == len(lines[0]) + 2  # right under the title
    commands = [line.split("#")[0].strip() for line in first_block.group(2).splitlines()]
    assert commands == ["bash demo.sh", "bash tools/test.sh"]
    assert "contributors" in first_block.group(2).splitlines()[1]
    assert (ROOT / "demo.sh").is_file() and (ROOT / "tools" / "test.sh").is_file()
    ci = ROOT / ".ci" / "run"
    if ci.exists():  # CI runs the same test command the README gives
        assert "tools/test.sh" in ci.read_text()


def test_the_readme_shows_the_demos_pictures_and_keeps_them_small():
    text = README.read_text()
    for picture in ("docs/images/demo_strip.png", "docs/images/demo_convergence.png"):
        assert f"]({picture})" in text
        assert (ROOT / picture).stat().st_size < 200_000, picture


# ---- the manifests -----------------------------------------------------------------------------


def test_the_readme_job_reads_photos_from_s3_and_a_hub_model_and_writes_both_formats():
    (job,) = jobs(README)
    spec = parse_job(job).spec
    assert spec.concept.images.uri.startswith("s3://") and spec.concept.images.secret_ref
    assert spec.base_model.hub_id
    assert spec.output.formats == [ArtifactFormat.diffusers, ArtifactFormat.kohya]


@pytest.mark.parametrize("doc", DOCS, ids=doc_id)
def test_every_job_is_accepted_by_the_spec_the_crd_and_the_operator_with_the_charts_defaults(doc):
    found = jobs(doc)
    assert found
    crd = yaml.safe_load(CRD_FILE.read_text())
    (version,) = [v for v in crd["spec"]["versions"] if v["storage"]]
    settings = Settings.from_env(operator_env())
    for manifest in found:
        parse_job(manifest)
        jsonschema.Draft4Validator(version["schema"]["openAPIV3Schema"]).validate(manifest)
        checked = validation.validate_job({**manifest, "metadata": {**manifest["metadata"], "uid": "0000-doc"}}, settings)
        assert checked.problems == [], checked.problems


def test_the_claims_and_the_fetch_pod_on_the_deploy_page_are_valid_kubernetes_objects():
    others = [o for o in objects(DEPLOY) if o.get("kind") != "PersonalizationJob"]
    assert {o["kind"] for o in others} == {"PersistentVolumeClaim", "Pod"}
    for obj in others:
        kubernetes_validate.validate(obj, "1.28", strict=True)
    claims = {o["metadata"]["name"] for o in others if o["kind"] == "PersistentVolumeClaim"}
    (job,) = jobs(DEPLOY)
    assert job["spec"]["output"]["claimName"] in claims


# ---- kubectl get pj ----------------------------------------------------------------------------


def listings(doc: Path) -> list[list[str]]:
    """Each table printed after a `kubectl get pj` command: its header and rows."""
    found = []
    for body in blocks(doc, "console"):
        lines = body.splitlines()
        for i, line in enumerate(lines):
            if re.match(r"\$ kubectl get pj( |$)", line) and "-o" not in line.split("#")[0]:
                table = []
                for row in lines[i + 1:]:
                    if row.startswith("$"):
                        break
                    table.append(row)
                found.append(table)
    return found


def _cells(header: str, row: str) -> dict[str, str]:
    starts = [m.start() for m in re.finditer(r"(?<!\S)\S+(?: \S+)*", header)]
    names = [header[s:e].strip() for s, e in zip(starts, starts[1:] + [len(header)])]
    return {n: row[s:e].strip() for n, s, e in zip(names, starts, starts[1:] + [None])}


def _age_to_timestamp(age: str) -> str:
    amount, unit = int(age[:-1]), age[-1]
    seconds = amount * {"s": 1, "m": 60, "h": 3600, "d": 86400}[unit]
    return (NOW - datetime.timedelta(seconds=seconds)).isoformat().replace("+00:00", "Z")


def _object(columns: list[dict], cells: dict[str, str]) -> dict:
    """The resource whose printer-column cells are `cells` (each jsonPath set from its cell)."""
    obj: dict = {"metadata": {"name": cells["NAME"]}}
    for column in columns:
        value = cells[column["name"].upper()]
        if not value:
            continue
        if column["type"] == "integer":
            value = int(value)
        elif column["type"] == "number":
            value = float(value)
        elif column["type"] == "date":
            value = _age_to_timestamp(value)
        *parents, leaf = column["jsonPath"].lstrip(".").split(".")
        node = obj
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = value
    return obj


@pytest.mark.parametrize("doc", DOCS, ids=doc_id)
def test_every_kubectl_get_pj_listing_is_what_kubectl_prints_for_its_statuses(doc):
    columns = [c for c in crdgen.build_crd()["spec"]["versions"][0]["additionalPrinterColumns"] if not c.get("priority")]
    tables = listings(doc)
    assert tables
    for table in tables:
        header, *rows = table
        assert rows
        objs = [_object(columns, _cells(header, row)) for row in rows]
        for obj in objs:
            status = obj["status"]
            assert Phase(status["phase"])
            if "earlyStop" in status:
                assert StopReason(status["earlyStop"]["reason"])
                assert status["phase"] in ("Succeeded", "Failed") and "eta" not in status.get("progress", {})
            for key in ("elapsed", "eta"):
                assert re.fullmatch(r"\d+:\d\d:\d\d", status.get("progress", {}).get(key, "0:00:00")), key
        assert "\n".join(table) == render(columns, objs, now=NOW)


# ---- status.artifact ---------------------------------------------------------------------------


def _printed_artifacts(doc: Path) -> list[tuple[str, dict]]:
    found = []
    for body in blocks(doc, "console"):
        lines = body.splitlines()
        for line, after in zip(lines, lines[1:]):
            match = re.match(r"\$ kubectl get pj (\S+) .*jsonpath='\{\.status\.artifact\}'", line)
            if match:
                found.append((match.group(1), json.loads(after)))
    return found


def _stop_step(doc: Path, name: str) -> int:
    for header, *rows in listings(doc):
        for row in rows:
            cells = _cells(header, row)
            if cells["NAME"] == name and cells["STOP REASON"]:
                return int(cells["STEP"])
    raise AssertionError(f"{doc.name}: no finished listing of {name}")


@pytest.mark.parametrize("doc", DOCS, ids=doc_id)
def test_the_printed_artifact_is_what_the_trainer_writes_for_that_job(doc):
    printed = _printed_artifacts(doc)
    assert printed
    for name, artifact in printed:
        (job,) = [j for j in jobs(doc) if j["metadata"]["name"] == name]
        spec = parse_job(job).spec
        assert spec.method.value == "lora"  # the names below are the LoRA's
        lora = artifact_name(LORA_WEIGHTS, spec.output.name)
        files = ([lora] if ArtifactFormat.diffusers in spec.output.formats else []) + \
                ([kohya_file(lora)] if ArtifactFormat.kohya in spec.output.formats else [])
        every, stop = spec.output.snapshot_every, _stop_step(doc, name)
        snapshots = sorted(at_step(f, s) for f in files for s in range(every, stop, every)) if every else []
        location = spec.output.uri or children.output_dir(spec)
        assert artifact == {"files": files, "location": location, "snapshots": snapshots}
        # The load snippets use those names.
        assert f'weight_name="{lora}"' in doc.read_text()
        if ArtifactFormat.kohya in spec.output.formats:
            assert f"<lora:{Path(kohya_file(lora)).stem}:1>" in doc.read_text()
