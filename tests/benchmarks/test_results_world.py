"""Results name the tiny world they were made on, and the docs cite the installed world's results.

Every results file under benchmarks/results records `world`: the fingerprint of the tiny world
it trained or replayed (personalize/world/provenance.py), or null where no tiny world was
involved (the operator, the chart, synthetic series, random-weight pipelines). A Markdown
report's world is its JSON twin's; a report without one carries a `world:` line.

A results file that README.md or docs/ cite must come from the installed world, unless it lies in
the folder of another world: `first_world/` (the world installed until 2026-11-29) or `fresh/`
(the third world, pretrained without the fresh concepts so that it can score them).
"""

from __future__ import annotations

import gzip
import itertools
import json
import re
from pathlib import Path

import pytest

from personalize.world.provenance import installed_world, world_fingerprint

ROOT = Path(__file__).resolve().parents[2]
RESULTS = ROOT / "benchmarks" / "results"
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
# world_fingerprint of the weights the first commit installed:
# git archive a62e536 trainer/personalize/assets/tiny_world (unchanged until 20c86a3 replaced them).
FIRST_WORLD = "fad6b5104d44"
FINGERPRINT = re.compile(r"^[0-9a-f]{12}$")
MARKDOWN_WORLD = re.compile(r"^world: `([0-9a-f]{12}|null)`", flags=re.M)
TOKEN = re.compile(r"[\w./{},-]+")  # a path, possibly with brace groups: results/a.{json,md}


def other_worlds() -> dict[str, str]:
    """Results folders that hold another world's results, and that world."""
    return {"first_world": FIRST_WORLD, "fresh": world_fingerprint(ROOT / "tinyworld" / "third_world")}


def recorded_world(path: Path) -> tuple[bool, str | None]:
    """(whether the file records a world, the world): JSON `world`, a report's JSON twin, or a `world:` line."""
    if path.suffix == ".md" and path.with_suffix(".json").is_file():
        path = path.with_suffix(".json")
    if path.name.endswith((".json", ".json.gz")):  # recorded run files are gzipped
        data = json.loads(gzip.decompress(path.read_bytes()) if path.suffix == ".gz" else path.read_bytes())
        return (isinstance(data, dict) and "world" in data), (data.get("world") if isinstance(data, dict) else None)
    match = MARKDOWN_WORLD.search(path.read_text())
    return match is not None, (None if match is None or match.group(1) == "null" else match.group(1))


def expand_braces(text: str) -> list[str]:
    """`a.{json,md}` -> a.json, a.md (every brace group, as the shell does)."""
    parts = re.split(r"\{([^{}]*)\}", text)
    choices = [[p] if i % 2 == 0 else p.split(",") for i, p in enumerate(parts)]
    return ["".join(c) for c in itertools.product(*choices)]


def cited_results(text: str, results: Path) -> set[Path]:
    """Results files a document names: a path under benchmarks/results/, a path relative to it,
    or a bare file name found there (every match, where the name is in several folders)."""
    files = [p for p in results.rglob("*") if p.is_file() and "personalization_runs" not in p.parts]
    found = set()
    for token in TOKEN.findall(text):
        for name in expand_braces(token.strip(",.")):
            if not name.endswith((".json", ".md")):
                continue
            name = name.split("benchmarks/results/", 1)[-1].lstrip("./")
            found |= {p for p in files
                      if (rel := p.relative_to(results).as_posix()) == name or rel.endswith("/" + name)}
    return found


def world_problems(results: Path, doc_texts: list[str], installed: str, others: dict[str, str]) -> list[str]:
    """A cited results file that records no world, or another world than its folder's."""
    problems = []
    for path in sorted(set().union(*(cited_results(text, results) for text in doc_texts))):
        rel = path.relative_to(results)
        recorded, world = recorded_world(path)
        expected = others.get(rel.parts[0], installed) if len(rel.parts) > 1 else installed
        if not recorded:
            problems.append(f"{rel}: records no world")
        elif world is not None and world != expected:
            problems.append(f"{rel}: made on world {world}, cited as {expected}'s")
    return problems


def test_every_results_file_records_its_world():
    missing, malformed = [], []
    for path in sorted(RESULTS.rglob("*")):
        if not path.name.endswith((".json", ".json.gz", ".md")):
            continue
        recorded, world = recorded_world(path)
        if not recorded:
            missing.append(str(path.relative_to(RESULTS)))
        elif world is not None and not FINGERPRINT.match(world):
            malformed.append(f"{path.relative_to(RESULTS)}: {world!r}")
    assert missing == [] and malformed == []


@pytest.mark.parametrize("folder", ["first_world", "fresh"])
def test_another_worlds_folder_holds_only_that_worlds_results(folder):
    worlds = {recorded_world(p)[1] for p in (RESULTS / folder).rglob("*.json*")}
    assert worlds == {other_worlds()[folder]}


def test_the_docs_cite_only_the_installed_worlds_results():
    texts = [doc.read_text() for doc in DOCS]
    assert world_problems(RESULTS, texts, installed_world(), other_worlds()) == []


def test_a_cited_result_of_another_world_is_caught(tmp_path):
    """The check above can fail: a top-level result made on another world, cited three ways."""
    (tmp_path / "first_world").mkdir()
    (tmp_path / "stale.json").write_text(json.dumps({"world": "aaaaaaaaaaaa"}))
    (tmp_path / "stale.md").write_text("# stale\n")
    (tmp_path / "first_world" / "old.json").write_text(json.dumps({"world": "aaaaaaaaaaaa"}))
    (tmp_path / "unnamed.md").write_text("# no world line\n")
    (tmp_path / "synthetic.json").write_text(json.dumps({"world": None}))
    others = {"first_world": "aaaaaaaaaaaa"}
    for citation in ("`benchmarks/results/stale.{json,md}`", "(`stale.md`)", "see benchmarks/results/stale.json"):
        problems = world_problems(tmp_path, [citation], "bbbbbbbbbbbb", others)
        assert problems and all(p.startswith("stale.") and "made on world aaaaaaaaaaaa" in p for p in problems)
    assert world_problems(tmp_path, ["`first_world/old.json` and `synthetic.json`"], "bbbbbbbbbbbb", others) == []
    assert world_problems(tmp_path, ["`unnamed.md`"], "bbbbbbbbbbbb", others) == ["unnamed.md: records no world"]
