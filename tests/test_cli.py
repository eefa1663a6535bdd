"""Every command-line entry point answers --help with its usage, at once: a newcomer's first
command must not start a run of minutes (benchmarks.demo once did)."""

import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
COMMANDS = ["attention_kernels.benchmarks." + name for name in ("demo", "sweep", "plots", "tinygpt", "inference",
                                                                  "profile", "onchip", "ring", "gpu_check",
                                                                  "generate")] + [
    "attention_kernels.reference.explain", "attention_kernels.kernels.tuning", "attention_kernels.kernels.support"]
MARGIN_S = 5  # what --help may take beyond importing the module (a run of the demo takes a minute)


# One process: import the module, then run it as `python -m module --help` would (runpy), timing
# each; two processes cost this file twice the imports (torch, Triton) for the same comparison
SCRIPT = """
import importlib, json, runpy, sys, time
module = sys.argv[1]
start = time.perf_counter()
importlib.import_module(module)
imported = time.perf_counter()
sys.argv = [module, "--help"]
try:
    runpy.run_module(module, run_name="__main__", alter_sys=True)
    code = 0
except SystemExit as e:
    code = e.code
sys.stdout.flush()
print(json.dumps(dict(code=code, import_s=imported - start, help_s=time.perf_counter() - imported)), file=sys.stderr)
"""


@pytest.mark.parametrize("module", COMMANDS)
def test_help_prints_usage_and_runs_nothing(module):
    done = subprocess.run([sys.executable, "-W", "ignore::RuntimeWarning", "-c", SCRIPT, module], cwd=ROOT,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    timed = json.loads(done.stderr.strip().splitlines()[-1])
    assert timed["code"] in (0, None), done.stderr[-2000:]
    assert done.stdout.startswith("usage: "), done.stdout[:500]
    assert timed["help_s"] < MARGIN_S, f"--help took {timed['help_s']:.1f} s after importing {module} " \
                                        f"({timed['import_s']:.1f} s)"
