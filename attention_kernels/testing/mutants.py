"""
A mutation check: do the tests catch the bugs this code could plausibly have?

    python -m attention_kernels.testing.mutants              # every mutant, one at a time
    python -m attention_kernels.testing.mutants --list       # the list, and whether each still applies
    python -m attention_kernels.testing.mutants --only gqa-interleaved window-sides-swapped --jobs 2
    python -m attention_kernels.testing.mutants --markdown   # the table as Markdown, for the docs

Each mutant is one plausible bug (a causal mask aligned top-left, a dropped online-softmax
rescale, grouped-query heads interleaved, dropout's 1 / (1 - p) lost in the reference and the
kernels alike, ...): exact snippets of the package's source, each replaced by its mutation, and
the tests that should catch it. For each mutant the check copies the repository (its git-tracked
and untracked, not ignored files) into a temporary folder, applies the mutation there (never
here), and runs the mutant's tests in that copy, `python -m pytest -x -q` with the copy first on
PYTHONPATH; a small pytest plugin written into the copy records which `attention_kernels` the run
imported (it must be the copy's, not this editable install's) and the first test that failed.

It prints a table: the mutant, the files it changes, whether it was killed (a test failed), the
test that caught it, and the seconds its tests took. The exit status is 1 when any mutant
survived (its tests all passed) or could not be judged (a snippet no longer in the source, no
test selected, a timeout, the wrong package imported), else 0. A snippet must occur exactly once
in its file, so that the list fails loudly when the code it mutates changes; `tests/test_mutants.py`
checks that against the current sources without running anything.
"""

import argparse
import concurrent.futures
import json
import os
import shutil
import subprocess
import sys
import tempfile
import textwrap
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
PROBE = "_mutants_probe"  # the plugin module written into each copy
DEFAULT_TIMEOUT_S = 1800


@dataclass(frozen=True)
class Edit:
    """Replace `old` (which must occur exactly once in `file`, a path from the repository root) by `new`."""
    file: str
    old: str
    new: str


@dataclass(frozen=True)
class Mutant:
    """One plausible bug: its edits, the pytest arguments (files or node ids) of the tests that
    should catch it, an optional -k expression over them, and a line saying what it breaks."""
    name: str
    description: str
    edits: tuple
    tests: tuple
    k: str = None

    @property
    def files(self):
        return sorted({e.file for e in self.edits})

    def pytest_args(self):
        return [*self.tests, *(["-k", self.k] if self.k else [])]


def mutant(name, description, edits, tests, k=None):
    edits = tuple(Edit(*e) for e in edits)
    return Mutant(name, description, edits, tuple(tests), k)


K = "attention_kernels/kernels/"
REF = "attention_kernels/reference/naive.py"
MATCHES = "tests/test_kernels.py::test_matches_reference"

