"""The explain page (`reference.explain --html`) in a real browser: headless Chromium opens the
file with the network off, and the tests read what it shows. Every matrix and every line of
arithmetic agrees with the trace's tensors; pointing (mouse events, and the keyboard) lights up
exactly the cells a number was computed from; the tile stepper ends on the naive output; every
text meets WCAG AA contrast. Screenshots of the three views are saved as the run's artifacts.

Chromium is driven over its DevTools protocol on a pipe (`--remote-debugging-pipe`): JSON
messages separated by NUL bytes on file descriptors 3 (to it) and 4 (from it), so no port, no
network and no client library. Without Chromium (Debian's `chromium`, which .ci/run installs)
the browser tests skip and say so.
"""

import base64
import itertools
import json
import math
import os
import re
import select
import shutil
import subprocess

import pytest
import torch

from attention_kernels.reference import explain, explain_html
from attention_kernels.reference.tiled import flash_forward

BROWSERS = ("chromium", "chromium-browser", "google-chrome", "chrome", "chromium-headless-shell")
BINARY = os.environ.get("CHROMIUM") or next(filter(None, map(shutil.which, BROWSERS)), None)
needs_browser = pytest.mark.skipif(BINARY is None, reason="no Chromium found (looked for " + ", ".join(BROWSERS) +
                                   " and $CHROMIUM): `apt-get install chromium` runs the page's browser tests")

# (B, T, C, heads, block size): the seed's size; its first sketch's, as docs/explain-T8-C16.html; and two
# sequences of an odd length, whose last key block is short
PAGES = {"T2-C3": (1, 2, 3, 1, 1), "T8-C16": (1, 8, 16, 4, 2), "B2-T5-C6": (2, 5, 6, 2, 2)}
SHOTS = os.environ.get("EXPLAIN_PAGE_SHOTS")  # a folder to keep the screenshots in; else the test's tmp_path
WIDTH, HEIGHT = 1600, 1000
SHOWN = 0.5e-4 + 1e-9  # a number shown with 4 decimals is within half a unit of its last digit


