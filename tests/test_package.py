"""One top-level name, attention_kernels, so that the package beside another with a generic name
(Hugging Face's hub-kernels library is `kernels`, which transformers imports) leaves both working:
in a process started at the repository root, and installed from the wheel, imported elsewhere."""

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


# A process started at the repository root (`python -m pytest`, `python -m attention_kernels...`)
# has the root on sys.path ahead of site-packages: no folder there may take another package's name.
AT_THE_ROOT = """
import importlib.metadata, importlib.util, os, sys
import kernels
import transformers.modeling_utils
import attention_kernels
from attention_kernels import flash_attention
dist = importlib.metadata.distribution("kernels")
print(os.path.realpath(kernels.__file__))
print(os.path.realpath(dist.locate_file("kernels/__init__.py")))
print(os.path.realpath(attention_kernels.__file__))
"""


def test_at_the_repository_root_kernels_is_hugging_faces_and_transformers_imports():
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    env.pop("PYTHONPATH", None)
    run = subprocess.run([sys.executable, "-c", AT_THE_ROOT], cwd=ROOT, env=env, capture_output=True, text=True,
                         timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    imported, installed, ours = run.stdout.split()
    assert imported == installed, f"`import kernels` at the repository root found {imported}, not Hugging Face's"
    assert imported != os.path.realpath(os.path.join(ROOT, "kernels", "__init__.py"))
    assert ours == os.path.realpath(os.path.join(ROOT, "attention_kernels", "__init__.py"))


def test_no_folder_at_the_repository_root_is_an_importable_package_but_ours():
    packages = {name for name in os.listdir(ROOT) if os.path.isfile(os.path.join(ROOT, name, "__init__.py"))}
    assert packages == {"attention_kernels"}, packages


def test_the_top_level_names_are_the_kernels_and_importing_a_subpackage_leaves_the_kernels_alone():
    code = ("import sys, attention_kernels, attention_kernels.reference, attention_kernels.benchmarks; "
            "loaded = 'attention_kernels.kernels' in sys.modules; "
            "from attention_kernels import kernels; "
            "print(loaded, attention_kernels.__all__ == kernels.__all__, "
            "all(getattr(attention_kernels, n) is getattr(kernels, n) for n in kernels.__all__))")
    run = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env={**os.environ, "TRITON_INTERPRET": "1"},
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    assert run.stdout.split() == ["False", "True", "True"]


def test_the_gpu_command_and_the_rule_run_from_the_installed_wheel(wheel, tmp_path):
    site = tmp_path / "site"
    installed = subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target", str(site),
                                str(wheel)], capture_output=True, text=True, timeout=600)
    assert installed.returncode == 0, installed.stdout + installed.stderr
    env = {**os.environ, "PYTHONPATH": str(site), "TRITON_INTERPRET": "1"}
    help_ = subprocess.run([sys.executable, "-m", "attention_kernels.benchmarks.gpu_check", "--help"], cwd=tmp_path,
                           env=env, capture_output=True, text=True, timeout=300)
    assert help_.returncode == 0 and "--budget" in help_.stdout, help_.stderr[-3000:]
    code = ("from attention_kernels.testing import Shape, check_against_reference, make_qkv; "
            "from attention_kernels import flash_attention; import attention_kernels.testing as t; "
            "q, k, v, do = make_qkv(Shape(1, 2, 1, 9, 9, 16), __import__('torch').float32, seed=1); "
            "check_against_reference(flash_attention, q, k, v, do); print(t.__file__)")
    run = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True,
                         timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    assert run.stdout.strip().startswith(str(site))


def _imports(path, module):
    """The attention_kernels modules that `module` (at `path`) imports, at the top or inside a function."""
    import ast
    package = module if path.endswith("__init__.py") else module.rsplit(".", 1)[0]
    found = set()
    for node in ast.walk(ast.parse(open(path).read())):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")
                base = ".".join(parts[:len(parts) - node.level + 1] + ([base] if base else []))
            found |= {base} | {f"{base}.{a.name}" for a in node.names}
    return {name for name in found if name.startswith("attention_kernels")}


def test_no_module_reaches_for_the_tests_or_sys_path_and_none_imports_another_that_imports_it():
    modules = {}
    for folder, _, files in os.walk(os.path.join(ROOT, "attention_kernels")):
        for name in files:
            if name.endswith(".py"):
                path = os.path.join(folder, name)
                dotted = os.path.relpath(path, ROOT)[:-3].replace(os.sep, ".").removesuffix(".__init__")
                modules[dotted] = path
                text = open(path).read()
                assert "sys.path" not in text, f"{dotted} touches sys.path"
    graph = {m: {i for i in _imports(p, m) if i in modules and i != m} for m, p in modules.items()}
    leaves = {m for m, p in modules.items() if not p.endswith("__init__.py")}  # a package's __init__ gathers
    pairs = sorted((a, b) for a in leaves for b in graph[a] & leaves if a < b and a in graph[b])
    assert not pairs, f"modules that import each other: {pairs}"
    assert "attention_kernels.benchmarks.sweep" in graph and graph["attention_kernels.benchmarks.gpu_check_child"]