MUTANTS = [
    # ------------------------------------------------------------------ masks and alignment
    mutant("causal-top-left",
           "the forward mask aligns causal attention top-left (key j <= i) instead of bottom-right",
           [(K + "common.py",
             "past = offs_n[None, :] - (offs_m[:, None] + (Tk - Tq))  # how far each key lies past the diagonal",
             "past = offs_n[None, :] - offs_m[:, None]  # how far each key lies past the diagonal")],
           [MATCHES], "flash_attention and causal and (T97x40 or T17x128) and torch.float32"),
    mutant("flash-key-blocks-top-left",
           "flash's forward picks the key blocks to visit as if causal were top-left (off = 0)",
           [(K + "flash_fwd.py",
             "    off = Tk - Tq\n    m1 = tl.minimum(m0 + BLOCK_M, Tq)",
             "    off = 0\n    m1 = tl.minimum(m0 + BLOCK_M, Tq)")],
           [MATCHES], "flash_attention and causal and (T97x40 or T17x128) and torch.float32"),
    mutant("window-sides-swapped",
           "flash's launcher passes the window's left bound as right and right as left",
           [(K + "flash.py",
             "**window_args(variant.left, variant.right, self.Tq, self.Tk)",
             "**window_args(variant.right, variant.left, self.Tq, self.Tk)")],
           ["tests/test_window.py::test_window_matches_reference"]),
    mutant("reference-causal-top-left",
           "the reference's causal mask aligns top-left (j <= i), as torch's is_causal does",
           [(REF, "    return j <= i + (Tk - Tq)                              # (Tq, Tk) bool",
             "    return j <= i                                          # (Tq, Tk) bool")],
           ["tests/test_reference.py"]),
    # ------------------------------------------------------------------ the online softmax and its storage
    mutant("online-softmax-no-rescale",
           "flash's forward never rescales the running sum and output when the row max grows",
           [(K + "flash_fwd.py",
             "        alpha = tl.math.exp2(m_i - m_use)\n        l_i = l_i * alpha + tl.sum(p, 1)",
             "        alpha = tl.where(m_i < m_use, 1.0, 1.0)\n        l_i = l_i * alpha + tl.sum(p, 1)")],
           [MATCHES], "flash_attention and T255x255 and torch.float32"),
    mutant("flash-residual-dropped",
           "flash's forward stores a zero rounding residual for 16-bit O (the backward's delta loses it)",
           [(K + "flash_fwd.py",
             "r = (o32 - o.to(tl.float32)).to(O.dtype.element_ty)",
             "r = (o32 - o32).to(O.dtype.element_ty)")],
           ["tests/test_kernels.py::test_peaky_softmax_keeps_accurate_gradients"],
           "flash_attention and (torch.float16 or torch.bfloat16)"),
    mutant("flash-lse-16bit",
           "flash's forward stores the log-sum-exp rounded to bfloat16",
           [(K + "flash_fwd.py",
             "tl.store(LSE + b * stride_lb + h * stride_lh + q0 + offs_m, lse, mask=offs_m < Tq)",
             "tl.store(LSE + b * stride_lb + h * stride_lh + q0 + offs_m, lse.to(tl.bfloat16).to(tl.float32), "
             "mask=offs_m < Tq)")],
           [MATCHES], "flash_attention and T97x97 and torch.float32"),
    mutant("flash-dlse-units",
           "flash's delta subtracts dLSE in natural units from a base-2 delta (the log2(e) dropped)",
           [(K + "flash_bwd.py",
             "delta -= tl.load(DLSE + row, mask=row_ok, other=0.0) * 1.4426950408889634",
             "delta -= tl.load(DLSE + row, mask=row_ok, other=0.0)")],
           ["tests/test_kernels.py::test_the_log_sum_exp_is_differentiable"], "flash_attention and torch.float32"),
    mutant("fused-dlse-ignored",
           "fused's backward ignores the log-sum-exp's gradient",
           [(K + "fused.py",
             "delta -= tl.load(DLSE + (b * Hq + h) * Tq + offs_m, mask=row_ok, other=0.0) * 1.4426950408889634",
             "delta = delta  # mutant: dLSE ignored")],
           ["tests/test_kernels.py::test_the_log_sum_exp_is_differentiable"], "fused_attention and torch.float32"),
    mutant("flash-dv-times-1.1",
           "flash's dV is 10% too large (the tiny GPT's loss curve, and the kernels' rule, should see it)",
           [(K + "flash_bwd.py",
             "BLOCK_DV), dv.to(DV.dtype.element_ty), offs_n, Tk, HEAD_DIM_V, BLOCK_DV)",
             "BLOCK_DV), (dv * 1.1).to(DV.dtype.element_ty), offs_n, Tk, HEAD_DIM_V, BLOCK_DV)")],
           ["tests/test_tinygpt.py::test_loss_curve_agrees_with_the_reference", "tests/test_kernels.py::test_custom_scale"]),
    # ------------------------------------------------------------------ grouped-query heads
    mutant("gqa-interleaved",
           "the forward kernels map query head h to k/v head h % Hkv instead of h // group",
           [(K + "common.py",
             "return b, h, h // GROUP, num_m_blocks - 1 - pid % num_m_blocks",
             "return b, h, h % (Hq // GROUP), num_m_blocks - 1 - pid % num_m_blocks")],
           [MATCHES], "H8:2 and torch.float32"),
    mutant("gqa-dkdv-interleaved",
           "flash's dK/dV sums the query heads g * Hkv + h_kv instead of h_kv * group + g",
           [(K + "flash_bwd.py", "        h = h_kv * GROUP + g\n", "        h = g * Hkv + h_kv\n")],
           [MATCHES], "flash_attention and H8:2 and torch.float32"),
    mutant("reference-gqa-tiled",
           "the reference repeats the k/v heads tiled (0 1 0 1) instead of interleaved (0 0 1 1)",
           [(REF, "return k.repeat_interleave(group, dim=1)", "return k.repeat(1, group, 1, 1)")],
           ["tests/test_reference.py"]),
    # ------------------------------------------------------------------ dropout
    mutant("dropout-scale-removed",
           "dropout keeps weights unscaled (no 1 / (1 - p)), in the reference and the kernels alike",
           [(REF, "return w * keep.to(w.dtype) / (1.0 - p)", "return w * keep.to(w.dtype)"),
            (K + "common.py", "keep_scale=1.0 / (1.0 - self.dropout_p)", "keep_scale=1.0")],
           ["tests/test_dropout.py", "tests/test_reference.py", "tests/test_sdpa.py", "tests/test_module.py",
            "tests/test_hf.py"], "dropout"),
    mutant("dropout-dkdv-transposed",
           "flash's dK/dV kernel draws weight (i, j)'s dropout decision at (j, i)",
           [(K + "flash_bwd.py",
             "keep = dropout_keep(seed, bh, offs_m[None, :] + q_off, offs_n[:, None] + k_off, p_drop)",
             "keep = dropout_keep(seed, bh, offs_n[:, None] + q_off, offs_m[None, :] + k_off, p_drop)"),
            (K + "flash_bwd.py",  # the same in the path with a score function
             "keep = dropout_keep(seed, bh, offs_m[None, :] + q_off, offs_n[:, None] + k_off,\n",
             "keep = dropout_keep(seed, bh, offs_n[:, None] + q_off, offs_m[None, :] + k_off,\n")],
           ["tests/test_dropout.py::test_dropout_is_the_reference_with_its_mask"], "flash_attention and torch.float32"),
    mutant("ring-dropout-positions-dropped",
           "ring attention's pieces draw dropout at their positions within the piece, not the sequence's",
           [(K + "distributed.py", "dropout_offsets=(P0, K0, b * ring.Hq if ring.packed else 0)",
             "dropout_offsets=(0, 0, 0)")],
           ["tests/test_distributed.py::test_ring_attention_on_2_ranks"]),
    # ------------------------------------------------------------------ block maps, mask and score functions
    mutant("block-map-full-blocks-skipped",
           "flash's forward skips the key blocks the map lists as seen whole",
           [(K + "flash_fwd.py", "        for i in range(n_partial, n_listed):\n",
             "        for i in range(n_partial, n_partial):\n")],
           ["tests/test_mods.py::test_blocks_seen_whole_take_the_path_without_mask_work"]),
    mutant("mask-function-ignored",
           "the kernels never apply the user's mask function",
           [(K + "common.py", 'return tl.where(MASK_MOD(b, h, q_idx, kv_idx, *mask_mod_args), s, float("-inf"))',
             "return s")],
           ["tests/test_mods.py::test_ready_made_mask_functions"]),
    mutant("score-function-derivative-dropped",
           "flash's dq kernel leaves out the score function's derivative",
           [(K + "flash_bwd.py", "            ds = tl.where(p > 0.0, ds * g, 0.0)\n", "            ds = ds\n")],
           ["tests/test_mods.py::test_score_functions_equal_the_built_in_arguments"]),
    mutant("module-dropout-dropped",
           "the nanoGPT / lecture modules never pass their attention dropout to the kernels",
           [(K + "module.py",
             "return attention(q, k, v, causal=True, impl=module.impl, dropout_p=p)",
             "return attention(q, k, v, causal=True, impl=module.impl, dropout_p=0.0)")],
           ["tests/test_module.py"], "dropout"),
    mutant("hf-dropout-dropped",
           "the transformers integration never passes the layer's attention dropout to the kernels",
           [(K + "hf.py", '        mods["dropout_p"] = dropout\n', "        pass  # mutant: dropout dropped\n")],
           ["tests/test_hf.py"], "dropout"),
    # ------------------------------------------------------------------ what models add
    mutant("alibi-per-sequence-dkdv",
           "flash's dK/dV reads every sequence's ALiBi slopes from row 0 of (B, Hq) slopes",
           [(K + "flash_bwd.py",
             "            slope = tl.load(SLOPES + b * stride_sb + h) * 1.4426950408889634",
             "            slope = tl.load(SLOPES + h) * 1.4426950408889634")],
           ["tests/test_variants.py::test_kernels_match_the_reference"], "flash_attention and (alibi or all) and B2"),
    mutant("alibi-one-sided",
           "ALiBi's |distance| loses its abs (right for keys behind, a bonus ahead), in the reference and kernels alike",
           [(REF, "distance = (j - (i + Tk - Tq)).abs()                   # (Tq, Tk)",
             "distance = (i + Tk - Tq) - j                           # (Tq, Tk)"),
            (K + "common.py", "s = s - slope * tl.abs(cols[None, :] - rows[:, None]).to(tl.float32)",
             "s = s - slope * (rows[:, None] - cols[None, :]).to(tl.float32)"),
            (K + "flash_bwd.py", "st, tt = score_mods(st * qk_scale, offs_n, offs_m + (Tk - Tq), softcap",
             "st, tt = score_mods(st * qk_scale, -offs_n, -(offs_m + (Tk - Tq)), softcap")],
           ["tests/test_reference.py", "tests/test_variants.py", "tests/test_window.py"], "alibi or all or ahead"),
    mutant("softcap-tanh-replaced",
           "the kernels' tanh is 1 - 2 / (1 + exp(2x)), off by an ulp of 1 near 0 (a large cap shows it)",
           [(K + "common.py", "    return x * p / q\n", "    return 1.0 - 2.0 / (1.0 + tl.exp(2.0 * x))\n")],
           ["tests/test_variants.py"], "tanh or softcap"),
    mutant("softcap-backward-uncapped",
           "flash's dQ skips the soft-cap's chain rule factor 1 - tanh^2",
           [(K + "flash_bwd.py", "            ds = ds * (1.0 - t * t)\n", "            ds = ds\n")],
           ["tests/test_variants.py::test_kernels_match_the_reference"], "flash_attention and softcap"),
    mutant("sinks-gradient-dropped",
           "flash's backward returns zeros for the sinks' gradient",
           [(K + "flash.py",
             "dsinks = q.new_empty(0, dtype=torch.float32) if sinks is None else sink_gradient(sinks, lse, delta)",
             "dsinks = q.new_empty(0, dtype=torch.float32) if sinks is None else torch.zeros_like(sinks)")],
           ["tests/test_variants.py::test_kernels_match_the_reference"], "flash_attention and sinks"),
    # ------------------------------------------------------------------ packed batches, decoding, paging
    mutant("varlen-key-length-off-by-one",
           "flash's packed sequences end one key early (cu_seqlens_k[b + 1] - cu_seqlens_k[b] - 1)",
           [(K + "flash_fwd.py",
             "tl.load(CU_K + b + 1) - k0\n",
             "tl.load(CU_K + b + 1) - k0 - 1\n")],
           ["tests/test_varlen.py::test_varlen_matches_reference"]),
    mutant("decode-merge-base-e",
           "decode's split merge weighs base-2 partial log-sum-exps with exp instead of exp2",
           [(K + "decode.py", "    w = tl.math.exp2(lse - m)\n", "    w = tl.exp(lse - m)\n")],
           ["tests/test_decode.py::test_every_split_count_agrees", "tests/test_decode.py::test_decode_matches_reference"]),
    mutant("paged-row-stride-ignored",
           "the paged kernels read every sequence's pages from block_table row 0 (its row stride ignored)",
           [(K + "decode.py",
             "page = tl.load(PAGES + b * stride_pb + pos // PAGE_SIZE, mask=ok, other=0)",
             "page = tl.load(PAGES + pos // PAGE_SIZE, mask=ok, other=0)")],
           ["tests/test_paged.py::test_paged_matches_reference"]),
    mutant("reference-gather-pages-off-by-one",
           "reference.gather_pages reads each position from the page after the one its table names",
           [(REF, "rows = [block_table[b, j // page_size].long() * page_size + j % page_size",
             "rows = [(block_table[b, j // page_size].long() + 1) * page_size + j % page_size")],
           ["tests/test_paged.py::test_reference_is_sdpa_on_the_gathered_cache",
            "tests/test_paged.py::test_paged_matches_reference"]),
    # ------------------------------------------------------------------ integrations
    mutant("sdpa-ignores-scale",
           "the SDPA drop-in drops its scale argument (the kernels use 1 / sqrt(D))",
           [(K + "sdpa.py", "attention(q, k, v, causal=causal, scale=scale, impl=impl, dropout_p=dropout_p)",
             "attention(q, k, v, causal=causal, impl=impl, dropout_p=dropout_p)")],
           ["tests/test_sdpa.py::test_scale_and_transposed_layout"]),
    mutant("ring-plan-window-flipped",
           "ring attention's plan gives a piece's kernel the right bound right + ke - qe instead of right + qe - ke",
           [(K + "distributed.py", "kernel_right = -1 if right < 0 else int(right + qe - ke)",
             "kernel_right = -1 if right < 0 else int(right + ke - qe)")],
           ["tests/test_distributed.py::test_the_plan_computes_every_visible_pair_once"]),
]

