"""The fused unit on every backend (tests/backends.py) against the one reference, under the
exactness rule (tests/exactness.py): options, kernel sizes, strides, dilations, sizes, layouts,
dtypes, packed weights, bad input, autocast, torch.library integration.

Under the Triton interpreter every program is one Python pass: the shapes here stay small, and the
interpreter runs a subset of the widest matrices (marked where it does).
"""
import itertools
import re

import pytest
import torch
import torch.nn.functional as F

import xception_fast
from xception_fast.contract import ACTIVATIONS, check_args
from backends import ALL, CPU, CUDA, KERNELS, TRITON
from exactness import Unit, assert_exact, eager, make_inputs, op_args, reference64


def run(backend, tensors, unit, packed=None):
    """The backend's result through the Python API, checked against eager under the exactness rule;
    returns the result."""
    fused = xception_fast.sepconv(
        tensors["x"], tensors["dw_weight"], tensors["pw_weight"], tensors["pw_bias"], dw_bias=tensors["dw_bias"],
        stride=unit.stride, padding=unit.padding, dilation=unit.dilation, act_in=unit.act_in, act_mid=unit.act_mid,
        act_out=unit.act_out, residual=tensors["residual"], packed=packed, backend=backend.name)
    return fused


def check(backend, n, c, cout, h, w, *, dtype, k=3, unit=Unit(), layout="channels_last", dw_bias=False,
          pw_bias=True, residual=False, seed=0):
    tensors, unit = make_inputs(n, c, cout, h, w, k=k, unit=unit, dtype=dtype, device=backend.device, layout=layout,
                                dw_bias=dw_bias, pw_bias=pw_bias, residual=residual, seed=seed)
    fused = run(backend, tensors, unit)
    what = (f"{backend} {dtype} {n}x{c}->{cout}x{h}x{w} k{k} {unit} dw_bias={dw_bias} pw_bias={pw_bias} "
            f"residual={residual} {layout}")
    assert fused.dtype == dtype and fused.device == tensors["x"].device, what
    # x's memory format, as nn.Conv2d gives (an empty batch has no order: contiguous).
    expected_format = torch.channels_last if layout == "channels_last" and c > 1 and n > 0 else torch.contiguous_format
    assert fused.is_contiguous(memory_format=expected_format), f"{what}: strides {fused.stride()}"
    if dtype == torch.float64:
        assert (fused - reference64(tensors, unit)).abs().max().item() < 1e-10, what
        return fused
    assert_exact(fused, eager(tensors, unit), reference64(tensors, unit), what)
    return fused


def dtypes_of(backend, wide=True):
    """The dtypes a test runs in: all of the backend's (float64 has its own test), or for the wide
    matrices on a backend that compiles per case, bfloat16 alone."""
    if wide and backend.compiles_per_case:
        return [torch.bfloat16]
    return [d for d in backend.dtypes if d != torch.float64]


# ----------------------------------------------------------------------------------------------
# Values

# Every activation in every slot, each triple with one of the eight bias / residual combinations
# (cycled), and every bias / residual combination with one triple.
ACT_TRIPLES = list(itertools.product(ACTIVATIONS, repeat=3))
EXTRAS = list(itertools.product([False, True], repeat=3))  # dw_bias, pw_bias, residual
OPTION_CASES = ([(acts, EXTRAS[i % 8]) for i, acts in enumerate(ACT_TRIPLES)]
                + [(("relu", "relu6", "hardswish"), extras) for extras in EXTRAS])


def sample_only(backend, case, cases, every):
    """On a backend that compiles per case (Triton on a GPU) run every ``every``-th case of a wide
    matrix: the interpreter runs all of them through the same kernel code in CI."""
    if backend.compiles_per_case and cases.index(case) % every:
        pytest.skip(f"a sample of this matrix runs on {backend} (one compile per case)")


@pytest.mark.parametrize("backend", ALL, ids=str)
@pytest.mark.parametrize("acts, extras", OPTION_CASES, ids=[f"{'-'.join(a)}-{''.join(str(int(e)) for e in x)}"
                                                            for a, x in OPTION_CASES])
def test_every_option_combination(backend, acts, extras):
    sample_only(backend, (acts, extras), OPTION_CASES, every=6)
    dw_bias, pw_bias, residual = extras
    unit = Unit(act_in=acts[0], act_mid=acts[1], act_out=acts[2])
    # 105 pixels, 40 -> 37 channels: several tiles each way (under the interpreter too), ragged edges.
    for dtype in dtypes_of(backend):
        check(backend, 3, 40, 37, 5, 7, dtype=dtype, unit=unit, dw_bias=dw_bias, pw_bias=pw_bias,
              residual=residual)


