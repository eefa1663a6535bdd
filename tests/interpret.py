"""A faster Triton interpreter for the tests: the same computation, less repeated set-up.
conftest.py installs it in every test process; processes a test starts itself (the ring's ranks)
install it by importing the module that holds their function (tests/test_distributed.py)."""

import functools
import inspect
import os
import threading


def patch_lang_once_per_launch():
    """Triton's interpreter patches triton.language (every builtin of tl, tl.math and tl.tensor,
    found by inspect.getmembers) when a kernel launches, restores it when the launch ends, and
    patches it again at every call of a @triton.jit helper inside the kernel: about 1 ms a call,
    a quarter of the suite's interpreter time (our kernels call their helpers in every tile). The
    repeat changes nothing: the launch's patch is still in place, and a patched builtin is no
    longer a builtin, so it is skipped. Here a helper's call skips it when the launch already
    patched the language modules the helper sees (Triton 3.6 to 3.9; any other layout is left as
    it is, and the tests are only slower). Nothing without TRITON_INTERPRET=1, or a second time."""
    if os.environ.get("TRITON_INTERPRET") != "1":
        return
    from triton.runtime import interpreter as interp
    import triton.language as tl
    if getattr(interp, "_patched_once_per_launch", False) or not all(
            hasattr(interp, name) for name in ("_patch_lang", "_LangPatchScope", "GridExecutor")):
        return
    patch_lang, launch = interp._patch_lang, interp.GridExecutor.__call__
    launches = threading.local()  # a stack per thread: the language modules each running launch patched

    @functools.lru_cache(maxsize=None)  # per function, not per call: a module's globals do not change
    def langs(fn):
        return frozenset(id(m) for m in fn.__globals__.values() if inspect.ismodule(m) and m in (tl, tl.core))

    def patch_lang_once(fn):
        stack = getattr(launches, "stack", [])
        if stack and stack[-1] is not None and langs(fn) <= stack[-1]:
            return interp._LangPatchScope()  # nothing to restore: the launch's own scope restores it
        scope = patch_lang(fn)
        if stack and stack[-1] is None:  # the launch's own patch, which lasts until it ends
            stack[-1] = langs(fn)
        return scope

    def launch_patching_once(self, *args, **kwargs):
        stack = launches.__dict__.setdefault("stack", [])
        stack.append(None)
        try:
            return launch(self, *args, **kwargs)
        finally:
            stack.pop()

    interp._patch_lang = patch_lang_once
    interp.GridExecutor.__call__ = launch_patching_once
    interp._patched_once_per_launch = True