BY_NAME = {m.name: m for m in MUTANTS}


# ----------------------------------------------------------------------------- applying


class SnippetError(ValueError):
    """A mutant's snippet does not occur exactly once in its file: the list is out of step with the code."""


def problems(m, root=REPO):
    """What keeps mutant m from applying to the sources under root (an empty list: it applies),
    its edits taken in order, each snippet exactly once in the file as the earlier edits left it."""
    found, texts = [], {}
    for e in m.edits:
        path = Path(root) / e.file
        if e.old == e.new:
            found.append(f"{m.name}: an edit of {e.file} changes nothing")
            continue
        if e.file not in texts:
            if not path.is_file():
                found.append(f"{m.name}: {e.file} does not exist")
                continue
            texts[e.file] = path.read_text()
        n = texts[e.file].count(e.old)
        if n != 1:
            found.append(f"{m.name}: the snippet {e.old!r} occurs {n} times in {e.file}, not once")
            continue
        texts[e.file] = texts[e.file].replace(e.old, e.new, 1)
    return found


def apply(m, root):
    """Apply mutant m to the copy at root, in place; SnippetError when a snippet is not there exactly once."""
    found = problems(m, root)
    if found:
        raise SnippetError("; ".join(found))
    for e in m.edits:
        path = Path(root) / e.file
        path.write_text(path.read_text().replace(e.old, e.new, 1))