# (k, stride, dilation, H, W): odd sizes with stride 2, maps smaller than the dilated kernel, 1x1 maps;
# rows of 7 interior pixels for k 5 and 7 (the CPU kernel's groups of 4, 2 and 1 in one row).
GEOMETRIES = [
    (k, s, 1, h, w) for k in (1, 3, 5, 7) for s in (1, 2) for h, w in ((7, 9), (2, 3), (1, 1))
] + [(3, 1, 2, 3, 4), (3, 2, 2, 5, 3), (3, 1, 4, 3, 4), (5, 1, 2, 4, 4), (5, 2, 4, 6, 5), (3, 1, 4, 1, 1),
     (5, 1, 1, 3, 11), (7, 1, 1, 2, 13)]


@pytest.mark.parametrize("backend", ALL, ids=str)
@pytest.mark.parametrize("k, stride, dilation, h, w", GEOMETRIES)
def test_kernel_sizes_strides_dilations(backend, k, stride, dilation, h, w):
    sample_only(backend, (k, stride, dilation, h, w), GEOMETRIES, every=3)
    unit = Unit(stride=stride, dilation=dilation, act_in="relu", act_mid="relu6", act_out="relu")
    for dtype in dtypes_of(backend):
        check(backend, 2, 12, 10, h, w, k=k, unit=unit, dtype=dtype, dw_bias=True, residual=True)


@pytest.mark.parametrize("backend", ALL, ids=str)
@pytest.mark.parametrize("padding", [0, 2])
def test_other_paddings(backend, padding):
    unit = Unit(padding=padding, act_in="relu")
    for dtype in dtypes_of(backend):
        check(backend, 2, 9, 11, 6, 7, unit=unit, dtype=dtype, residual=True)


@pytest.mark.parametrize("backend", ALL, ids=str)
@pytest.mark.parametrize("c, cout", [(1, 1), (1, 3), (3, 13), (13, 1), (13, 3), (70, 33), (100, 64)])
def test_channel_counts(backend, c, cout):
    for dtype in dtypes_of(backend):
        check(backend, 2, c, cout, 4, 3, dtype=dtype, unit=Unit(act_out="relu"), residual=True)


@pytest.mark.parametrize("backend", [CPU, pytest.param(TRITON, marks=pytest.mark.gpu)] + KERNELS[2:], ids=str)
@pytest.mark.parametrize("c, cout", [(256, 728), (728, 728), (1024, 1536), (1536, 2048)])
def test_xception_channel_counts(backend, c, cout):
    for dtype in dtypes_of(backend, wide=False):
        check(backend, 1, c, cout, 4, 3, dtype=dtype, unit=Unit(act_out="relu"), residual=True)


@pytest.mark.parametrize("backend", ALL, ids=str)
@pytest.mark.parametrize("layout", ["nchw", "channels_last", "strided"])
def test_layouts(backend, layout):
    for dtype in dtypes_of(backend):
        check(backend, 2, 24, 20, 5, 6, dtype=dtype, layout=layout, unit=Unit(stride=2), residual=True)


@pytest.mark.parametrize("backend", ALL, ids=str)
@pytest.mark.parametrize("n", [0, 1, 3])
def test_batch_sizes(backend, n):
    for dtype in dtypes_of(backend):
        check(backend, n, 16, 8, 7, 5, dtype=dtype, residual=True, unit=Unit(act_out="relu"))


def test_float64_on_cpu():
    for k, stride in ((3, 1), (5, 2)):
        check(CPU, 2, 9, 5, 4, 7, k=k, dtype=torch.float64, unit=Unit(stride=stride, act_mid="relu6"),
              dw_bias=True, residual=True)


@pytest.mark.parametrize("backend", KERNELS, ids=str)
def test_float32_weights_with_half_precision_x(backend):
    half = torch.bfloat16
    tensors, unit = make_inputs(2, 20, 12, 6, 6, dtype=half, device=backend.device, dw_bias=True, residual=True)
    for name in ("dw_weight", "dw_bias", "pw_weight", "pw_bias"):
        tensors[name] = tensors[name].float()
    fused = run(backend, tensors, unit)
    assert fused.dtype == half
    assert_exact(fused, eager(tensors, unit), reference64(tensors, unit))


