"""Invariants of the Dockerfile (no Docker engine runs here, so the file itself is checked):
the two targets exist, each final stage runs as a non-root user, each entrypoint is a console
script pyproject.toml declares, base images are pinned by tag, every installed package is pinned,
and the build context (.dockerignore) holds what the COPY instructions need."""

from __future__ import annotations

import json
import re
import shlex
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from packaging.requirements import Requirement

from ship_helpers import ROOT

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    tomllib = pytest.importorskip("tomli")

DOCKERFILE = ROOT / "Dockerfile"
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())


@dataclass
class Stage:
    name: str
    base: str
    instructions: list[tuple[str, str]] = field(default_factory=list)

    def all(self, keyword: str) -> list[str]:
        return [args for kw, args in self.instructions if kw == keyword]


def parse_dockerfile(text: str) -> tuple[dict[str, str], list[Stage]]:
    """(global ARG defaults, stages) from a Dockerfile; joins continuation lines, drops comments."""
    logical: list[str] = []
    current = ""
    for raw in text.splitlines():
        line = raw.strip()
        if not current and (not line or line.startswith("#")):
            continue
        if line.startswith("#"):  # a comment inside a continued instruction
            continue
        if line.endswith("\\"):
            current += line[:-1] + " "
            continue
        logical.append(current + line)
        current = ""
    global_args: dict[str, str] = {}
    stages: list[Stage] = []
    for line in logical:
        keyword, _, args = line.partition(" ")
        keyword = keyword.upper()
        if keyword == "FROM":
            parts = args.split()
            assert len(parts) == 3 and parts[1].upper() == "AS", f"every stage must be named: {line}"
            stages.append(Stage(name=parts[2], base=parts[0]))
        elif not stages:
            assert keyword == "ARG", f"only ARG may precede the first FROM: {line}"
            name, _, default = args.partition("=")
            global_args[name] = default
        else:
            stages[-1].instructions.append((keyword, args.strip()))
    return global_args, stages


def resolve(image: str, args: dict[str, str]) -> str:
    return re.sub(r"\$\{(\w+)\}|\$(\w+)", lambda m: args[m.group(1) or m.group(2)], image)


GLOBAL_ARGS, STAGES = parse_dockerfile(DOCKERFILE.read_text())
BY_NAME = {s.name: s for s in STAGES}


def test_operator_and_trainer_targets_exist():
    assert {"operator", "trainer"} <= set(BY_NAME)


@pytest.mark.parametrize("target", ["operator", "trainer"])
def test_final_stage_runs_as_a_numeric_non_root_user(target):
    users = BY_NAME[target].all("USER")
    assert users, f"{target} has no USER: it would run as root"
    user = users[-1].split(":")[0]
    assert user.isdigit() and int(user) != 0, f"{target} runs as {users[-1]!r}"


@pytest.mark.parametrize("target,script", [("operator", "personalization-operator"), ("trainer", "personalize-train")])
def test_entrypoint_is_a_declared_console_script(target, script):
    (entrypoint,) = BY_NAME[target].all("ENTRYPOINT")
    command = json.loads(entrypoint)  # exec form: signals reach the process (kopf/trainer shut down cleanly)
    assert command == [script]
    assert script in PYPROJECT["project"]["scripts"]


def test_base_images_are_pinned_by_tag():
    for stage in STAGES:
        image = resolve(stage.base, GLOBAL_ARGS)
        if image in BY_NAME:  # built from an earlier stage
            continue
        name, _, tag = image.rpartition(":")
        assert name and "/" not in tag, f"stage {stage.name}: {image!r} has no tag"
        assert tag != "latest" and re.search(r"\d", tag), f"stage {stage.name}: {image!r} is not pinned"


def test_trainer_base_is_cuda_by_default_and_a_build_argument():
    assert BY_NAME["trainer"].base == "${TRAINER_BASE_IMAGE}"
    assert "cuda" in GLOBAL_ARGS["TRAINER_BASE_IMAGE"]
    # A CPU base gets torch from an index given as a build argument.
    trainer_args = BY_NAME["trainer"].all("ARG")
    assert any(a.startswith("TORCH_INDEX_URL") for a in trainer_args)


