"""The README and docs/ say what is true: every Python example runs as it is, pasted into a fresh
interpreter on this machine (on the CPU it turns Triton's interpreter on itself, as the pages
show); every relative link and anchor resolves; the README's test command is the one .ci/run runs;
the README stays a front door; and the pages speak of the project, not of how it is developed."""

import glob
import os
import re
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PAGES = ["README.md"] + sorted(os.path.relpath(p, ROOT) for p in glob.glob(os.path.join(ROOT, "docs", "*.md")))

def read(page):
    with open(os.path.join(ROOT, page), encoding="utf-8") as f:
        return f.read()


def snippets():
    """(page, line, code) of every ```python block, in page order."""
    found = []
    for page in PAGES:
        text = read(page)
        for m in re.finditer(r"^```python\n(.*?)^```", text, flags=re.S | re.M):
            found.append((page, text.count("\n", 0, m.start()) + 1, m.group(1)))
    return found


SNIPPETS = snippets()

# What a snippet prints, where that is a figure to hold: (page, a line of its code) -> (a pattern
# of its whole output that captures the figure, the figure's bound). Both print the max |kernel -
# reference| of bfloat16 outputs from unseeded randn inputs: |out| < 8 there, where bf16's unit is
# 2^-5, and the two round the same fp32 figure to bf16 (measured: 2^-6 = 0.0156, outputs below 4).
# 2^-4 leaves a factor 2 above a unit at 8; a kernel with the scale 10% off prints 0.2, one
# without the causal mask 2.6 or more.
BF16_MAX_ERROR = 2 ** -4
PRINTS = {
    ("README.md", "print((out - reference.attention(q, k, v)).abs().max())"):
        (r"tensor\(([0-9.e+-]+),(?: device='cuda:\d+',)? dtype=torch\.bfloat16, grad_fn=<MaxBackward1>\)",
         BF16_MAX_ERROR),
    ("docs/usage.md", 'print(f"max |flash - reference| = {(out - truth).abs().max().item():.2e}")'):
        (r"max \|flash - reference\| = ([0-9.e+-]+)", BF16_MAX_ERROR),
}


def test_the_pages_have_snippets():
    assert len(SNIPPETS) >= 5
    assert any(page == "README.md" for page, _, _ in SNIPPETS)


@pytest.mark.parametrize("page, line, code", SNIPPETS, ids=[f"{p}:{n}" for p, n, _ in SNIPPETS])
def test_each_snippet_runs(page, line, code, tmp_path):
    if "from transformers" in code:
        pytest.importorskip("transformers")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}  # the snippet decides
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [ROOT, os.environ.get("PYTHONPATH")]))
    if os.environ.get("PYTEST_XDIST_WORKER"):
        env["OMP_NUM_THREADS"] = "1"  # `-n 2` on 2 cores: one thread per worker, as conftest does
    run = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True,
                         timeout=600)
    if run.returncode < 0 and "dist.destroy_process_group()" in code:
        # a gloo process group's teardown was seen, once under a loaded CPU, to abort at exit after
        # the snippet had finished ("terminate called without an active exception"): run it again
        # once, so that only a snippet that fails twice fails the test
        run = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True,
                             timeout=600)
    assert run.returncode == 0, f"the snippet at {page}:{line} failed:\n{code}\n{run.stderr[-3000:]}"
    for (where, marker), (pattern, bound) in PRINTS.items():
        if where == page and marker in code:
            printed = re.fullmatch(pattern, run.stdout.strip())
            assert printed, f"the snippet at {page}:{line} printed {run.stdout!r}, not a line like {pattern!r}"
            assert 0 <= float(printed.group(1)) <= bound, (
                f"the snippet at {page}:{line} printed {printed.group(0)!r}: above {bound:g}")


def test_each_printed_figure_has_its_snippet():
    for page, marker in PRINTS:
        found = [line for p, line, code in SNIPPETS if p == page and marker in code]
        assert len(found) == 1, f"{page}: {len(found)} snippets hold {marker!r}, not 1"


def test_the_readme_is_a_front_door():
    lines = read("README.md").count("\n")
    assert lines <= 260, f"README.md has {lines} lines; move detail into docs/"


def test_the_readme_test_command_is_what_ci_runs():
    with open(os.path.join(ROOT, ".ci", "run")) as f:
        ci = [line for line in f.read().splitlines() if line.strip()][-1]
    assert ci in read("README.md").splitlines(), "README.md must hold .ci/run's last line, byte for byte"
    # any other page that spells out the test command spells out the same one
    for page in PAGES:
        for line in read(page).splitlines():
            if line.startswith("python3 -m venv .venv &&") and "'.[test]'" in line:
                assert line == ci, f"{page} has a test command that is not .ci/run's:\n{line}"


def slug(heading):
    """GitHub's anchor for a heading: lower case, punctuation but - and _ dropped, spaces to -."""
    text = re.sub(r"`", "", heading.strip()).lower()
    return re.sub(r"[^\w\- ]", "", text).replace(" ", "-")


def anchors(page):
    text = re.sub(r"^```.*?^```", "", read(page), flags=re.S | re.M)
    return {slug(m.group(1)) for m in re.finditer(r"^#+\s+(.*)$", text, flags=re.M)}


def links(page):
    """Relative link targets of a page, outside code blocks and code spans."""
    text = re.sub(r"^```.*?^```", "", read(page), flags=re.S | re.M)
    text = re.sub(r"`[^`\n]*`", "", text)
    return re.findall(r"\]\(([^)\s]+)\)", text)


def test_every_relative_link_resolves():
    broken = []
    for page in PAGES:
        for target in links(page):
            if re.match(r"[a-z]+:", target):  # https:, mailto:
                continue
            path, _, anchor = target.partition("#")
            where = os.path.normpath(os.path.join(os.path.dirname(page), path)) if path else page
            if not os.path.exists(os.path.join(ROOT, where)):
                broken.append(f"{page}: {target} (no file {where})")
            elif anchor and where.endswith(".md") and anchor not in anchors(where):
                broken.append(f"{page}: {target} (no heading #{anchor} in {where})")
    assert not broken, "links that lead nowhere:\n" + "\n".join(broken)


# Words about how the project is developed, which the pages leave out. Whole words only, so that
# "talent" or "shared memory" pass; addresses (a link to an upstream bug tracker) are not words.
DEVELOPMENT_WORDS = [r"\bsessions?\b", r"\blent\b", r"\bshared/", r"\bissues?\b"]


@pytest.mark.parametrize("page", PAGES)
def test_the_pages_speak_of_the_project_only(page):
    text = re.sub(r"https?://\S+", "", read(page))
    found = [m.group(0) for w in DEVELOPMENT_WORDS for m in re.finditer(w, text, flags=re.I)]
    assert not found, f"{page} speaks of how the project is developed: {found}"
