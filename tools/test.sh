#!/usr/bin/env bash
# The test command: make sure .venv holds exactly the lock (a no-op when it does), then run the
# whole suite in it. Extra arguments go to pytest, e.g. `bash tools/test.sh tests/trainer -x`.
set -euo pipefail
cd "$(dirname "$0")/.."
bash tools/install-venv.sh
exec .venv/bin/python -m pytest -q "$@"
