"""The C++ op (CPU kernel; the CUDA kernel when a GPU is present) against the one reference."""
import itertools

import pytest
import torch

import xception_fast
from xception_fast.ops import sepconv_bn_reference, fold_bn
from exactness import assert_exact, make_sepconv_inputs, reference64

DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)]
DTYPES = {"cpu": [torch.float32, torch.bfloat16], "cuda": [torch.float32, torch.float16, torch.bfloat16]}


def run_both(inputs, relu_input, relu_output, backend):
    args = (inputs["x"], inputs["dw_weight"], inputs["pw_weight"], inputs["bias"])
    kwargs = dict(relu_input=relu_input, relu_output=relu_output, residual=inputs["residual"])
    fused = xception_fast.sepconv_bn(*args, **kwargs, backend=backend)
    eager = sepconv_bn_reference(*args, relu_input, relu_output, inputs["residual"])
    return fused, eager


def check(n, c, cout, h, w, *, device, dtype, layout="nchw", relu_input=True, relu_output=False, residual=False,
          bias=True, seed=0):
    inputs = make_sepconv_inputs(n, c, cout, h, w, dtype=dtype, device=device, layout=layout, bias=bias,
                                 residual=residual, seed=seed)
    fused, eager = run_both(inputs, relu_input, relu_output, backend=device)
    expected_format = torch.channels_last if layout == "channels_last" and c > 1 else torch.contiguous_format
    assert fused.dtype == dtype and fused.device == inputs["x"].device
    assert fused.is_contiguous(memory_format=expected_format)
    assert_exact(fused, eager, reference64(inputs, relu_input, relu_output), f"{n}x{c}->{cout}x{h}x{w} {dtype}")


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("relu_input, relu_output, residual, bias", list(itertools.product([False, True], repeat=4)))
def test_every_option_combination(device, relu_input, relu_output, residual, bias):
    for dtype in DTYPES[device]:
        check(2, 13, 7, 5, 6, device=device, dtype=dtype, relu_input=relu_input, relu_output=relu_output,
              residual=residual, bias=bias)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("c, cout", [(1, 1), (3, 13), (13, 3), (100, 64), (64, 128), (256, 728), (728, 728),
                                     (1024, 1536), (1536, 2048)])
def test_channel_counts(device, c, cout):
    for dtype in DTYPES[device]:
        check(1, c, cout, 4, 3, device=device, dtype=dtype, relu_output=True, residual=True)


# Channel counts past 512 with many pixels, for the CPU kernel's two products: its register tiles,
# and oneDNN once the pointwise weights pass 4 MB (Xception's 1024 -> 1536 and 1536 -> 2048).
MANY_CHANNELS_IN_REGISTER_TILES = (520, 600)
MANY_CHANNELS_IN_ONEDNN = (1100, 1000)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("relu_input, relu_output, residual",
                         [(True, False, True), (False, True, False), (True, False, False)])
@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
@pytest.mark.parametrize("c, cout", [MANY_CHANNELS_IN_REGISTER_TILES, MANY_CHANNELS_IN_ONEDNN])
def test_many_channels_and_pixels(device, relu_input, relu_output, residual, layout, c, cout):
    for dtype in DTYPES[device]:
        check(2, c, cout, 9, 7, device=device, dtype=dtype, layout=layout, relu_input=relu_input,
              relu_output=relu_output, residual=residual)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("h, w", [(1, 1), (2, 2), (7, 7), (19, 19), (37, 37), (5, 9), (1, 17)])
@pytest.mark.parametrize("layout", ["nchw", "channels_last", "strided"])
def test_spatial_sizes_and_layouts(device, h, w, layout):
    for dtype in DTYPES[device]:
        check(3, 24, 40, h, w, device=device, dtype=dtype, layout=layout, residual=True)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("n", [0, 1, 3])
def test_batch_sizes(device, n):
    for dtype in DTYPES[device]:
        check(n, 16, 8, 7, 5, device=device, dtype=dtype, layout="channels_last", residual=True, relu_output=True)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("n, c, cout, hw", [(8, 728, 728, 19), (2, 64, 128, 147), (4, 1536, 2048, 10)])