def _pip_installs(stage: Stage) -> list[list[str]]:
    return [shlex.split(run) for run in stage.all("RUN") if "pip install" in run]


@pytest.mark.parametrize("target,extra", [("operator", "operator"), ("trainer", "trainer")])
def test_stage_installs_its_extra_with_pinned_constraints(target, extra):
    installs = [words for words in _pip_installs(BY_NAME[target]) if any(f"[{extra}]" in w for w in words)]
    assert len(installs) == 1
    assert "-c" in installs[0], "the project install must be constrained by the lock"
    assert extra in PYPROJECT["project"]["optional-dependencies"]


def test_operator_image_has_no_torch():
    stage = BY_NAME["operator"]
    assert not any("torch" in run for run in stage.all("RUN"))
    operator_deps = PYPROJECT["project"]["dependencies"] + PYPROJECT["project"]["optional-dependencies"]["operator"]
    assert not any(Requirement(d).name == "torch" for d in operator_deps)
    assert "pytorch" not in resolve(stage.base, GLOBAL_ARGS)


def test_images_install_from_the_one_lock():
    """Both stages copy requirements.lock and constrain their install with it (the trainer after
    dropping the lock's CPU torch line, so a CUDA base keeps its own torch of the same version)."""
    for target in ("operator", "trainer"):
        stage = BY_NAME[target]
        assert any("requirements.lock" in copy for copy in stage.all("COPY")), target
        assert not (ROOT / "docker" / "constraints.txt").exists(), "a second pin list next to the lock"
    runs = " ".join(BY_NAME["trainer"].all("RUN"))
    assert "grep -v '^torch==' /tmp/requirements.lock" in runs


def test_build_context_holds_what_the_copies_need():
    """COPY sources exist and are not excluded by .dockerignore (last matching rule wins)."""
    rules = [l.strip() for l in (ROOT / ".dockerignore").read_text().splitlines() if l.strip() and not l.startswith("#")]

    def included(path: str) -> bool:
        keep = True
        for rule in rules:
            negate = rule.startswith("!")
            pattern = rule.lstrip("!").rstrip("/")
            if pattern == "**" or path == pattern or path.startswith(pattern + "/"):
                keep = negate
        return keep

    for stage in STAGES:
        for copy in stage.all("COPY"):
            words = [w for w in copy.split() if not w.startswith("--")]
            if "--from=" in copy:
                continue
            for source in words[:-1]:
                source = source.rstrip("/")
                assert (ROOT / source).exists() or source == "README.md", f"COPY {source}: missing"
                assert included(source), f"COPY {source}: excluded by .dockerignore"
    assert not included(".git") and not included("tests/ship/test_dockerfile.py")


def test_parser_sees_a_root_user_and_shell_form_entrypoint():
    """The checks above depend on the parser; make sure it reads what a broken file says."""
    _, stages = parse_dockerfile("ARG B=python:3.11\nFROM ${B} AS operator\nUSER root\nENTRYPOINT personalization-operator\n")
    assert stages[0].all("USER") == ["root"]
    with pytest.raises(json.JSONDecodeError):
        json.loads(stages[0].all("ENTRYPOINT")[0])


def test_created_accounts_do_not_clash_with_debian_base_accounts():
    """Debian's base images already have e.g. an `operator` group (gid 37); groupadd would fail.
    This machine runs the same Debian release as the slim Python base, so its accounts stand in."""
    import grp
    import pwd

    existing = {g.gr_name for g in grp.getgrall()} | {p.pw_name for p in pwd.getpwall()}
    for stage in STAGES:
        for run in stage.all("RUN"):
            for command in re.findall(r"(?:groupadd|useradd)[^&;]*", run):
                name = shlex.split(command)[-1]
                assert name not in existing, f"stage {stage.name}: {command!r} would clash with an existing account"