@pytest.mark.parametrize("backend", KERNELS, ids=str)
def test_output_is_rounded_once_to_nearest_even(backend):
    # y = x + bias exactly (one channel, centre tap 1, pointwise weight 1): one rounding of a float32
    # sum to bfloat16, which must be torch's round-to-nearest-even bit for bit.
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 1, 8, 8, generator=g).bfloat16().to(backend.device)
    dw = torch.zeros(1, 1, 3, 3, device=backend.device)
    dw[0, 0, 1, 1] = 1
    pw = torch.ones(1, 1, 1, 1, device=backend.device)
    bias = (torch.randn(1, generator=g) * 1e-2).to(backend.device)
    y = xception_fast.sepconv(x, dw, pw, bias, backend=backend.name)
    assert torch.equal(y, (x.float() + bias).bfloat16())


@pytest.mark.parametrize("backend", KERNELS, ids=str)
def test_deterministic_and_inputs_untouched(backend):
    tensors, unit = make_inputs(3, 40, 37, 5, 7, dtype=torch.bfloat16, device=backend.device, dw_bias=True,
                                residual=True, unit=Unit(act_mid="relu"))
    before = {k: v.clone() for k, v in tensors.items() if v is not None}
    first, second = run(backend, tensors, unit), run(backend, tensors, unit)
    assert torch.equal(first, second)
    for k in before:
        assert torch.equal(before[k], tensors[k]), k
        assert first.data_ptr() != tensors[k].data_ptr()


def test_old_api_means_what_it_meant():
    """sepconv_bn's original signature: ReLU flags, a 3x3 depthwise with stride 1 and padding 1."""
    tensors, _ = make_inputs(2, 13, 7, 5, 6, residual=True)
    x, dw, pw, b, r = (tensors[k] for k in ("x", "dw_weight", "pw_weight", "pw_bias", "residual"))
    for relu_input, relu_output in itertools.product([False, True], repeat=2):
        got = xception_fast.sepconv_bn(x, dw, pw, b, relu_input=relu_input, relu_output=relu_output, residual=r)
        a = F.relu(x) if relu_input else x
        z = F.conv2d(F.conv2d(a, dw, padding=1, groups=13), pw, b)
        expected = (F.relu(z) if relu_output else z) + r
        assert_exact(got, expected, (F.relu(z.double()) if relu_output else z.double()) + r.double())
    with pytest.raises(ValueError, match="relu_input or act_in, not both"):
        xception_fast.sepconv_bn(x, dw, pw, relu_input=True, act_in="relu6")


# ----------------------------------------------------------------------------------------------
# Packed weights

def pack(backend, tensors, dtype=None):
    return xception_fast.pack_weights(backend.name, dtype or tensors["x"].dtype, tensors["dw_weight"],
                                      tensors["dw_bias"], tensors["pw_weight"], tensors["pw_bias"])


@pytest.mark.parametrize("backend", KERNELS, ids=str)
def test_packed_weights_give_the_same_result(backend):
    for dtype in dtypes_of(backend, wide=False):
        tensors, unit = make_inputs(2, 40, 37, 5, 7, k=5, unit=Unit(stride=2, act_mid="relu"), dtype=dtype,
                                    device=backend.device, dw_bias=True, residual=True)
        assert torch.equal(run(backend, tensors, unit, pack(backend, tensors)), run(backend, tensors, unit))


@pytest.mark.parametrize("backend", KERNELS, ids=str)
def test_packed_weights_for_something_else_are_refused(backend):
    tensors, unit = make_inputs(2, 16, 8, 5, 5, dtype=torch.float32, device=backend.device)
    other, _ = make_inputs(2, 16, 9, 5, 5, device=backend.device)
    with pytest.raises(ValueError, match="(?i)packed weights were made for (a bfloat16 product|another dtype)"):
        run(backend, tensors, unit, pack(backend, tensors, dtype=torch.bfloat16))
    with pytest.raises(ValueError, match="packed weights were made for C = 16, Cout = 9"):
        run(backend, tensors, unit, pack(backend, other))
    with pytest.raises(ValueError, match="packed must be the list"):
        run(backend, tensors, unit, [tensors["pw_weight"]])


# ----------------------------------------------------------------------------------------------
# Bad input: a clear error naming the argument, the same from every call path.

def good_tensors(device="cpu"):
    return make_inputs(1, 4, 6, 5, 5, device=device, dw_bias=True, residual=True)