def source_files(root=REPO):
    """The repository's files, relative to root: git's tracked and untracked-but-not-ignored files
    that exist; without git, every file outside the usual build, cache and environment folders."""
    try:
        out = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=root,
                             capture_output=True, check=True).stdout
        names = sorted({n for n in out.decode().split("\0") if n})
        return [n for n in names if (Path(root) / n).is_file() or (Path(root) / n).is_symlink()]
    except (OSError, subprocess.CalledProcessError):
        skip = {".git", ".venv", "venv", "build", "dist", "__pycache__", ".pytest_cache", ".benchmarks", "runs"}
        found = []
        for dirpath, dirnames, filenames in os.walk(root):
            dirnames[:] = [d for d in dirnames if d not in skip and not d.endswith(".egg-info")
                           and not d.startswith(".triton")]
            found += [os.path.relpath(os.path.join(dirpath, f), root) for f in filenames]
        return sorted(found)


def make_copy(dest, root=REPO, files=None):
    """Copy the repository's files (`source_files`) into dest."""
    for name in files if files is not None else source_files(root):
        target = Path(dest) / name
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(Path(root) / name, target, follow_symlinks=False)


PROBE_SOURCE = textwrap.dedent('''
    """Written by attention_kernels.testing.mutants into a mutant's copy: records which
    attention_kernels the run imports and the first test that failed."""
    import importlib.util
    import json
    import os
    import sys

    _state = {"first_failure": None, "passed": 0, "failed": 0, "skipped": 0}


    def pytest_configure(config):
        spec = importlib.util.find_spec("attention_kernels")
        _state["found"] = None if spec is None else spec.origin


    def pytest_collectreport(report):
        if report.failed and _state["first_failure"] is None:
            _state["first_failure"] = "collecting " + (report.nodeid or "?")


    def pytest_runtest_logreport(report):
        if report.passed and report.when == "call":
            _state["passed"] += 1
        elif report.skipped:
            _state["skipped"] += 1
        elif report.failed:
            _state["failed"] += 1
            if _state["first_failure"] is None:
                _state["first_failure"] = report.nodeid + ("" if report.when == "call" else f" ({report.when})")


    def pytest_sessionfinish(session, exitstatus):
        module = sys.modules.get("attention_kernels")
        _state["imported"] = getattr(module, "__file__", None)
        with open(os.environ["MUTANTS_PROBE_OUT"], "w") as f:
            json.dump(_state, f)
''')