def test_xception_sized_on_gpu(dtype, n, c, cout, hw):
    check(n, c, cout, hw, hw, device="cuda", dtype=dtype, layout="channels_last", residual=c == cout)


@pytest.mark.gpu
def test_tf32_follows_cudnn_flag():
    inputs = make_sepconv_inputs(4, 256, 256, 19, 19, device="cuda", layout="channels_last")
    ref = reference64(inputs, True, False)
    saved = torch.backends.cudnn.allow_tf32
    try:
        errors = {}
        for allow in (False, True):
            torch.backends.cudnn.allow_tf32 = allow
            fused, eager = run_both(inputs, True, False, "cuda")
            errors[allow] = assert_exact(fused, eager, ref, f"allow_tf32={allow}")[0]
        assert errors[False] < errors[True]
    finally:
        torch.backends.cudnn.allow_tf32 = saved


def test_float32_weights_with_bfloat16_input():
    inputs = make_sepconv_inputs(2, 20, 12, 6, 6, dtype=torch.bfloat16, layout="channels_last", residual=True)
    inputs["pw_weight"] = inputs["pw_weight"].float()
    inputs["bias"] = inputs["bias"].float()
    fused, eager = run_both(inputs, True, True, "cpu")
    assert_exact(fused, eager, reference64(inputs, True, True))


