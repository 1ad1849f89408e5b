#!/usr/bin/env bash
# Create (or reuse) the project's virtualenv at .venv and install exactly requirements.lock into
# it, then the project itself (editable). Never touches the Python it was started with.
#
#   bash tools/install-venv.sh        # PYTHON=python3.11 to choose the interpreter
#
# The lock pins the CPU build of torch (torch==2.13.0+cpu). This machine's pip finds it in its
# local wheel folder; elsewhere, point pip at PyTorch's CPU index first:
#   PIP_EXTRA_INDEX_URL=https://download.pytorch.org/whl/cpu bash tools/install-venv.sh
set -euo pipefail
cd "$(dirname "$0")/.."
export PIP_DISABLE_PIP_VERSION_CHECK=1

if [ ! -x .venv/bin/python ]; then
  "${PYTHON:-python3}" -m venv .venv
fi

# Skip the install when this exact lock and pyproject.toml were installed already (a rerun of
# the demo then starts in a second instead of re-checking ~90 packages).
stamp=.venv/.installed-from
wanted=$(cat requirements.lock pyproject.toml | sha256sum | cut -d' ' -f1)
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$wanted" ]; then
  exit 0
fi

echo "installing requirements.lock into .venv ..."
# --no-deps: the lock is the whole environment, so nothing outside it can be pulled in
# (no CUDA torch, no torchvision); `pip check` below proves the lock is self-consistent.
.venv/bin/python -m pip install -q --no-deps -r requirements.lock
# setuptools is in the lock, so the editable build needs no isolated (unlocked) build env.
.venv/bin/python -m pip install -q --no-deps --no-build-isolation -e .
.venv/bin/python -m pip check
echo "$wanted" > "$stamp"
