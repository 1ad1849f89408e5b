"""`personalize-train --help` and `--version`: a command that explains itself."""

from __future__ import annotations

from pathlib import Path

import pytest

from personalize.cli import main

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib

PROJECT_VERSION = tomllib.loads((Path(__file__).resolve().parents[2] / "pyproject.toml").read_text())["project"]["version"]


def test_help_prints_the_run_usage_and_the_other_modes(capsys):
    assert main(["--help"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("usage: personalize-train")
    assert "--config" in out and "--output" in out
    assert "personalize-train replay FILE" in out and "--version" in out


def test_version_is_the_project_version(capsys):
    assert main(["--version"]) == 0
    assert capsys.readouterr().out == f"personalize-train {PROJECT_VERSION}\n"


def test_replay_keeps_its_own_help(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["replay", "--help"])
    assert exit_.value.code == 0
    assert capsys.readouterr().out.startswith("usage: personalize-train replay")
