"""
The out folder of `benchmarks.gpu_check`, written as rows arrive, and its closing summary: the
targets (measured / target / met) and the tables, printed last and written to summary.md.

Files: log.txt, env.json, correctness.csv (CORRECTNESS_FIELDS), timing.csv (TIMING_FIELDS: the
sweep's columns, plus each row's speed against every SDPA backend and FlexAttention measured on
the same shape and mode), tuned.json ({GPU name: {shape class: entry}}, as `kernels.tuning`
merges it) and summary.md.
"""

import collections
import csv
import datetime
import json
import math
import os
import threading
import time

SDPA = ("sdpa-flash", "sdpa-efficient", "sdpa-cudnn", "sdpa-math")
VERSUS = (*SDPA, "flex", "flash", "decode")  # the implementations each timing row is compared with
CORRECTNESS_FIELDS = ["check", "impl", "dtype", "shape", "layout", "causal", "window", "tma", "seed", "status",
                      "passed", "worst", "max_err", "ref_err", "tol", "ratio", "grad_ratio", "details", "seconds",
                      "message"]
TIMING_FIELDS = ["part", "impl", "B", "H", "Hkv", "T", "D", "C", "dtype", "causal", "mode", "status",
                 "ms_p20", "ms_p50", "ms_p80", "tflops", "gbps", "peak_mib", "frac_matmul_ceiling",
                 "frac_copy_ceiling", "vs_best_sdpa", *[f"vs_{impl.replace('-', '_')}" for impl in VERSUS],
                 "tiles", "note", "device", "torch", "triton", "commit", "timestamp"]
CPU_NOTE = ("NOTE: no CUDA GPU: the kernels ran under Triton's CPU interpreter at tiny sizes. These timings "
            "mean nothing for GPU speed; this run shows the command's flow end to end.")


# ----------------------------------------------------------------------------- the out folder