class Chromium:
    """One headless Chromium and one page in it, over the DevTools protocol on a pipe."""

    def __init__(self, profile):
        to_browser, self._to_browser = os.pipe()
        self._from_browser, from_browser = os.pipe()

        def as_fds_3_and_4():  # where --remote-debugging-pipe reads and writes
            os.dup2(to_browser, 3)
            os.dup2(from_browser, 4)

        self.process = subprocess.Popen(
            [BINARY, "--headless", "--no-sandbox", "--disable-gpu", "--remote-debugging-pipe", "--no-first-run",
             "--no-default-browser-check", "--disable-extensions", "--disable-background-networking",
             "--disable-component-update", "--disable-sync", "--hide-scrollbars", "--force-color-profile=srgb",
             f"--user-data-dir={profile}", f"--window-size={WIDTH},{HEIGHT}", "about:blank"],
            pass_fds=(3, 4), preexec_fn=as_fds_3_and_4,  # noqa: PLW1509 (one thread: the fixture's)
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        os.close(to_browser)
        os.close(from_browser)
        self._buffer, self._next_id, self.events, self.session = b"", 0, [], None
        target = self.call("Target.createTarget", url="about:blank")["targetId"]
        self.session = self.call("Target.attachToTarget", targetId=target, flatten=True)["sessionId"]
        for domain in ("Page", "Runtime", "Network"):
            self.call(f"{domain}.enable")
        self.call("Emulation.setDeviceMetricsOverride", width=WIDTH, height=HEIGHT, deviceScaleFactor=1, mobile=False)

    def _receive(self, timeout=60):
        while b"\0" not in self._buffer:
            ready, _, _ = select.select([self._from_browser], [], [], timeout)
            chunk = os.read(self._from_browser, 1 << 20) if ready else b""
            if not chunk:
                raise RuntimeError("Chromium did not answer" if not ready else "Chromium closed its pipe")
            self._buffer += chunk
        message, self._buffer = self._buffer.split(b"\0", 1)
        return json.loads(message)

    def call(self, method, **params):
        self._next_id += 1
        message = {"id": self._next_id, "method": method, "params": params}
        if self.session and not method.startswith(("Target.", "Browser.")):
            message["sessionId"] = self.session
        os.write(self._to_browser, json.dumps(message).encode() + b"\0")
        while True:
            reply = self._receive()
            if reply.get("id") == self._next_id:
                if "error" in reply:
                    raise RuntimeError(f"{method}: {reply['error']}")
                return reply["result"]
            self.events.append(reply)

    def wait_for(self, event):
        while True:
            found = next((e for e in self.events if e.get("method") == event), None)
            if found:
                self.events.remove(found)
                return found
            self.events.append(self._receive())

    def js(self, expression):
        """The value of a JavaScript expression in the page (promises awaited); raises its error."""
        reply = self.call("Runtime.evaluate", expression=expression, returnByValue=True, awaitPromise=True)
        if "exceptionDetails" in reply:
            raise AssertionError(f"{expression[:200]}...: {reply['exceptionDetails']}")
        return reply["result"].get("value")

    def open(self, path):
        self.events.clear()
        self.call("Page.navigate", url=f"file://{path}")
        self.wait_for("Page.loadEventFired")
        requests = [e["params"]["request"]["url"] for e in self.events
                    if e.get("method") == "Network.requestWillBeSent"]
        assert all(url.startswith(("file:", "data:", "about:")) for url in requests), requests

    def point(self, selector):
        """Moves the mouse onto the element, as a person would: scrolled into view, then a real mouse event."""
        x, y = self.js(f"(() => {{ const e = document.querySelector({json.dumps(selector)}); e.scrollIntoView("
                       "{block: 'center', inline: 'center'}); const r = e.getBoundingClientRect(); "
                       "return [r.x + r.width / 2, r.y + r.height / 2]; })()")
        self.call("Input.dispatchMouseEvent", type="mouseMoved", x=x, y=y)
        return x, y

    def click(self, selector):
        x, y = self.point(selector)
        for kind in ("mousePressed", "mouseReleased"):
            self.call("Input.dispatchMouseEvent", type=kind, x=x, y=y, button="left", clickCount=1)

    def key(self, name):
        code = {"Tab": 9, "ArrowLeft": 37, "ArrowUp": 38, "ArrowRight": 39, "ArrowDown": 40}[name]
        for kind in ("rawKeyDown", "keyUp"):
            self.call("Input.dispatchKeyEvent", type=kind, key=name, code=name, windowsVirtualKeyCode=code)

    def screenshot(self, path):
        with open(path, "wb") as f:
            f.write(base64.b64decode(self.call("Page.captureScreenshot", format="png")["data"]))

    def close(self):
        try:
            self.call("Browser.close")
            self.process.wait(timeout=10)
        except (RuntimeError, OSError, subprocess.TimeoutExpired):
            self.process.kill()
            self.process.wait()
        os.close(self._to_browser)
        os.close(self._from_browser)


# ----------------------------------------------------------------------------- the truth


def truth(B, T, C, H, block_size):
    """The trace's tensors by the page's matrix key ("5:scores"), as float64 numpy arrays, and its
    steps: computed here, not read off the page."""
    x, w = explain.make_inputs(B, T, C, seed=0)
    forward, *_ = explain.trace(x, *w, H)
    backward = explain.trace_backward(forward, explain.make_upstream(B, T, C, seed=0))
    steps = forward + backward
    tensors = {f"{n}:{name}": t.double().numpy() for n, step in enumerate(steps, 1) for name, t in step.tensors.items()}
    return tensors, steps


def index_of(shape, s, i, j):
    """Slice s (row-major over the leading dims), row i, column j, as a full index."""
    return (*list(itertools.product(*map(range, shape[:-2])))[s], i, j)


def parse_label(label, keys):
    """"q[0, 1, 2, 3]" -> ("4:q", (0, 1, 2, 3)): a name and its index's length name one matrix."""
    name, index = re.fullmatch(r"(\w+)\[([\d, ]+)\]", label).groups()
    index = tuple(int(x) for x in index.split(", "))
    return keys[name, len(index)], index


def close_to(shown, value, what):
    """A number as the page shows it against the value it stands for."""
    got = float(shown)
    if value == float("-inf") or got == float("-inf"):
        assert got == value, f"{what}: the page shows {shown}, the trace has {value}"
    else:
        assert abs(got - value) <= SHOWN, f"{what}: the page shows {shown}, the trace has {value!r}"


def sources(key, index, tensors, H, D):
    """The cells (key, full index) a cell was computed from, by the formulas, written out here apart
    from the page's own bookkeeping."""
    name, B = key.split(":")[1], tensors["1:x"].shape[0]
    T, C = tensors["1:x"].shape[1:]
    if key in ("1:x", "2:W_q", "2:W_k", "2:W_v", "7:mask", "12:dy"):
        return set()
    if key[0] == "3":                                            # q[b, t, e] = x[b, t, :] . W[:, e]
        b, t_, e = index
        return {("1:x", (b, t_, c)) for c in range(C)} | {(f"2:W_{name}", (c, e)) for c in range(C)}
    if key[0] == "4":                                            # q[b, h, t, d] = q[b, t, h D + d]
        b, h, t_, d = index
        return {(f"3:{name}", (b, t_, h * D + d))}
    b, h, i, j = index if len(index) == 4 else (None,) * 4
    over = lambda n, k1, at1, k2, at2: ({(k1, (b, h, *at1(x))) for x in range(n)}
                                        | {(k2, (b, h, *at2(x))) for x in range(n)})  # a sum of n products
    found = {
        "5:scores": lambda: over(D, "4:q", lambda d: (i, d), "4:k", lambda d: (j, d)),
        "6:scaled": lambda: {("5:scores", index)},
        "8:masked": lambda: {("6:scaled", index), ("7:mask", (i, j))},
        "9:weights": lambda: {("8:masked", (b, h, i, x)) for x in range(T)},
        "10:out": lambda: over(T, "9:weights", lambda x: (i, x), "4:v", lambda x: (x, j)),
        "13:dO": lambda: {("12:dy", (b, i, h * D + j))},
        "14:dV": lambda: over(T, "9:weights", lambda x: (x, i), "13:dO", lambda x: (x, j)),
        "15:dP": lambda: over(D, "13:dO", lambda d: (i, d), "4:v", lambda d: (j, d)),
        "16:delta": lambda: {(k_, (b, h, i, x)) for k_ in ("15:dP", "9:weights") for x in range(T)},
        "17:dS": lambda: ({(k_, (b, h, i, x)) for k_ in ("15:dP", "9:weights") for x in range(T)}
                          | {("16:delta", (b, h, i, 0))}),
        "18:dQ": lambda: over(T, "17:dS", lambda x: (i, x), "4:k", lambda x: (x, j)),
        "19:dK": lambda: over(T, "17:dS", lambda x: (x, i), "4:q", lambda x: (x, j)),
    }.get(key)
    if found:
        return found()
    if key[0:3] == "11:" or key[0:3] == "20:":                   # heads joined: y[b, t, c] = out[b, c // D, t, c % D]
        b, t_, c = index
        big = {"y": "10:out", "dq": "18:dQ", "dk": "19:dK", "dv": "14:dV"}[name]
        return {(big, (b, c // D, t_, c % D))}
    if key[0:3] == "21:":                                        # dW[c, e] = sum over b, t of x[b, t, c] dq[b, t, e]
        c, e = index
        return {("1:x", (b, t_, c)) for b in range(B) for t_ in range(T)} | {
            (f"20:d{name[-1]}", (b, t_, e)) for b in range(B) for t_ in range(T)}
    if key == "22:dx":                                           # dx[b, t, c] = sum_e dq[b, t, e] W_q[c, e] + ...
        b, t_, c = index
        return {(f"20:d{n}", (b, t_, e)) for n in "qkv" for e in range(C)} | {
            (f"2:W_{n}", (c, e)) for n in "qkv" for e in range(C)}
    raise KeyError(key)


# ----------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def pages(tmp_path_factory):
    """Each size's page, written as `python -m attention_kernels.reference.explain --html` writes it."""
    folder = tmp_path_factory.mktemp("pages")
    written = {}
    for name, (B, T, C, H, block) in PAGES.items():
        written[name] = str(folder / f"explain-{name}.html")
        explain_html.write_page(written[name], B=B, T=T, C=C, n_head=H, block_size=block)
    return written


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    if BINARY is None:
        pytest.skip("no Chromium")
    chromium = Chromium(tmp_path_factory.mktemp("chromium-profile"))
    yield chromium
    chromium.close()


@pytest.fixture(scope="module")
def shots(tmp_path_factory):
    folder = SHOTS or str(tmp_path_factory.mktemp("screenshots"))
    os.makedirs(folder, exist_ok=True)
    return folder


READ_MATRICES = """[...document.querySelectorAll("table.matrix")].map(t => ({
  key: t.dataset.key, s: +t.dataset.s,
  step: t.closest("section.step").querySelector("h2").textContent,
  heading: t.closest("div.tensor").querySelector("h3").textContent,
  rows: [...t.tBodies[0].rows].map(r => [...r.querySelectorAll("td")].map(c => c.textContent))}))"""

# Every cell, explained as pointing at it explains it (the page's own `show`), read off the panel.
READ_EVERY_EXPLANATION = """(() => {
  const where = td => { const t = td.closest("table");
                         return [t.dataset.key, +t.dataset.s, td.parentElement.sectionRowIndex, td.cellIndex - 1]; };
  const texts = (root, sel) => [...root.querySelectorAll(sel)].map(e => e.textContent);
  return [...document.querySelectorAll("td.cell")].map(td => {
    show(td);
    const p = document.getElementById("panel");
    return {cell: where(td), head: texts(p, "h2.cell span"),
            terms: [...p.querySelectorAll("tr.term")].map(r => texts(r, "td")),
            exps: [...p.querySelectorAll("tr.exp")].map(r => texts(r, "td")),
            jac: [...p.querySelectorAll("table.jac tr")].map(r => texts(r, "td")),
            from: texts(p, "p.from span"), short: texts(p, "p.short span"), sum: texts(p, "p.sum .val"),
            max: texts(p, "p.max .val"), result: texts(p, "p.result span"),
            lit: [...document.querySelectorAll("td.source")].map(where)};
  });
})()"""


def differs(lit, expected):
    return (f"the page lights up {len(lit)} cells, its sources are {len(expected)}; not lit: "
            f"{sorted(expected - lit)[:8]}, lit but no source: {sorted(lit - expected)[:8]}")


def tensor_keys(tensors):
    return {(key.split(":")[1], t.ndim): key for key, t in tensors.items()}


# ----------------------------------------------------------------------------- the tests


@needs_browser
@pytest.mark.parametrize("page", PAGES)
def test_every_matrix_shows_the_trace(browser, pages, page):
    tensors, steps = truth(*PAGES[page])
    browser.open(pages[page])
    shown = browser.js(READ_MATRICES)
    assert {m["key"] for m in shown} == set(tensors), "the page's matrices are not the trace's tensors"
    for m in shown:
        t = tensors[m["key"]]
        n = int(m["key"].split(":")[0])
        assert m["step"].startswith(f"{n}. {steps[n - 1].title}") and steps[n - 1].dims in m["step"], m["step"]
        assert f"shape {tuple(t.shape)}".replace(",)", ")") in m["heading"], m["heading"]
        assert len(m["rows"]) == t.shape[-2] and all(len(r) == t.shape[-1] for r in m["rows"])
        for i, row in enumerate(m["rows"]):
            for j, text in enumerate(row):
                index = index_of(t.shape, m["s"], i, j)
                close_to(text, t[index], f"{m['key']}{list(index)}")
    assert sum(len(m["rows"]) * len(m["rows"][0]) for m in shown) == sum(t.size for t in tensors.values())


@needs_browser
@pytest.mark.parametrize("page", PAGES)
def test_every_arithmetic_agrees_with_the_trace(browser, pages, page):
    _, _, C, H, _ = PAGES[page]
    D = C // H
    tensors, _ = truth(*PAGES[page])
    keys = tensor_keys(tensors)
    value = lambda label: tensors[parse_label(label, keys)[0]][parse_label(label, keys)[1]]
    browser.open(pages[page])
    explained = browser.js(READ_EVERY_EXPLANATION)
    assert len(explained) == sum(t.size for t in tensors.values())
    for cell in explained:
        key, s, i, j = cell["cell"]
        index = index_of(tensors[key].shape, s, i, j)
        own, where = tensors[key][index], f"{key}{list(index)}"
        assert parse_label(cell["head"][0], keys) == (key, index), (cell["head"], where)
        close_to(cell["head"][1], own, where)
        lit = {(k, index_of(tensors[k].shape, s_, i_, j_)) for k, s_, i_, j_ in cell["lit"]}
        assert lit == sources(key, index, tensors, H, D), f"{where}: {differs(lit, sources(key, index, tensors, H, D))}"
        if cell["terms"]:                                              # a sum of products
            total = 0.0
            for a_label, a, _, b_label, b, _, product in cell["terms"]:
                close_to(a, value(a_label), f"{where}: {a_label}")
                if key == "17:dS":                                     # b is the softmax Jacobian's J[k, j]
                    k = int(re.fullmatch(r"J\[(\d+), \d+\]", b_label).group(1))
                    P = tensors["9:weights"][index[:3]]
                    b_true = P[k] * ((k == j) - P[j])
                    close_to(cell["jac"][k][j], b_true, f"{where}: J[{k}, {j}]")
                else:
                    b_true = value(b_label)
                close_to(b, b_true, f"{where}: {b_label}")
                close_to(product, value(a_label) * b_true, f"{where}: {a_label} x {b_label}")
                total += value(a_label) * b_true
            close_to(cell["sum"][0], total, f"{where}: the sum")
            scale = 1 / math.sqrt(D) if key in ("18:dQ", "19:dK") else 1.0
            close_to(cell["result"][-1], total * scale, f"{where}: the result")
            if key == "17:dS":
                P, dP, delta = (tensors[k_][index[:3]] for k_ in ("9:weights", "15:dP", "16:delta"))
                for text, v in zip(cell["short"], (P[j], dP[j], delta[0])):
                    close_to(text, v, f"{where}: P_j (dP_j - delta)")
        elif cell["exps"]:                                             # a softmax weight
            row = tensors["8:masked"][index[:3]]
            close_to(cell["max"][0], row.max(), f"{where}: the row's max")
            exps = [math.exp(v - row.max()) for v in row]
            for (label, v, _, e), e_true in zip(cell["exps"], exps):
                close_to(v, value(label), f"{where}: {label}")
                close_to(e, e_true, f"{where}: exp({label} - m)")
            close_to(cell["sum"][0], sum(exps), f"{where}: the sum of exps")
            e_own, e_sum, result = cell["result"]
            close_to(e_own, exps[j], where)
            close_to(e_sum, sum(exps), where)
            close_to(result, exps[j] / sum(exps), where)
        elif cell["from"]:                                             # moved, scaled or masked
            labels, values = cell["from"][0::2], cell["from"][1::2]
            for label, v in zip(labels, values):
                close_to(v, value(label), f"{where}: {label}")
            close_to(cell["result"][-1], own, where)
        else:
            assert key in ("1:x", "2:W_q", "2:W_k", "2:W_v", "7:mask", "12:dy"), f"{where}: no arithmetic shown"


def divmod_all(n, shape):
    """The full index of the n-th value of a tensor of this shape, in row-major order."""
    index = []
    for size in reversed(shape):
        n, at = divmod(n, size)
        index.append(at)
    return index[::-1]


def view_of(key):
    return "forward" if int(key.split(":")[0]) <= 11 else "backward"


@needs_browser
@pytest.mark.parametrize("page", PAGES)
def test_pointing_lights_up_the_sources(browser, pages, page):
    _, _, C, H, _ = PAGES[page]
    tensors, _ = truth(*PAGES[page])
    browser.open(pages[page])
    matrices = browser.js("MATRICES.map(m => [m.key, m.offset])")
    rng = torch.Generator().manual_seed(len(matrices))
    current = None
    for key, offset in matrices:                                       # each matrix: its last cell and one drawn
        size = tensors[key].size
        for n in sorted({size - 1, int(torch.randint(size, (1,), generator=rng))}):
            if view_of(key) != current:
                browser.click(f"#tab-{view_of(key)}")
                current = view_of(key)
            browser.point(f"#c{offset + n}")
            index = tuple(int(x) for x in divmod_all(n, tensors[key].shape))
            lit = browser.js("""[...document.querySelectorAll("td.source, td.current")].map(td => [td.className,
                td.closest("table").dataset.key, +td.closest("table").dataset.s, td.parentElement.sectionRowIndex,
                td.cellIndex - 1])""")
            current_cells = [(k, index_of(tensors[k].shape, *rest)) for cls, k, *rest in lit if "current" in cls]
            assert current_cells == [(key, index)], f"pointed at {key}{list(index)}, the page marks {current_cells}"
            got = {(k, index_of(tensors[k].shape, *rest)) for cls, k, *rest in lit if "source" in cls}
            assert got == sources(key, index, tensors, H, C // H), (
                f"pointed at {key}{list(index)}: {differs(got, sources(key, index, tensors, H, C // H))}")


@needs_browser
def test_the_keyboard_reaches_and_walks_every_matrix(browser, pages):
    browser.open(pages["B2-T5-C6"])
    focused = """(() => { const e = document.activeElement, t = e.closest("table");
        return [e.tagName, e.id, t ? t.dataset.key : null, t ? +t.dataset.s : null, e.parentElement.sectionRowIndex,
                e.cellIndex - 1, (document.querySelector("#panel h2") || {}).textContent || ""]; })()"""
    browser.key("Tab")
    assert browser.js(focused)[1] == "tab-forward"  # the tabs first, one stop for all three
    browser.key("Tab")
    assert browser.js(focused)[2:6] == ["1:x", 0, 0, 0]  # then each matrix: one stop, at its first cell
    for key, (i, j) in (("ArrowRight", (0, 1)), ("ArrowDown", (1, 1)), ("ArrowDown", (2, 1)), ("ArrowLeft", (2, 0)),
                        ("ArrowUp", (1, 0)), ("ArrowLeft", (1, 0))):  # the last: at the edge, it stays
        browser.key(key)
        tag, _, matrix, s, *at, head = browser.js(focused)
        assert (tag, matrix, s, tuple(at)) == ("TD", "1:x", 0, (i, j)), (key, tag, matrix, s, at)
        assert head.startswith(f"x[0, {i}, {j}] = "), head  # focus explains, as pointing does
    browser.key("Tab")
    assert browser.js(focused)[2:4] == ["1:x", 1]  # the next matrix: x of the second sequence
    browser.js("document.getElementById('tab-forward').focus()")
    browser.key("ArrowRight")
    assert browser.js("[document.activeElement.id, document.getElementById('view-backward').hidden, "
                      "document.getElementById('view-forward').hidden]") == ["tab-backward", False, True]


@needs_browser
@pytest.mark.parametrize("page", ["T8-C16", "B2-T5-C6"])
def test_the_tile_stepper_ends_on_the_naive_output(browser, pages, page):
    B, T, _, H, block = PAGES[page]
    tensors, _ = truth(*PAGES[page])
    q, k, v = (torch.from_numpy(tensors[f"4:{n}"]) for n in "qkv")
    states = []
    flash_forward(q, k, v, block_size=block, on_block=lambda start, end, st: states.append((start, end, st)))
    naive = tensors["10:out"]
    browser.open(pages[page])
    browser.click("#tab-tiles")
    b, h = B - 1, H - 1
    read = """[...document.querySelectorAll("#tile-state table")].reduce((all, t) => (all[t.dataset.tile] =
        [...t.tBodies.length ? t.tBodies[0].rows : t.rows].filter(r => r.querySelector("td")).map(r =>
        [...r.querySelectorAll("td")].map(c => c.textContent)), all), {})"""
    for qb, q0 in enumerate(range(0, T, block)):
        q1 = min(q0 + block, T)
        browser.js(f"(() => {{ for (const [id, v] of [['tile-bh', {b * H + h}], ['tile-qb', {qb}]]) {{ const s = "
                   "document.getElementById(id); s.value = v; s.dispatchEvent(new Event('change')); } })()")
        assert browser.js("document.getElementById('tile-prev').disabled")
        for n, (start, end, st) in enumerate(states, 1):
            browser.click("#tile-next")
            shown = browser.js(read)
            assert browser.js("document.getElementById('tile-status').textContent").startswith(
                f"key block {n} of {len(states)}")
            rows = lambda x, q0=q0, q1=q1: x[b, h, q0:q1].double().numpy()
            for name in ("s", "p", "acc"):
                for i, row in enumerate(shown[name]):
                    for j, text in enumerate(row):
                        close_to(text, rows(st[name])[i, j], f"tile {name}, keys {start}..{end - 1}, row {q0 + i}")
            for i, row in enumerate(shown["rows"]):
                for text, truth_ in zip(row, (st["m_old"], st["s"].amax(-1), st["m"], st["alpha"], st["l"])):
                    close_to(text, rows(truth_)[i], f"keys {start}..{end - 1}, row {q0 + i}")
        assert browser.js("document.getElementById('tile-next').disabled")
        shown = browser.js(read)
        for name in ("out", "naive"):                                  # acc / l, and the naive out beside it
            for i, row in enumerate(shown[name]):
                for j, text in enumerate(row):
                    close_to(text, naive[b, h, q0 + i, j], f"{name} row {q0 + i}")
        diff = float(browser.js("document.querySelector('#tile-diff .val').textContent"))
        assert 0 <= diff < 1e-12, f"queries {q0}..{q1 - 1}: flash and naive differ by {diff}"
        browser.click("#tile-prev")
        assert browser.js("document.getElementById('tile-status').textContent").startswith(
            f"key block {len(states) - 1} of")


# Every element with text of its own, in what is shown: its colour against its background, the
# backgrounds behind it blended in, as WCAG 2's contrast ratio.
CONTRAST = """(() => {
  const rgba = c => { const m = c.match(/[\\d.]+/g).map(Number); return [m[0], m[1], m[2], m.length > 3 ? m[3] : 1]; };
  const over = (top, under) => top.slice(0, 3).map((c, i) => c * top[3] + under[i] * (1 - top[3]));
  const lum = c => { const [r, g, b] = c.map(x => { x /= 255;
                                                     return x <= 0.03928 ? x / 12.92 : ((x + 0.055) / 1.055) ** 2.4; });
                     return 0.2126 * r + 0.7152 * g + 0.0722 * b; };
  const low = [];
  let checked = 0;
  for (const e of document.querySelectorAll("body *")) {
    if (![...e.childNodes].some(n => n.nodeType === 3 && n.textContent.trim())) continue;
    if (!e.getClientRects().length || getComputedStyle(e).visibility === "hidden") continue;
    const layers = [];
    for (let a = e; a; a = a.parentElement) layers.push(rgba(getComputedStyle(a).backgroundColor));
    let bg = [255, 255, 255];
    for (const layer of layers.reverse()) bg = over(layer, bg);
    const fg = over(rgba(getComputedStyle(e).color), bg);
    const [l1, l2] = [lum(fg), lum(bg)].sort((x, y) => y - x), ratio = (l1 + 0.05) / (l2 + 0.05);
    checked++;
    if (ratio < 4.5) low.push([e.tagName, e.className, e.textContent.slice(0, 40), ratio.toFixed(2)]);
  }
  return {checked, low};
})()"""


@needs_browser
def test_every_text_has_aa_contrast_and_the_views_are_pictured(browser, pages, shots):
    browser.open(pages["T8-C16"])
    checked = 0

    def check(view):
        nonlocal checked
        found = browser.js(CONTRAST)
        assert not found["low"], f"{view}: text below WCAG AA's 4.5:1 contrast: {found['low'][:10]}"
        checked += found["checked"]

    def pointed_at(key, s, i, j, top):  # a cell pointed at, with what it was computed from in view
        browser.js(f"document.getElementById('step-{top}').scrollIntoView()")
        ref = browser.js(f"refOf(MATRICES.find(m => m.key === '{key}'), {s}, {i}, {j})")
        x, y = browser.js(f"(() => {{ const r = document.getElementById('c{ref}').getBoundingClientRect(); "
                          "return [r.x + r.width / 2, r.y + r.height / 2]; })()")
        browser.call("Input.dispatchMouseEvent", type="mouseMoved", x=x, y=y)
        assert browser.js(f"document.getElementById('c{ref}').classList.contains('current')")

    pointed_at("5:scores", 1, 6, 3, top=4)                             # a score: the row of q, the column of k
    browser.screenshot(os.path.join(shots, "explain-forward.png"))
    check("forward, a score pointed at")
    browser.click("#tab-backward")
    pointed_at("17:dS", 1, 5, 2, top=15)                               # dS: the softmax's Jacobian of the row
    browser.screenshot(os.path.join(shots, "explain-backward.png"))
    check("backward, a dS pointed at")
    browser.click("#tab-tiles")
    for _ in range(2):
        browser.click("#tile-next")
    check("tiles, the second key block")
    for _ in range(2):
        browser.click("#tile-next")
    browser.js("window.scrollTo(0, 0)")
    browser.screenshot(os.path.join(shots, "explain-tiles.png"))        # the last key block, and out beside naive
    check("tiles, the end")
    assert checked > 3000  # every matrix of the view, not only its headings
    for view in ("forward", "backward", "tiles"):
        with open(os.path.join(shots, f"explain-{view}.png"), "rb") as f:
            png = f.read()
        assert png[:8] == b"\x89PNG\r\n\x1a\n" and int.from_bytes(png[16:20], "big") == WIDTH and len(png) > 50_000
