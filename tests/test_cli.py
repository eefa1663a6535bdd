"""Every command-line entry point answers --help with its usage, at once: a newcomer's first
command must not start a run of minutes (benchmarks.demo once did)."""

import os
import subprocess
import sys
import time

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
COMMANDS = ["benchmarks.demo", "benchmarks.sweep", "benchmarks.plots", "benchmarks.tinygpt", "benchmarks.inference",
            "benchmarks.profile", "benchmarks.onchip", "benchmarks.ring", "reference.explain",
            "attention_kernels.kernels.tuning"]
MARGIN_S = 5  # what --help may take beyond importing the module (a run of the demo takes a minute)


def timed(*argv):
    start = time.perf_counter()
    done = subprocess.run([sys.executable, *argv], cwd=ROOT, capture_output=True, text=True, timeout=300)
    return done, time.perf_counter() - start


@pytest.mark.parametrize("module", COMMANDS)
def test_help_prints_usage_and_runs_nothing(module):
    imported, import_s = timed("-c", f"import {module}")
    assert imported.returncode == 0, imported.stderr[-2000:]
    helped, help_s = timed("-m", module, "--help")
    assert helped.returncode == 0, helped.stderr[-2000:]
    assert helped.stdout.startswith("usage: "), helped.stdout[:500]
    assert help_s < import_s + MARGIN_S, f"--help took {help_s:.1f} s, importing {module} {import_s:.1f} s"
