#!/usr/bin/env bash
# Regenerate requirements.lock from pyproject.toml (every extra) with pip-tools' pip-compile.
#
#   bash tools/lock.sh                      # keep current pins where still allowed
#   bash tools/lock.sh --upgrade            # move every pin to the newest allowed release
#
# constraints.txt holds the one input that is not a plain version range: the CPU build of torch.
# This machine's pip finds it in its local wheel folder; elsewhere, add PyTorch's CPU index:
#   PIP_EXTRA_INDEX_URL=https://download.pytorch.org/whl/cpu bash tools/lock.sh
set -euo pipefail
cd "$(dirname "$0")/.."
tools=$(mktemp -d)
trap 'rm -rf "$tools"' EXIT
python3 -m venv "$tools"
"$tools/bin/python" -m pip install -q pip-tools==7.6.2
CUSTOM_COMPILE_COMMAND="bash tools/lock.sh" "$tools/bin/pip-compile" -q \
  --all-extras --strip-extras --allow-unsafe --no-emit-index-url --no-emit-find-links \
  --constraint constraints.txt --output-file requirements.lock "$@" pyproject.toml
