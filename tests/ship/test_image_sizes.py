"""The image stage's sizes reach a results file: docker/images.sh measures the parts inside each
built image (its `site_mb`/`parts_of` helpers, here over a fake image mount and a stand-in for
buildah) and docker/image_sizes.py writes benchmarks/results/image_sizes.{json,md}."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import pytest

from ship_helpers import ROOT

SCRIPT = ROOT / "docker" / "images.sh"
WRITER = ROOT / "docker" / "image_sizes.py"


def write_sizes(out, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(WRITER), "--out", str(out), *args], capture_output=True, text=True)


def test_the_sizes_file_holds_each_image_its_budget_and_its_parts(tmp_path):
    done = write_sizes(tmp_path, "--base", "localhost/base:1", "151", "--image", "operator", "342", "400",
                       "--image", "trainer", "1640", "1800", "--part", "operator", "kubernetes", "126",
                       "--part", "trainer", "torch", "754")
    assert done.returncode == 0, done.stderr
    data = json.loads((tmp_path / "image_sizes.json").read_text())
    assert data["world"] is None and data["base"] == {"image": "localhost/base:1", "mb": 151}
    assert data["images"]["operator"] == {"mb": 342, "budget_mb": 400, "over_base_mb": 191, "parts_mb": {"kubernetes": 126}}
    assert data["images"]["trainer"]["over_base_mb"] == 1489 and data["images"]["trainer"]["parts_mb"] == {"torch": 754}
    md = (tmp_path / "image_sizes.md").read_text()
    assert "| operator | 342 | 400 | 191 | kubernetes 126 |" in md and "| trainer | 1640 | 1800 | 1489 | torch 754 |" in md


def test_a_part_of_an_image_not_measured_is_refused(tmp_path):
    done = write_sizes(tmp_path, "--base", "b", "1", "--image", "operator", "2", "3", "--part", "trainer", "torch", "1")
    assert done.returncode == 2 and "--part names an image without --image: trainer" in done.stderr
    assert not (tmp_path / "image_sizes.json").exists()


@pytest.mark.skipif(shutil.which("bash") is None, reason="needs bash")
def test_the_script_measures_parts_inside_the_mounted_image(tmp_path):
    packages = tmp_path / "mnt" / "usr" / "local" / "lib" / "python3.11" / "site-packages"
    for folder, size in (("kubernetes", 3_000_000), ("torch/test", 2_000_000), ("torch/include", 1_000_000),
                         ("torch/lib", 5_000_000)):
        (packages / folder).mkdir(parents=True)
        (packages / folder / "blob").write_bytes(b"\0" * size)
    # The script's own helpers, with buildah answering `from` and `mount` with the fake mount.
    program = f"""
set -euo pipefail
buildah() {{ case $1 in from) echo ctr;; mount) echo {tmp_path / 'mnt'};; esac; }}
eval "$(sed -n '/^site_mb() {{/,/^}}/p;/^parts_of() {{/,/^}}/p' {SCRIPT})"
parts_of operator img kubernetes=kubernetes
parts_of trainer img torch=torch "torch test,include=torch/test,torch/include" missing=nothing
"""
    done = subprocess.run(["bash", "-c", program], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    lines = done.stdout.split("\n")
    parts = {(lines[i + 1], lines[i + 2]): int(lines[i + 3]) for i, line in enumerate(lines) if line == "--part"}
    # du rounds each folder up to whole MB (10^6 bytes), directory entries included
    assert 3 <= parts["operator", "kubernetes"] <= 4
    assert 8 <= parts["trainer", "torch"] <= 9
    assert 3 <= parts["trainer", "torch test,include"] <= 4
    assert parts["trainer", "missing"] == 0


def test_the_sizes_in_the_deploy_guide_are_the_committed_results_file():
    """docs/deploy.md quotes the committed image_sizes.json, and names its commit."""
    data = json.loads((ROOT / "benchmarks" / "results" / "image_sizes.json").read_text())
    guide = " ".join((ROOT / "docs" / "deploy.md").read_text().split())
    operator, trainer = data["images"]["operator"], data["images"]["trainer"]
    assert f"run at commit {data['commit']}" in guide
    assert f"stand-in base: operator {operator['mb']} MB, CPU trainer {trainer['mb']} MB" in guide
    assert f"`kubernetes` client is {operator['parts_mb']['kubernetes']} MB of the operator's " \
           f"{operator['over_base_mb']} MB over the base" in guide
    assert f"torch {trainer['parts_mb']['torch']} MB of the trainer's {trainer['over_base_mb']} MB" in guide
