"""The README and docs/*.md point only at what the repository has: every relative link (and its
#anchor, against the target's headings as GitHub renders them) and every backticked repository
path (`trainer/personalize/spec.py`, `benchmarks/results/personalization_{dev,test}.md`,
`examples/<method>.yaml`) must exist. A path starts with one of the repository's top-level
entries; folders .gitignore lists at the root (demo-output/, ...) are a run's output, not the
repository's, and are not checked."""

from __future__ import annotations

import itertools
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]

# Files a run writes into the repository that no run has written yet: each names the script that
# writes it, and that script must name the file.
WRITTEN_BY_RUNS = {
    "benchmarks/results/image_sizes.json": "docker/image_sizes.py",
    "benchmarks/results/image_sizes.md": "docker/image_sizes.py",
    "benchmarks/results/packing.md": "benchmarks/packing.py",
}

LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)")
TICKED = re.compile(r"`([^`\s]+)`")
FENCE = re.compile(r"^```.*?^```", re.S | re.M)


def _ignored_roots() -> set[str]:
    lines = (ROOT / ".gitignore").read_text().splitlines()
    return {line.strip("/") for line in lines if line.startswith("/") and "*" not in line}


TOP_LEVEL = {p.name for p in ROOT.iterdir() if not p.name.startswith(".")} - _ignored_roots()


def _expand_braces(text: str) -> list[str]:
    """`a.{json,md}` -> a.json, a.md (every brace group, combined)."""
    parts = re.split(r"\{([^{}]*,[^{}]*)\}", text)
    choices = [[p] if i % 2 == 0 else p.split(",") for i, p in enumerate(parts)]
    return ["".join(c) for c in itertools.product(*choices)]


def _exists(path: str) -> bool:
    """A path, or a pattern with `*` or a `<placeholder>`, that matches at least one file."""
    pattern = re.sub(r"<[^<>/]+>", "*", path).rstrip("/")
    if "*" in pattern:
        return any(ROOT.glob(pattern))
    return (ROOT / pattern).exists() or path in WRITTEN_BY_RUNS


def _slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces to hyphens."""
    text = re.sub(r"[^\w\- ]", "", heading.strip().lower())
    return text.replace(" ", "-")


def _anchors(path: Path) -> set[str]:
    seen: dict[str, int] = {}
    anchors = set()
    for line in FENCE.sub("", path.read_text()).splitlines():
        match = re.match(r"#{1,6}\s+(.*)", line)
        if match:
            slug = _slug(match.group(1))
            anchors.add(slug if slug not in seen else f"{slug}-{seen[slug]}")
            seen[slug] = seen.get(slug, 0) + 1
    return anchors


def repo_paths(text: str) -> list[str]:
    """The backticked tokens of a document that name a place in the repository."""
    found = []
    for token in TICKED.findall(text):
        token = token.rstrip(".,:;")
        if "/" in token and token.split("/")[0] in TOP_LEVEL and "://" not in token:
            found.extend(_expand_braces(token))
    return found


@pytest.mark.parametrize("doc", DOCS, ids=[str(d.relative_to(ROOT)) for d in DOCS])
def test_every_relative_link_and_its_anchor_exist(doc):
    broken = []
    for target in LINK.findall(FENCE.sub("", doc.read_text())):
        if re.match(r"[a-z][a-z0-9+.-]*:", target):  # https:, mailto:, ...
            continue
        path, _, anchor = target.partition("#")
        file = (doc.parent / path).resolve() if path else doc
        if not file.exists():
            broken.append(target)
        elif anchor and file.suffix == ".md" and anchor not in _anchors(file):
            broken.append(f"{target} (no such heading)")
    assert broken == [], f"{doc.name}: {broken}"


@pytest.mark.parametrize("doc", DOCS, ids=[str(d.relative_to(ROOT)) for d in DOCS])
def test_every_backticked_repository_path_exists(doc):
    missing = [p for p in repo_paths(doc.read_text()) if not _exists(p)]
    assert missing == [], f"{doc.name}: {missing}"


def test_files_written_by_runs_are_named_by_the_script_that_writes_them():
    for path, script in WRITTEN_BY_RUNS.items():
        text = (ROOT / script).read_text()
        name = Path(path)
        assert name.name in text or f"{name.stem}.{{" in text, (path, script)


def test_the_checker_finds_what_is_missing():
    """The checks above can fail: a made-up path, a brace group with one missing member, a
    placeholder that matches nothing and a heading that does not exist are all caught."""
    assert not _exists("trainer/personalize/no_such_module.py")
    assert [p for p in repo_paths("`benchmarks/results/demo.{md,txt}`") if not _exists(p)] == ["benchmarks/results/demo.txt"]
    assert not _exists("examples/<method>.yml")
    assert _exists("examples/<method>.yaml")
    assert "packing" in _anchors(ROOT / "docs" / "operator.md")
    assert "no-such-heading" not in _anchors(ROOT / "docs" / "operator.md")
    assert repo_paths("`demo-output/result.json` `s3://bucket/x` `personalize/spec.py`") == []
