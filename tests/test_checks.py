"""Every kernel refuses bad input with an error that names the argument, what was given and
what is accepted, before anything reaches Triton."""

import pytest
import torch

from attention_kernels import kernels  # noqa: E402  (its submodules below, by attribute)
import attention_kernels.kernels.checks
from attention_kernels.testing.cases import DEVICE, KERNELS
from attention_kernels.kernels import attention
from attention_kernels.kernels.checks import check_inputs


def qkv(B=1, Hq=2, Hkv=2, Tq=8, Tk=8, D=16, dtype=torch.float16):
    return (torch.randn(B, Hq, Tq, D, dtype=dtype, device=DEVICE),
            torch.randn(B, Hkv, Tk, D, dtype=dtype, device=DEVICE),
            torch.randn(B, Hkv, Tk, D, dtype=dtype, device=DEVICE))


def replace(args, index, value):
    args = list(args)
    args[index] = value
    return args


BAD_INPUTS = [
    # (what, (q, k, v), scale, error type, words the message must hold)
    ("not a tensor", replace(qkv(), 0, [[1.0]]), None, TypeError, "q must be a torch.Tensor, got list"),
    ("3-d q", replace(qkv(), 0, torch.randn(2, 8, 16, dtype=torch.float16, device=DEVICE)), None,
     ValueError, r"q must have 4 dimensions \(B, H, T, D\), got shape \(2, 8, 16\)"),
    ("float64", qkv(dtype=torch.float64), None, TypeError, "q has dtype float64; supported: float16, bfloat16, float32"),
    ("int", replace(qkv(), 2, torch.ones(1, 2, 8, 16, dtype=torch.int32, device=DEVICE)), None, TypeError,
     "v has dtype int32"),
    ("mixed dtypes", replace(qkv(), 1, torch.randn(1, 2, 8, 16, device=DEVICE)), None, TypeError,
     "q, k and v must share one dtype, got q float16, k float32, v float16"),
    ("empty T", qkv(Tq=0), None, ValueError, r"q has an empty dimension, shape \(1, 2, 0, 16\)"),
    ("k and v shapes", replace(qkv(), 1, torch.randn(2, 2, 8, 16, dtype=torch.float16, device=DEVICE)), None, ValueError,
     r"k and v must have the same shape"),
    ("batch of k and v", replace(replace(qkv(), 1, qkv(B=2)[1]), 2, qkv(B=2)[2]), None, ValueError,
     "q and k must have the same batch size, got q B=1, k B=2"),
    ("head dim", replace(replace(qkv(), 1, qkv(D=32)[1]), 2, qkv(D=32)[2]), None, ValueError,
     "q and k must have the same head dim, got q D=16, k D=32"),
    ("heads", qkv(Hq=6, Hkv=4), None, ValueError,
     r"q's head count must be a multiple of k's \(grouped-query attention\), got Hq=6, Hkv=4"),
    ("head dim too large", qkv(D=512), None, ValueError, "head dim D=512 is not supported; accepted: 1 to 256"),
    ("scale type", qkv(), "0.1", TypeError, "scale must be a real number or None, got str"),
    ("scale bool", qkv(), True, TypeError, "scale must be a real number or None, got bool"),
    ("scale zero", qkv(), 0.0, ValueError, r"scale must be > 0 and at most .*, got 0.0"),
    ("scale negative", qkv(), -1, ValueError, r"scale must be > 0 and at most .*, got -1"),
    ("scale nan", qkv(), float("nan"), ValueError, r"scale must be > 0 and at most .*, got nan"),
    ("scale inf", qkv(), float("inf"), ValueError, r"scale must be > 0 and at most .*, got inf"),
    # finite, but the fp32 logits q.k * scale * log2(e) overflow (all NaN before)
    ("scale 1e38", qkv(), 1e38, ValueError, r"scale must be > 0 and at most 1e\+06 \(larger ones overflow"),
]


@pytest.mark.parametrize("kernel", KERNELS + [attention], ids=lambda f: f.__name__)  # attention: impl="auto"
@pytest.mark.parametrize("what, args, scale, error, words", BAD_INPUTS, ids=[b[0] for b in BAD_INPUTS])
def test_bad_input_is_refused_clearly(kernel, what, args, scale, error, words):
    with pytest.raises(error, match=words):
        kernel(*args, scale=scale)


@pytest.mark.parametrize("kernel", KERNELS + [attention], ids=lambda f: f.__name__)
@pytest.mark.parametrize("causal", ["no", 1, None, torch.tensor(True)], ids=repr)
def test_causal_must_be_a_bool(kernel, causal):
    # "no" is truthy: it used to run causal attention
    with pytest.raises(TypeError, match="causal must be True or False, got"):
        kernel(*qkv(), causal=causal)


@pytest.mark.parametrize("args, words", [
    (dict(Hq=2, Hkv=3), r"q's head count must be a multiple of k's"),
    (dict(dtype=torch.int32), r"q has dtype int32; supported: float16, bfloat16, float32, float64"),
], ids=["heads", "int32"])
def test_the_reference_takes_the_shared_check(args, words):
    # impl="reference" used to skip it: heads 2 over 3 raised inside the reference, int32 ran
    dtype = args.pop("dtype", torch.float16)
    q, k, v = (x.to(dtype) for x in qkv(**args))
    with pytest.raises((TypeError, ValueError), match=words):
        attention(q, k, v, impl="reference")
    with pytest.raises(ValueError, match="scale must be > 0"):
        attention(*qkv(), scale=-1.0, impl="reference")
    assert attention(*(x.double() for x in qkv()), impl="reference").dtype == torch.float64  # float64: the truth


def test_one_device():
    q, k, v = qkv()
    with pytest.raises(ValueError, match="q, k and v must be on one device, got q on .*, k on meta"):
        check_inputs(q, k.to("meta"), v, None)


def test_cpu_tensors_without_the_interpreter_say_how_to_turn_it_on(monkeypatch):
    monkeypatch.setattr(kernels.checks, "INTERPRET", False)
    q, k, v = (x.cpu() for x in qkv())
    with pytest.raises(ValueError, match="q is a CPU tensor.*set TRITON_INTERPRET=1"):
        check_inputs(q, k, v, None)


def test_strides_pass_through_and_only_a_strided_head_dim_is_copied():
    B, H, T, D = 2, 4, 8, 16
    q = torch.randn(B, T, H, D, device=DEVICE).transpose(1, 2)    # (B, T, H, D) layout seen as (B, H, T, D)
    k = torch.randn(B, H, D, T, device=DEVICE).transpose(2, 3)    # head dim not unit-stride
    v = torch.randn(B, H, T, D, device=DEVICE)
    q2, k2, v2, scale = check_inputs(q, k, v, None)
    assert q2.data_ptr() == q.data_ptr() and q2.stride() == q.stride()
    assert k2.stride(-1) == 1 and torch.equal(k2, k)
    assert v2 is v and scale == pytest.approx(D ** -0.5)
