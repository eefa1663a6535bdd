"""
attention-kernels under one import name: `import attention_kernels`.

The repository keeps its three packages at the top, `kernels/`, `reference/` and `benchmarks/`;
they import as `attention_kernels.kernels`, `attention_kernels.reference` and
`attention_kernels.benchmarks`, never as top-level `kernels` or `reference`: such generic names
collide (Hugging Face's hub-kernels library is `kernels` too). Installed, the wheel holds them
under this folder; in a checkout this package finds them beside itself, so
`PYTHONPATH=. python -m benchmarks.sweep` and the tests run without installing.

The kernels' functions are re-exported here:

    from attention_kernels import flash_attention, decode_attention, patch_sdpa
    from attention_kernels import reference               # the naive PyTorch specification
"""

import os as _os

_here = _os.path.dirname(_os.path.abspath(__file__))
_checkout = _os.path.dirname(_here)
if not _os.path.isdir(_os.path.join(_here, "kernels")) and _os.path.isfile(_os.path.join(_checkout, "kernels", "__init__.py")):
    __path__.append(_checkout)  # a checkout: kernels/, reference/, benchmarks/ are the folders beside this one

from attention_kernels.kernels import *  # noqa: E402,F401,F403  the public functions
from attention_kernels.kernels import __all__  # noqa: E402