class Results:
    """The out folder, written as rows arrive from any child (lanes run in threads)."""

    def __init__(self, out_dir, env):
        os.makedirs(out_dir, exist_ok=True)
        self.dir, self.env, self.lock = out_dir, env, threading.RLock()
        self.log = open(self.path("log.txt"), "w")
        self.correctness, self.timing, self.tuned = [], [], {}
        with open(self.path("correctness.csv"), "w", newline="") as f:
            csv.DictWriter(f, CORRECTNESS_FIELDS).writeheader()
        self.write_timing()
        self.write_json("tuned.json", self.tuned)
        self.write_json("env.json", self.env)
        with open(self.path("summary.md"), "w") as f:
            f.write("# gpu_check: run in progress\n\nThis run did not get to its summary; see log.txt and the CSVs.\n")

    def path(self, name):
        return os.path.join(self.dir, name)

    def say(self, line=""):
        with self.lock:
            print(line, flush=True)
            self.log.write(line + "\n")
            self.log.flush()

    def write_json(self, name, data):
        with open(self.path(name), "w") as f:
            json.dump(data, f, indent=1, default=str)
            f.write("\n")

    def write_timing(self):
        with open(self.path("timing.csv"), "w", newline="") as f:
            writer = csv.DictWriter(f, TIMING_FIELDS, extrasaction="ignore")
            writer.writeheader()
            for row in with_ratios(self.timing):
                writer.writerow({k: (f"{v:.6g}" if isinstance(v, float) else v) for k, v in row.items()})

    def add(self, row):
        """Route one row from a child (or the parent's record of a row a child did not finish)."""
        with self.lock:
            table = row.pop("table")
            if table == "correctness":
                self.correctness.append(row)
                with open(self.path("correctness.csv"), "a", newline="") as f:
                    csv.DictWriter(f, CORRECTNESS_FIELDS, extrasaction="ignore").writerow(
                        {k: (f"{v:.4g}" if isinstance(v, float) else v) for k, v in row.items()})
                verdict = {True: "PASS", False: "FAIL"}.get(row.get("passed"), "----")
                what = (f"{row['worst']} error {row['max_err']:.3g} {'<=' if row['passed'] else '>'} tolerance "
                        f"{row['tol']:.3g} (the worst of {row['details'].count(';') + 1})"
                        if row.get("worst") and row["status"] == "ok" else row["status"])
                self.say(f"  {verdict} {row['check']}: {what}")
            elif table == "timing":
                row.update({k: self.env.get(k) for k in ("device", "torch", "triton", "commit")},
                           timestamp=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"))
                ceilings = self.env.get("ceilings", {})
                if row.get("tflops") is not None and ceilings.get("matmul_tflops"):
                    row["frac_matmul_ceiling"] = row["tflops"] / ceilings["matmul_tflops"]
                if row.get("gbps") is not None and ceilings.get("copy_gbps"):
                    row["frac_copy_ceiling"] = row["gbps"] / ceilings["copy_gbps"]
                self.timing.append(row)
                self.write_timing()
                speed = (f"  {row['ms_p50']:.4g} ms, {row['tflops']:.3g} TFLOP/s, {row['gbps']:.4g} GB/s"
                         if row.get("ms_p50") else "")
                self.say(f"  {row['impl']} {row['mode']} B{row['B']} H{row['H']} T{row['T']} D{row['D']} "
                         f"{'causal' if row['causal'] else 'full'}: {row['status']}{speed}")
            elif table == "tuned":
                self.tuned.setdefault(row["gpu"], {})[row["class"]] = row["entry"]
                self.write_json("tuned.json", self.tuned)
                self.say(f"  tuned {row['class']}: {row['entry']['config']} {fmt(row['entry']['ms'], '.4g')} ms")
            elif table in ("env", "tuning"):
                if table == "env":
                    row.setdefault("ceilings_status", row.pop("status", "ok"))
                    self.env.update(row)
                else:
                    self.env.setdefault("tuning", []).append(row)
                    self.say(f"  {row['step']} {row.get('what', '')}: {row['status']}")
                self.write_json("env.json", self.env)


def with_ratios(rows):
    """Each row with its speed against every other implementation measured on the same shape and
    mode: vs_<impl> = that impl's time / this row's (above 1: this row is faster)."""
    key = lambda r: tuple(r.get(k) for k in ("part", "B", "H", "Hkv", "T", "D", "dtype", "causal", "mode"))
    best = collections.defaultdict(dict)
    for r in rows:
        if r.get("ms_p50"):
            impl = r["impl"].replace("-expanded", "")  # decode: SDPA on k/v expanded to every query head
            best[key(r)][impl] = min(r["ms_p50"], best[key(r)].get(impl, math.inf))
    out = []
    for r in rows:
        r = dict(r)
        if r.get("ms_p50"):
            times = best[key(r)]
            sdpa = [times[i] for i in SDPA if i in times]
            if sdpa:
                r["vs_best_sdpa"] = min(sdpa) / r["ms_p50"]
            for impl in VERSUS:
                if impl in times and impl != r["impl"]:
                    r[f"vs_{impl.replace('-', '_')}"] = times[impl] / r["ms_p50"]
        out.append(r)
    return out


# ----------------------------------------------------------------------------- summary


def fmt(x, spec=".3g"):
    return "-" if x is None or x == "" else format(x, spec) if isinstance(x, (int, float)) else str(x)


def targets(p, results):
    """(what, measured, target, met) for the two targets, on the first timed shape (on a GPU:
    bf16, T = 8k, D = 128, causal, B * T = 16k tokens, H * D = 2048)."""
    B, H, T, D, causal = p["shapes"][0]
    rows = with_ratios(results.timing)
    ident = lambda r: (r["impl"], r["mode"], r["part"], r["B"], r["H"], r["T"], r["D"], r["causal"])
    find = lambda impl, mode: next((r for r in rows if ident(r) == (impl, mode, "attention", B, H, T, D, causal)), {})
    fwd, bwd = find("flash", "fwd"), find("flash", "bwd")
    det = next((r for r in results.correctness
                if r["check"].startswith("determinism") and r["check"].endswith("target")), {})
    shape = f"T = {T}, D = {D}, {'causal' if causal else 'full'}"
    out = [(f"flash forward x SDPA cuDNN ({shape})", fwd.get("vs_sdpa_cudnn"), 1.0),
           (f"flash forward x SDPA flash ({shape})", fwd.get("vs_sdpa_flash"), 1.5),
           (f"flash forward x FlexAttention ({shape})", fwd.get("vs_flex"), 1.3),
           (f"flash forward TFLOP/s ({shape})", fwd.get("tflops"), 600.0),
           (f"flash backward x fastest SDPA ({shape})", bwd.get("vs_best_sdpa"), 1.0),
           (f"flash backward TFLOP/s ({shape})", bwd.get("tflops"), 450.0)]
    out = [(what, got, goal, "not measured" if got is None else "met" if got >= goal else "NOT met")
           for what, got, goal in out]
    passed = det.get("passed")
    out.append((f"flash backward deterministic ({shape})", {True: "yes", False: "no"}.get(passed, "-"), "yes",
                {True: "met", False: "NOT met"}.get(passed, "not measured")))
    return out


def capped(lines, most):
    return lines[:most] + ([f"  ... and {len(lines) - most} more (correctness.csv)"] if len(lines) > most else [])


def attention_table(rows):
    table = ["| impl | mode | T | D | mask | ms p50 | TFLOP/s | of matmul | x best SDPA | x cuDNN | x SDPA flash | "
             "x efficient | x Flex | status |", "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        table.append(f"| {r['impl']} | {r['mode']} | {r['T']} | {r['D']} | {'causal' if r['causal'] else 'full'} | "
                     f"{fmt(r.get('ms_p50'), '.4g')} | {fmt(r.get('tflops'))} | "
                     f"{fmt(r.get('frac_matmul_ceiling'), '.2f')} | "
                     f"{fmt(r.get('vs_best_sdpa'))} | {fmt(r.get('vs_sdpa_cudnn'))} | {fmt(r.get('vs_sdpa_flash'))} | "
                     f"{fmt(r.get('vs_sdpa_efficient'))} | {fmt(r.get('vs_flex'))} | {r['status'][:32]} |")
    return table


def summarize(p, results, started, budget):
    """The closing summary: the lines to print (the tables first, the targets last: the device
    tool returns only the end of the output) and summary.md (everything, targets first)."""
    env, rows = results.env, with_ratios(results.timing)
    ceil = env.get("ceilings", {})
    head = (f"gpu_check on {env.get('device')}: torch {env.get('torch')}, triton {env.get('triton')}, "
            f"python {env.get('python')}; {time.time() - started:.0f} s of a {budget:.0f} s budget")
    ceilings = (f"ceilings: {fmt(ceil.get('matmul_tflops'))} TFLOP/s matmul, {fmt(ceil.get('copy_gbps'), '.0f')} GB/s "
                f"copy ({ceil.get('what', 'not measured')})")

    # every check of ours counts, the peaky case through flash too; SDPA's peaky rows are there for
    # comparison, their ratios printed below
    checks = [r for r in results.correctness if not (r["check"].startswith("peaky") and r["impl"].startswith("sdpa"))]
    failed = [r for r in checks if r.get("passed") is False]
    not_run = [r for r in checks if r.get("passed") not in (True, False)]
    correctness = [f"correctness: {sum(r.get('passed') is True for r in checks)} passed, {len(failed)} FAILED, "
                   f"{len(not_run)} not run (refused, timeout or budget)",
                   *capped([f"  FAILED {r['check']}: {r.get('message') or r.get('details')}"[:240] for r in failed], 8),
                   *capped([f"  not run: {r['check']}: {r['status']}"[:160] for r in not_run], 4)]
    peaky = collections.defaultdict(list)
    for r in results.correctness:
        if r["check"].startswith("peaky") and r.get("grad_ratio") not in (None, ""):
            peaky[r["impl"]].append(r["grad_ratio"])
    if peaky:
        correctness.append("peaky softmax (bf16, q (1,3,2,64), k v (1,1,2,64), full, scale 2), max gradient error "
                           "/ the rule's tolerance per seed (above 1 fails): " +
                           "; ".join(f"{impl} {' '.join(f'{x:.2g}' for x in v)}" for impl, v in peaky.items()))
    tuning = env.get("tuning", [])
    pre = next((t for t in tuning if t.get("step") == "precompile"), {})
    tuned = [t for t in tuning if t.get("step") == "tune" and t.get("status") == "ok"]
    correctness.append(
        f"tuning: precompiled {fmt(pre.get('compiled'))} of {fmt(pre.get('jobs'))} binaries in "
        f"{fmt(pre.get('seconds'), '.0f')} s ({pre.get('status', 'not run')}); {len(tuned)} runs tuned "
        f"{sum(len(e) for e in results.tuned.values())} classes in "
        f"{sum(t.get('seconds', 0) for t in tuned):.0f} s, compiling {sum(t.get('compiles_missed', 0) for t in tuned)} "
        f"binaries the cache lacked, loading {sum(t.get('compiles_hit', 0) for t in tuned)} from it")

    attention = [r for r in rows if r["part"] == "attention"]
    target = tuple(p["shapes"][0][2:])  # (T, D, causal)
    shown = [r for r in attention if r["impl"] == "flash" or (r["T"], r["D"], r["causal"]) == target]
    # the paged part times decode and SDPA again beside its pools (its ratios need them in one
    # group): the part column tells those rows from the decode part's, x decode compares the pools
    decode = ["| part | impl | B | Hq:Hkv | L | ms p50 | GB/s | of copy GB/s | x best SDPA | x decode | status |",
              "|---|---|---|---|---|---|---|---|---|---|---|"]
    decode += [f"| {r['part']} | {r['impl']} | {r['B']} | {r['H']}:{r['Hkv']} | {r['T']} | "
               f"{fmt(r.get('ms_p50'), '.4g')} | {fmt(r.get('gbps'), '.4g')} | "
               f"{fmt(r.get('frac_copy_ceiling'), '.2f')} | "
               f"{fmt(r.get('vs_best_sdpa'))} | {fmt(r.get('vs_decode'))} | "
               f"{r['status'][:32]} |" for r in rows if r["part"] in ("decode", "paged")]
    goals = ["| target | measured | target | |", "|---|---|---|---|"]
    goals += [f"| {what} | {fmt(got)} | {fmt(goal)} | {met} |" for what, got, goal, met in targets(p, results)]
    goals_title = ("targets (x: the other's time / flash's, above 1 is faster; bf16, B*T = 16k tokens, H*D = 2048)"
                   if p["cuda"] else "targets (NO GPU: these speeds mean nothing)")
    note = [] if p["cuda"] else [CPU_NOTE]
    shapes = "B*T = 16k tokens, H*D = 2048" if p["cuda"] else "tiny, under the interpreter"
    printed = [f"timing ({shapes}): flash on every shape, every implementation on the target's:",
               *attention_table(shown),
               "", "decoding, one new token:", *decode, "", head, ceilings, *correctness, "", goals_title + ":", *goals,
               *note, f"files: {', '.join(sorted(os.listdir(results.dir)))} in {results.dir}"]
    md = [f"# gpu_check, {env.get('device')}, {env.get('date', '')[:10]}", "", head, "",
          f"Command: `{env.get('command')}` (commit {env.get('commit')}, CUDA {env.get('cuda_version')}, "
          f"{env.get('sm_count')} SMs). {ceilings}.", "", f"## {goals_title}", "", *goals, "", "## Checks", "",
          *correctness, "", f"## Timing ({shapes})", "", *attention_table(attention), "", "## Decoding, one new token",
          "", *decode, *(["", *note] if note else [])]
    return printed, "\n".join(md) + "\n"