# (argument, how to break it, what the error says)
BAD = [
    ("x", lambda t, u: (dict(t, x=t["x"][0]), u), "x must be a 4-D"),
    ("x", lambda t, u: (dict(t, x=t["x"].int()), u), "x must be float32"),
    ("x", lambda t, u: (dict(t, x=t["x"][:, :, :0]), u), "x needs C, H, W >= 1"),
    ("dw_weight", lambda t, u: (dict(t, dw_weight=torch.randn(4, 1, 4, 4)), u), "kernel size k must be one of"),
    ("dw_weight", lambda t, u: (dict(t, dw_weight=torch.randn(4, 1, 3, 5)), u), "dw_weight must be a depthwise"),
    ("dw_weight", lambda t, u: (dict(t, dw_weight=torch.randn(5, 1, 3, 3)), u), "dw_weight must be a depthwise"),
    ("dw_bias", lambda t, u: (dict(t, dw_bias=torch.randn(5)), u), "dw_bias must have shape"),
    ("pw_weight", lambda t, u: (dict(t, pw_weight=torch.randn(6, 3, 1, 1)), u), "pw_weight must be a pointwise"),
    ("pw_weight", lambda t, u: (dict(t, pw_weight=torch.randn(6, 4, 3, 3)), u), "pw_weight must be a pointwise"),
    ("pw_weight", lambda t, u: (dict(t, pw_weight=t["pw_weight"].double()), u), "pw_weight must have x's dtype"),
    ("pw_bias", lambda t, u: (dict(t, pw_bias=torch.randn(5)), u), "pw_bias must have shape"),
    ("residual", lambda t, u: (dict(t, residual=torch.randn(1, 6, 5, 4)), u), "residual must have the output's"),
    ("residual", lambda t, u: (dict(t, residual=t["residual"].bfloat16()), u), "residual must have x's dtype"),
    # With stride 2 the output is 3x3: a residual of the unstrided 5x5 shape is refused.
    ("residual", lambda t, u: (t, Unit(stride=2).resolved(3)), "residual must have the output's shape"),
    ("dw_weight", lambda t, u: (dict(t, dw_weight=t["dw_weight"].to("meta")), u), "dw_weight is on meta"),
    ("stride", lambda t, u: (t, Unit(stride=3).resolved(3)), "stride must be 1 or 2"),
    ("dilation", lambda t, u: (t, Unit(dilation=-1, padding=1)), "dilation must be >= 1"),
    ("padding", lambda t, u: (t, Unit(padding=-1)), "padding must be >= 0"),
    ("x", lambda t, u: (t, Unit(padding=0, dilation=3)), "smaller than the dilated kernel"),
    ("act_mid", lambda t, u: (t, Unit(act_mid="gelu").resolved(3)), "act_mid must be one of"),
]


def call_op(backend, tensors, unit):
    return backend.op()(*op_args(tensors, unit))


@pytest.mark.parametrize("name, make_bad, message", BAD, ids=[f"{b[0]}-{i}" for i, b in enumerate(BAD)])
@pytest.mark.parametrize("backend", KERNELS, ids=str)
def test_bad_input_is_refused_by_name(backend, name, make_bad, message):
    tensors, unit = make_bad(*good_tensors(backend.device))
    if backend.device != "cpu":
        tensors = {k: v if v is None or v.device.type == "meta" else v.to(backend.device) for k, v in tensors.items()}
    with pytest.raises(ValueError) as checked:
        check_args(*(tensors[k] for k in ("x", "dw_weight", "dw_bias", "pw_weight", "pw_bias", "residual")),
                   *unit.args())
    assert name in str(checked.value) and re.search(message, str(checked.value))
    with pytest.raises(ValueError, match=re.escape(str(checked.value))):
        call_op(backend, tensors, unit)


def test_bad_types_and_backend_are_refused():
    tensors, unit = good_tensors()
    with pytest.raises(TypeError, match="pw_bias must be a Tensor or None"):
        xception_fast.sepconv(tensors["x"], tensors["dw_weight"], tensors["pw_weight"], 3.0)
    with pytest.raises(ValueError, match="backend must be one of"):
        xception_fast.sepconv(tensors["x"], tensors["dw_weight"], tensors["pw_weight"], backend="fast")
    with pytest.raises(ValueError, match="backend='cuda' needs CUDA tensors"):
        xception_fast.sepconv(tensors["x"], tensors["dw_weight"], tensors["pw_weight"], backend="cuda")


# ----------------------------------------------------------------------------------------------
# Autocast, torch.library, torch.compile

