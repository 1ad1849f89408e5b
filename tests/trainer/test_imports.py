"""The modules around the methods package import on their own, first thing in a fresh
interpreter. tests/test_import_graph.py forbids circles from the source; this checks that the
real import machinery agrees, whatever module the other tests happen to import first."""

from __future__ import annotations

import os
import subprocess
import sys

# pipeline_io defines the Models the methods work on; dreambooth uses pipeline_io to save.
# (Each fresh interpreter imports torch and diffusers, several seconds: keep the list short.)
MODULES = [
    "personalize.pipeline_io",
    "personalize.methods.dreambooth",
]


def test_each_module_imports_first_in_a_fresh_interpreter():
    # One interpreter per module, run in a single subprocess to keep this fast.
    script = (
        "import subprocess, sys\n"
        "failed = []\n"
        "for name in sys.argv[1:]:\n"
        "    r = subprocess.run([sys.executable, '-c', f'import {name}'], capture_output=True, text=True)\n"
        "    if r.returncode: failed.append(name + ': ' + r.stderr.strip().splitlines()[-1])\n"
        "print('\\n'.join(failed)); sys.exit(1 if failed else 0)\n"
    )
    env = {**os.environ, "TRANSFORMERS_VERBOSITY": "error"}
    result = subprocess.run([sys.executable, "-c", script, *MODULES], capture_output=True, text=True, env=env)
    assert result.returncode == 0, result.stdout
