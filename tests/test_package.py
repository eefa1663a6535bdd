"""The installed package: one top-level name, attention_kernels, so that installing it beside
another package with a generic name (Hugging Face's hub-kernels library is `kernels`) leaves both
working. Builds the wheel, installs it into a folder of its own and imports it from elsewhere."""

import os
import subprocess
import sys
import zipfile

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def wheel(tmp_path_factory):
    out = tmp_path_factory.mktemp("wheel")
    built = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(out), ROOT],
                           capture_output=True, text=True, timeout=600)
    assert built.returncode == 0, built.stdout + built.stderr
    (path,) = out.glob("attention_kernels-*.whl")
    return path


def test_the_wheel_installs_one_top_level_name(wheel):
    names = zipfile.ZipFile(wheel).namelist()
    top = {n.split("/")[0] for n in names if not n.split("/")[0].endswith((".dist-info", ".data"))}
    assert top == {"attention_kernels"}, top
    for path in ("attention_kernels/kernels/flash.py", "attention_kernels/kernels/tuned.json",
                 "attention_kernels/reference/naive.py", "attention_kernels/benchmarks/sweep.py",
                 "attention_kernels/benchmarks/data/attention.txt"):
        assert path in names, path


def test_installed_beside_another_kernels_package_both_import(wheel, tmp_path):
    site = tmp_path / "site"
    installed = subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target", str(site),
                                str(wheel)], capture_output=True, text=True, timeout=600)
    assert installed.returncode == 0, installed.stdout + installed.stderr
    (site / "kernels").mkdir()  # stands in for Hugging Face's `kernels`
    (site / "kernels" / "__init__.py").write_text("WHO = 'hub-kernels'\n")
    code = ("import kernels, attention_kernels; from attention_kernels import reference, flash_attention; "
            "import attention_kernels.benchmarks.sweep; "
            "print(kernels.WHO, attention_kernels.__file__, flash_attention.__module__, reference.attention.__module__)")
    env = {**os.environ, "PYTHONPATH": str(site), "TRITON_INTERPRET": "1"}
    run = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True,
                         timeout=300)  # not the checkout: only what was installed is importable
    assert run.returncode == 0, run.stderr[-3000:]
    who, where, flash_module, reference_module = run.stdout.split()
    assert who == "hub-kernels" and where.startswith(str(site))
    assert flash_module == "attention_kernels.kernels.flash" and reference_module == "attention_kernels.reference.naive"
