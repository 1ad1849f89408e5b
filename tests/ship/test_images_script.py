"""docker/images.sh skips, with one clear line and exit 0, where images cannot be built: no
buildah, or not root. (Where it can build, CI runs it for real: .ci/run.)"""

from __future__ import annotations

import os
import shutil
import subprocess

import pytest

from ship_helpers import ROOT

SCRIPT = ROOT / "docker" / "images.sh"


def run_script(env: dict[str, str]) -> subprocess.CompletedProcess:
    return subprocess.run([shutil.which("bash"), str(SCRIPT)], env=env, capture_output=True, text=True, timeout=60)


def test_without_buildah_it_skips_with_a_clear_message(tmp_path):
    # A PATH holding only what the script needs before its first check.
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for tool in ("id", "dirname"):
        (bin_dir / tool).symlink_to(shutil.which(tool))
    done = run_script({"PATH": str(bin_dir), "IMAGES_WORK_DIR": str(tmp_path / "work")})
    assert done.returncode == 0, done.stderr
    expected = "buildah is not installed" if os.getuid() == 0 else "not root"
    assert done.stdout.startswith("[images] SKIPPED: ") and expected in done.stdout, done.stdout
    assert not (tmp_path / "work").exists()  # nothing was started


@pytest.mark.skipif(os.getuid() != 0 or shutil.which("setpriv") is None, reason="needs root and setpriv")
def test_unprivileged_it_skips_with_a_clear_message():
    # As nobody, who may not be able to read the checkout: the script comes on stdin.
    with SCRIPT.open() as script:
        done = subprocess.run(["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", "bash", "-s"],
                              stdin=script, cwd="/", env={"PATH": os.environ["PATH"]}, capture_output=True,
                              text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[images] SKIPPED: not root: running the images needs mount and network namespaces"