@pytest.mark.parametrize("backend", KERNELS, ids=str)
def test_autocast_casts_x_and_residual_as_conv2d_does(backend):
    tensors, unit = make_inputs(2, 24, 16, 6, 7, device=backend.device, dw_bias=True, residual=True)
    with torch.autocast(torch.device(backend.device).type, dtype=torch.bfloat16):
        got = run(backend, tensors, unit)
    half = dict(tensors, x=tensors["x"].bfloat16(), residual=tensors["residual"].bfloat16())
    assert got.dtype == torch.bfloat16
    assert torch.equal(got, run(backend, half, unit))


def _dispatches_of_the_op(prof):
    return sum(e.count for e in prof.key_averages() if e.key == "xception_fast::sepconv")


@pytest.mark.parametrize("backend", [CPU, pytest.param(CUDA, marks=pytest.mark.gpu)], ids=str)
@pytest.mark.parametrize("amp", [False, True], ids=["no-autocast", "autocast"])
def test_without_a_gradient_the_python_layers_are_skipped(backend, amp):
    """Where no gradient is made, the API runs the C++ op's kernel below the op's Python autograd
    and autocast kernels, with autocast's cast made as its kernel makes it: the same result as the
    op called through those layers, and one dispatch of the op where through autocast's kernel it
    takes two (the autocast kernel calls the op again)."""
    tensors, unit = make_inputs(2, 24, 16, 6, 7, device=backend.device, dw_bias=True, residual=True)
    with torch.autocast(torch.device(backend.device).type, dtype=torch.bfloat16, enabled=amp):
        with torch.profiler.profile() as direct:
            got = run(backend, tensors, unit)
        with torch.profiler.profile() as layered:
            through_layers = backend.op()(*op_args(tensors, unit))
    assert got.dtype == (torch.bfloat16 if amp else torch.float32)
    assert torch.equal(got, through_layers)
    assert _dispatches_of_the_op(direct) == 1
    assert _dispatches_of_the_op(layered) == (2 if amp else 1)


@pytest.mark.parametrize("op_name", ["sepconv", "sepconv_keeping_depthwise"])
def test_opcheck_cpu(op_name):
    op = getattr(torch.ops.xception_fast, op_name).default
    for k, stride in ((3, 1), (5, 2)):
        tensors, unit = make_inputs(2, 5, 7, 5, 4, k=k, unit=Unit(stride=stride, act_mid="relu"), dw_bias=True,
                                    residual=True, layout="channels_last")
        torch.library.opcheck(op, op_args(tensors, unit))
        grads = {k: v.detach().requires_grad_() if v is not None else None for k, v in tensors.items()}
        torch.library.opcheck(op, op_args(grads, unit))
    bare, unit = make_inputs(2, 5, 7, 4, 3, pw_bias=False, unit=Unit(act_in="identity"))
    torch.library.opcheck(op, op_args(bare, unit))
    empty, unit = make_inputs(0, 5, 7, 4, 3, layout="channels_last", residual=True)
    torch.library.opcheck(op, op_args(empty, unit))
    packed = xception_fast.pack_weights("cpu", torch.float32, bare["dw_weight"], None, bare["pw_weight"], None)
    torch.library.opcheck(op, op_args(bare, unit, packed))


@pytest.mark.gpu
@pytest.mark.parametrize("backend", KERNELS[1:], ids=str)
def test_opcheck_gpu(backend):
    tensors, unit = make_inputs(2, 5, 7, 5, 4, k=5, unit=Unit(stride=2, act_mid="relu"), dw_bias=True,
                                residual=True, device="cuda")
    torch.library.opcheck(backend.op().default, op_args(tensors, unit))
    grads = {k: v.detach().requires_grad_() if v is not None else None for k, v in tensors.items()}
    torch.library.opcheck(backend.op().default, op_args(grads, unit))


@pytest.mark.parametrize("backend", [CPU, pytest.param(TRITON, marks=pytest.mark.gpu)] + KERNELS[2:], ids=str)
def test_torch_compile_fullgraph(backend):
    tensors, unit = make_inputs(2, 8, 6, 7, 5, k=5, unit=Unit(stride=2, act_mid="relu6", act_out="relu"),
                                device=backend.device, dw_bias=True, residual=True)

    def fn(x, dw, dwb, pw, pwb, r):
        return xception_fast.sepconv(x * 2, dw, pw, pwb, dw_bias=dwb, stride=2, act_mid="relu6", act_out="relu",
                                     residual=r, backend=backend.name) - 1

    args = tuple(tensors[k] for k in ("x", "dw_weight", "dw_bias", "pw_weight", "pw_bias", "residual"))
    compiled = torch.compile(fn, fullgraph=True, backend="aot_eager" if backend.device == "cpu" else "inductor")
    assert torch.equal(compiled(*args), fn(*args))
