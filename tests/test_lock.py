"""requirements.lock is the one list of exact versions: it must agree with pyproject.toml, and
the environment the tests run in must be the one it describes."""

from __future__ import annotations

import re
from importlib import metadata
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib

ROOT = Path(__file__).resolve().parents[1]
PIN = re.compile(r"^([A-Za-z0-9][A-Za-z0-9._-]*)==(\S+)$")


def read_pins(text: str) -> dict[str, str]:
    pins = {}
    for line in text.splitlines():
        match = PIN.match(line.strip())
        if match:
            pins[canonicalize_name(match.group(1))] = match.group(2)
    return pins


def declared_requirements() -> list[Requirement]:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    listed = list(project["dependencies"])
    for extra in project["optional-dependencies"].values():
        listed += extra
    return [Requirement(r) for r in listed]


PINS = read_pins((ROOT / "requirements.lock").read_text())


def lock_disagreements(pins: dict[str, str], requirements: list[Requirement]) -> list[str]:
    """Every requirement that applies here must be pinned, at a version its range admits."""
    problems = []
    for req in requirements:
        if req.marker is not None and not req.marker.evaluate():
            continue
        pinned = pins.get(canonicalize_name(req.name))
        if pinned is None:
            problems.append(f"{req.name} is in pyproject.toml but not in requirements.lock")
        elif not req.specifier.contains(Version(pinned), prereleases=True):
            problems.append(f"{req.name}=={pinned} in the lock violates {req} in pyproject.toml")
    return problems


def test_the_lock_satisfies_every_requirement_of_pyproject():
    assert lock_disagreements(PINS, declared_requirements()) == []


def test_the_disagreement_check_sees_a_missing_and_a_stale_pin():
    reqs = [Requirement("diffusers>=0.30"), Requirement("kopf>=1.37")]
    assert lock_disagreements({"diffusers": "0.29.0"}, reqs) == [
        "diffusers==0.29.0 in the lock violates diffusers>=0.30 in pyproject.toml",
        "kopf is in pyproject.toml but not in requirements.lock",
    ]


def test_every_pin_is_exact_and_torch_is_the_cpu_build():
    lines = [l for l in (ROOT / "requirements.lock").read_text().splitlines() if l and not l.lstrip().startswith("#")]
    assert all(PIN.match(l) for l in lines), [l for l in lines if not PIN.match(l)]
    assert PINS["torch"].endswith("+cpu")
    # The CPU build needs none of NVIDIA's wheels, and torchvision does not import beside it.
    assert not [name for name in PINS if name.startswith("nvidia-") or name in {"torchvision", "timm", "triton"}]


def test_the_lock_is_generated_by_the_documented_command():
    header = (ROOT / "requirements.lock").read_text()
    assert "#    bash tools/lock.sh" in header
    assert (ROOT / "tools" / "lock.sh").exists()


def test_the_running_environment_is_the_locked_one():
    """What CI and the demo install (tools/install-venv.sh) is exactly the lock."""
    different = {}
    for name, pinned in PINS.items():
        try:
            installed = metadata.version(name)
        except metadata.PackageNotFoundError:
            installed = "not installed"
        if installed == "not installed" or Version(installed) != Version(pinned):
            different[name] = f"locked {pinned}, found {installed}"
    assert different == {}, "run bash tools/install-venv.sh"
