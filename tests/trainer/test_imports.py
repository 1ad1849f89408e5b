"""Every trainer module imports on its own, first thing in a fresh interpreter: an import cycle
that only bites in some import orders (pipeline_io -> methods -> dreambooth -> pipeline_io)
would otherwise hide behind whichever module the other tests happen to import first."""

from __future__ import annotations

import os
import subprocess
import sys

# The modules around the methods package, which imports pipeline code and is imported by it.
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