def test_op_is_not_recast_under_autocast():
    """The op computes in x's dtype under autocast too (the fused modules cast x themselves), also
    where the CPU kernel's product is an ATen convolution."""
    inputs = make_sepconv_inputs(2, *MANY_CHANNELS_IN_ONEDNN, 9, 7, layout="channels_last", residual=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        fused, _ = run_both(inputs, True, True, "cpu")
    eager = sepconv_bn_reference(inputs["x"], inputs["dw_weight"], inputs["pw_weight"], inputs["bias"], True, True,
                                 inputs["residual"])
    assert fused.dtype == torch.float32
    assert_exact(fused, eager, reference64(inputs, True, True))


def test_float64_on_cpu():
    inputs = make_sepconv_inputs(2, 9, 5, 4, 7, dtype=torch.float64, residual=True)
    fused, eager = run_both(inputs, True, True, "cpu")
    assert (fused - eager).abs().max().item() < 1e-12


@pytest.mark.parametrize("device", DEVICES)
def test_deterministic_and_inputs_untouched(device):
    inputs = make_sepconv_inputs(3, 96, 80, 11, 13, device=device, layout="channels_last", residual=True)
    before = {k: v.clone() for k, v in inputs.items() if v is not None}
    first, _ = run_both(inputs, True, True, device)
    second, _ = run_both(inputs, True, True, device)
    assert torch.equal(first, second)
    assert all(torch.equal(before[k], inputs[k]) for k in before)


def test_fold_bn_matches_batchnorm_eval():
    torch.manual_seed(0)
    conv = torch.nn.Conv2d(6, 5, 1, bias=False)
    bn = torch.nn.BatchNorm2d(5).eval()
    with torch.no_grad():
        bn.weight.uniform_(0.5, 2)
        bn.bias.normal_()
        bn.running_mean.normal_()
        bn.running_var.uniform_(0.3, 3)
    x = torch.randn(2, 6, 4, 4, dtype=torch.float64)
    weight, bias = fold_bn(conv.weight, bn.weight, bn.bias, bn.running_mean, bn.running_var, bn.eps)
    assert weight.dtype == bias.dtype == torch.float32
    expected = bn.double()(conv.double()(x))
    got = torch.nn.functional.conv2d(x, weight.double(), bias.double())
    assert (got - expected).abs().max().item() < 1e-5


def test_fold_bn_computes_in_float32_for_half_weights():
    w = torch.randn(4, 3, 1, 1).bfloat16()
    stats = [torch.rand(4).bfloat16() + 0.5 for _ in range(4)]
    weight, bias = fold_bn(w, *stats, 1e-5)
    gamma, beta, mean, var = (s.double() for s in stats)
    scale = gamma / torch.sqrt(var + 1e-5)
    exact_weight = w.double() * scale.reshape(-1, 1, 1, 1)
    exact_bias = beta - mean * scale
    # A bfloat16 fold would be off by ~1e-3 relative; a float32 one by ~1e-7.
    assert weight.dtype == bias.dtype == torch.float32
    assert ((weight.double() - exact_weight).abs() / exact_weight.abs()).max() < 1e-6
    assert ((bias.double() - exact_bias).abs() / exact_bias.abs()).max() < 1e-5


# ----------------------------------------------------------------------------------------------
# Bad input: a clear error naming the argument, from the Python API and from the op itself.

def good_args():
    i = make_sepconv_inputs(1, 4, 6, 5, 5, residual=True)
    return [i["x"], i["dw_weight"], i["pw_weight"], i["bias"], True, False, i["residual"]]


BAD = [
    ("x", lambda a: a[0][0], "x must be a 4-D"),
    ("x", lambda a: a[0].int(), "x must be float32"),
    ("dw_weight", lambda a: torch.randn(4, 1, 5, 5), "dw_weight must be a depthwise 3x3"),
    ("dw_weight", lambda a: torch.randn(5, 1, 3, 3), "dw_weight must be a depthwise 3x3"),
    ("pw_weight", lambda a: torch.randn(6, 3, 1, 1), "pw_weight must be a pointwise kernel"),
    ("pw_weight", lambda a: torch.randn(6, 4, 3, 3), "pw_weight must be a pointwise kernel"),
    ("pw_weight", lambda a: a[2].double(), "pw_weight must have x's dtype"),
    ("bias", lambda a: torch.randn(5), "bias must have shape"),
    ("residual", lambda a: torch.randn(1, 6, 5, 4), "residual must have the output's shape"),
    ("residual", lambda a: a[6].bfloat16(), "residual must have x's dtype"),
    ("dw_weight", lambda a: a[1].to("meta"), "dw_weight is on meta"),
]
POSITION = {"x": 0, "dw_weight": 1, "pw_weight": 2, "bias": 3, "residual": 6}


@pytest.mark.parametrize("name, make_bad, message", BAD, ids=[f"{b[0]}-{i}" for i, b in enumerate(BAD)])
@pytest.mark.parametrize("entry", ["python", "op"])
def test_bad_input_is_refused_by_name(name, make_bad, message, entry):
    args = good_args()
    args[POSITION[name]] = make_bad(args)
    with pytest.raises((ValueError, RuntimeError), match=message):
        if entry == "python":
            xception_fast.sepconv_bn(*args[:4], relu_input=args[4], relu_output=args[5], residual=args[6])
        else:
            torch.ops.xception_fast.sepconv_bn(*args)


def test_bad_backend_is_refused():
    args = good_args()
    with pytest.raises(ValueError, match="backend must be one of"):
        xception_fast.sepconv_bn(*args[:4], backend="fast")
    with pytest.raises(ValueError, match="backend='cuda' needs CUDA tensors"):
        xception_fast.sepconv_bn(*args[:4], backend="cuda")


# ----------------------------------------------------------------------------------------------
# torch.library integration

@pytest.mark.parametrize("device", DEVICES)
def test_opcheck(device):
    i = make_sepconv_inputs(2, 5, 7, 4, 3, device=device, layout="channels_last", residual=True)
    args = (i["x"], i["dw_weight"], i["pw_weight"], i["bias"], True, True, i["residual"])
    torch.library.opcheck(torch.ops.xception_fast.sepconv_bn.default, args)
    no_options = (i["x"], i["dw_weight"], i["pw_weight"], None, False, False, None)
    torch.library.opcheck(torch.ops.xception_fast.sepconv_bn.default, no_options)


@pytest.mark.parametrize("device", DEVICES)
def test_torch_compile_fullgraph(device):
    i = make_sepconv_inputs(2, 8, 6, 5, 5, device=device, layout="channels_last", residual=True)

    def unit(x, dw, pw, b, r):
        return xception_fast.sepconv_bn(x * 2, dw, pw, b, relu_input=True, relu_output=True, residual=r) - 1

    args = (i["x"], i["dw_weight"], i["pw_weight"], i["bias"], i["residual"])
    compiled = torch.compile(unit, fullgraph=True, backend="aot_eager" if device == "cpu" else "inductor")
    assert torch.equal(compiled(*args), unit(*args))