# ----------------------------------------------------------------------------- running


@dataclass
class Result:
    name: str
    files: list
    status: str          # "killed", "survived", "error" or "timeout" ("passed" / "failed" for a baseline)
    caught_by: str = ""  # the first failing test, or what went wrong
    seconds: float = 0.0
    copy: str = ""       # the copy, when kept
    log: str = field(default="", repr=False)


def _inside(path, root):
    try:
        return path is not None and Path(path).resolve().is_relative_to(Path(root).resolve())
    except OSError:
        return False


def run_one(m, *, baseline=False, keep=False, timeout=DEFAULT_TIMEOUT_S, source=REPO, threads=None):
    """Copy the repository (or the snapshot `source` of it), apply m (not with baseline), run its
    tests in the copy; a Result."""
    dest = tempfile.mkdtemp(prefix=f"mutant-{m.name}-")
    try:
        if Path(source) == REPO:
            make_copy(dest)
        else:
            shutil.copytree(source, dest, symlinks=True, dirs_exist_ok=True)
        if not baseline:
            try:
                apply(m, dest)
            except SnippetError as e:
                return Result(m.name, m.files, "error", str(e), 0.0, dest if keep else "")
        (Path(dest) / f"{PROBE}.py").write_text(PROBE_SOURCE)
        probe_out = Path(dest) / ".mutants-probe.json"
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join([dest, *filter(None, [env.get("PYTHONPATH")])])
        env["PYTHONDONTWRITEBYTECODE"] = "1"
        env["MUTANTS_PROBE_OUT"] = str(probe_out)
        if threads:
            env.setdefault("OMP_NUM_THREADS", str(threads))
        cmd = [sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider", "-p", PROBE, *m.pytest_args()]
        start = time.monotonic()
        try:
            proc = subprocess.run(cmd, cwd=dest, env=env, capture_output=True, text=True, timeout=timeout)
        except subprocess.TimeoutExpired as e:
            out = (e.stdout or b"").decode() if isinstance(e.stdout, bytes) else (e.stdout or "")
            return Result(m.name, m.files, "timeout", f"no verdict after {timeout} s", time.monotonic() - start,
                          dest if keep else "", out)
        seconds = time.monotonic() - start
        log = proc.stdout + proc.stderr
        if keep:
            (Path(dest) / ".mutants-pytest.log").write_text(log)
        probe = json.loads(probe_out.read_text()) if probe_out.is_file() else None
        result = Result(m.name, m.files, "error", "", seconds, dest if keep else "", log)
        if probe is None:
            result.caught_by = f"pytest exited {proc.returncode} without running the probe"
        elif not _inside(probe.get("found"), dest) or (probe.get("imported") and not _inside(probe["imported"], dest)):
            result.caught_by = (f"the run imported attention_kernels from {probe.get('imported') or probe.get('found')}, "
                                f"not from the copy {dest}")
        elif proc.returncode in (1, 2) and probe["first_failure"]:
            result.status, result.caught_by = ("failed" if baseline else "killed"), probe["first_failure"]
        elif proc.returncode == 0 and probe["passed"] > 0:
            result.status = "passed" if baseline else "survived"
            result.caught_by = f"{probe['passed']} passed" + (f", {probe['skipped']} skipped" if probe["skipped"] else "")
        elif proc.returncode in (0, 5):
            result.caught_by = "no test ran (the selection matches nothing, or everything skipped)"
        else:
            last = log.strip().splitlines()[-1:] or [""]
            result.caught_by = f"pytest exited {proc.returncode}: {last[0][:120]}"
        return result
    finally:
        if not keep:
            shutil.rmtree(dest, ignore_errors=True)


def run_all(mutants, *, jobs=1, baseline=False, keep=False, timeout=DEFAULT_TIMEOUT_S, report=None):
    """Run every mutant (jobs at a time); the Results in the list's order. report(result) is
    called as each finishes. Every mutant starts from one snapshot of the repository, taken
    first, so that edits made meanwhile do not reach some mutants and not others."""
    threads = max(1, (os.cpu_count() or 1) // jobs) if jobs > 1 else None
    lock = threading.Lock()
    with tempfile.TemporaryDirectory(prefix="mutants-snapshot-") as snapshot:
        make_copy(snapshot)

        def one(m):
            r = run_one(m, baseline=baseline, keep=keep, timeout=timeout, source=snapshot, threads=threads)
            if report is not None:
                with lock:
                    report(r)
            return r

        with concurrent.futures.ThreadPoolExecutor(max_workers=jobs) as pool:
            return list(pool.map(one, mutants))


# ----------------------------------------------------------------------------- reporting


def table(results, markdown=False):
    head = ["mutant", "file", "result", "caught by", "time"]
    rows = [[r.name, ", ".join(f.removeprefix("attention_kernels/") for f in r.files), r.status, r.caught_by,
             f"{r.seconds:.0f} s"] for r in results]
    if markdown:
        esc = lambda s: s.replace("|", "\\|")
        lines = ["| " + " | ".join(head) + " |", "|" + "|".join(["---"] * 4 + ["---:"]) + "|"]
        lines += ["| " + " | ".join(esc(c) if i not in (0, 3) else f"`{esc(c)}`" if c else "" for i, c in enumerate(row))
                  + " |" for row in rows]
        return "\n".join(lines)
    widths = [max(len(x) for x in col) for col in zip(head, *rows)]
    fmt = lambda row: "  ".join(c.rjust(w) if i == 4 else c.ljust(w) for i, (c, w) in enumerate(zip(row, widths)))
    return "\n".join([fmt(head), fmt(["-" * w for w in widths]), *map(fmt, rows)]).rstrip()


def summary(results, seconds, baseline=False):
    count = lambda s: sum(r.status == s for r in results)
    if baseline:
        return (f"{len(results)} selections run unmutated: {count('passed')} passed, {count('failed')} failed, "
                f"{count('error') + count('timeout')} not judged; {seconds:.0f} s in all")
    return (f"{len(results)} mutant{'s' * (len(results) != 1)}: {count('killed')} killed, {count('survived')} survived, "
            f"{count('error') + count('timeout')} not judged; {seconds:.0f} s in all")


def listing(mutants):
    lines = []
    for m in mutants:
        bad = problems(m)
        lines.append(f"{m.name}  ({', '.join(m.files)}){'  STALE: ' + '; '.join(bad) if bad else ''}\n"
                     f"    {m.description}\n    pytest {' '.join(repr(a) if ' ' in a else a for a in m.pytest_args())}")
    return "\n".join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m attention_kernels.testing.mutants",
                                     description="Apply plausible bugs one at a time to a copy of the repository, run "
                                                 "the tests that should catch each, and report the survivors.")
    parser.add_argument("--list", action="store_true", help="list the mutants and whether each still applies; run nothing")
    parser.add_argument("--only", nargs="+", metavar="NAME", help="run only these mutants")
    parser.add_argument("--jobs", type=int, default=1, help="mutants run at once (default 1)")
    parser.add_argument("--keep", action="store_true", help="keep each mutant's copy (and its pytest log) and say where")
    parser.add_argument("--markdown", action="store_true", help="print the table as Markdown")
    parser.add_argument("--timeout", type=float, default=DEFAULT_TIMEOUT_S, help="seconds per mutant's tests "
                        f"(default {DEFAULT_TIMEOUT_S}); past it the mutant is not judged")
    parser.add_argument("--baseline", action="store_true", help="run each mutant's tests on the unmutated copy "
                        "instead: every selection must pass there (and this gives its time)")
    args = parser.parse_args(argv)
    if args.jobs < 1:
        parser.error(f"--jobs must be >= 1, got {args.jobs}")
    if not (REPO / "pyproject.toml").is_file() or not (REPO / "tests").is_dir():
        parser.error(f"{REPO} is not a checkout of the repository (no pyproject.toml and tests/): the mutation check "
                     "copies a checkout and runs its tests")
    unknown = [n for n in args.only or () if n not in BY_NAME]
    if unknown:
        parser.error(f"no mutant named {', '.join(unknown)}; --list names them")
    mutants = [BY_NAME[n] for n in dict.fromkeys(args.only)] if args.only else MUTANTS
    if args.list:
        print(listing(mutants))
        return 0
    stale = [p for m in mutants for p in problems(m)]
    if stale:  # loudly, before any time is spent: the list must follow the code
        print("mutants out of step with the source:\n  " + "\n  ".join(stale), file=sys.stderr)
        return 2

    def report(r):
        print(f"{r.status:>8}  {r.name}  {r.seconds:.0f} s  {r.caught_by}" + (f"  [{r.copy}]" if r.copy else ""),
              file=sys.stderr, flush=True)
        if r.status in ("error", "timeout") and r.log:
            print(textwrap.indent("\n".join(r.log.strip().splitlines()[-15:]), "    | "), file=sys.stderr, flush=True)

    start = time.monotonic()
    results = run_all(mutants, jobs=args.jobs, baseline=args.baseline, keep=args.keep, timeout=args.timeout,
                      report=report)
    print(table(results, args.markdown))
    print()
    print(summary(results, time.monotonic() - start, args.baseline))
    survivors = [r.name for r in results if r.status == "survived"]
    if survivors:
        print("survived: " + ", ".join(survivors))
    ok = {"passed"} if args.baseline else {"killed"}
    return 0 if all(r.status in ok for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
