"""The Triton op (xception_fast.triton_sepconv) against the one reference, under the exactness rule.

Without a GPU the kernel runs on CPU tensors through the Triton interpreter (tests/conftest.py sets
TRITON_INTERPRET=1 before anything imports the kernel); with one it is compiled and autotuned, so
the tests that run on both keep the number of distinct kernels (dtype x options x shape
specialisation) small.
"""
import itertools
import re

import pytest
import torch
from torch._prims_common import suggest_memory_format

import xception_fast
from xception_fast import triton_sepconv
from xception_fast.ops import check_args, empty_output, sepconv_bn_reference
from exactness import assert_exact, make_sepconv_inputs, reference64

HAS_CUDA = torch.cuda.is_available()
DEVICE = "cuda" if HAS_CUDA else "cpu"

if not HAS_CUDA and not triton_sepconv._interpreted():
    pytest.skip("no GPU, and xception_fast.triton_sepconv was imported without TRITON_INTERPRET=1",
                allow_module_level=True)

op = triton_sepconv.sepconv_bn_triton
MATRIX_DTYPES = [torch.float32, torch.bfloat16]
# On a GPU every (dtype, options, shape) is a fresh compile and autotune: the shape tests run in
# bfloat16 there, float32 and float16 get the Xception-sized tests below.
SHAPE_DTYPES = MATRIX_DTYPES if DEVICE == "cpu" else [torch.bfloat16]


def run(inputs, relu_input, relu_output):
    args = (inputs["x"], inputs["dw_weight"], inputs["pw_weight"], inputs["bias"])
    fused = op(*args, relu_input, relu_output, inputs["residual"])
    eager = sepconv_bn_reference(*args, relu_input, relu_output, inputs["residual"])
    return fused, eager


def check(n, c, cout, h, w, *, dtype, device=DEVICE, layout="channels_last", relu_input=True, relu_output=False,
          residual=False, bias=True, seed=0):
    inputs = make_sepconv_inputs(n, c, cout, h, w, dtype=dtype, device=device, layout=layout, bias=bias,
                                 residual=residual, seed=seed)
    fused, eager = run(inputs, relu_input, relu_output)
    x = inputs["x"]
    assert fused.dtype == dtype and fused.device == x.device
    assert fused.is_contiguous(memory_format=suggest_memory_format(x))
    return assert_exact(fused, eager, reference64(inputs, relu_input, relu_output),
                        f"{n}x{c}->{cout}x{h}x{w} {dtype} {layout} relu_in={relu_input} relu_out={relu_output} "
                        f"residual={residual} bias={bias}")


# ----------------------------------------------------------------------------------------------
# Values: options, dtypes, shapes, layouts

@pytest.mark.parametrize("dtype", MATRIX_DTYPES, ids=str)
@pytest.mark.parametrize("relu_input, relu_output, residual", list(itertools.product([False, True], repeat=3)))
def test_every_option_combination(dtype, relu_input, relu_output, residual):
    # 105 pixels, 40 -> 37 channels: under the interpreter's 64 x 32 x 32 tiles that is two pixel
    # tiles, two channel slices and two output-channel tiles, each with a ragged edge.
    check(3, 40, 37, 5, 7, dtype=dtype, relu_input=relu_input, relu_output=relu_output, residual=residual)


@pytest.mark.parametrize("dtype", MATRIX_DTYPES, ids=str)
def test_without_bias(dtype):
    check(2, 13, 7, 5, 6, dtype=dtype, bias=False, relu_output=True, residual=True)


@pytest.mark.parametrize("dtype", SHAPE_DTYPES, ids=str)
@pytest.mark.parametrize("c, cout", [(1, 1), (1, 3), (3, 13), (13, 1), (13, 3), (70, 33)])
def test_channel_counts(dtype, c, cout):
    check(2, c, cout, 4, 3, dtype=dtype, relu_output=True, residual=True)


@pytest.mark.parametrize("dtype", SHAPE_DTYPES, ids=str)
@pytest.mark.parametrize("n", [0, 1, 3])
def test_batch_sizes(dtype, n):
    check(n, 16, 8, 7, 5, dtype=dtype, relu_output=True, residual=True)


@pytest.mark.parametrize("dtype", SHAPE_DTYPES, ids=str)
@pytest.mark.parametrize("h, w", [(1, 1), (1, 9), (9, 1), (2, 2), (6, 11)])
def test_spatial_sizes(dtype, h, w):
    check(2, 12, 10, h, w, dtype=dtype, residual=True)


@pytest.mark.parametrize("x_layout, residual_layout",
                         [("channels_last", "channels_last"), ("nchw", "nchw"), ("strided", "nchw"),
                          ("channels_last", "nchw"), ("nchw", "channels_last")])
def test_memory_formats(x_layout, residual_layout):
    n, c, cout, h, w = 2, 10, 9, 5, 6
    inputs = make_sepconv_inputs(n, c, cout, h, w, dtype=torch.float32, device=DEVICE, layout=x_layout,
                                 residual=True)
    if residual_layout == "channels_last":
        inputs["residual"] = inputs["residual"].contiguous(memory_format=torch.channels_last)
    x = inputs["x"]
    assert x.is_contiguous() == (x_layout == "nchw")
    fused, eager = run(inputs, True, True)
    assert fused.stride() == empty_output(x, cout).stride()
    assert_exact(fused, eager, reference64(inputs, True, True), f"x {x_layout}, residual {residual_layout}")


def test_channels_last_slice_input():
    # A channels_last tensor sliced along C: NHWC-ordered strides, but not contiguous.
    inputs = make_sepconv_inputs(2, 12, 7, 5, 6, dtype=torch.float32, device=DEVICE, layout="channels_last",
                                 residual=True)
    inputs["x"] = inputs["x"][:, 1:11]
    inputs["dw_weight"] = inputs["dw_weight"][1:11]
    inputs["pw_weight"] = inputs["pw_weight"][:, 1:11]
    assert not inputs["x"].is_contiguous(memory_format=torch.channels_last)
    fused, eager = run(inputs, True, False)
    assert fused.stride() == empty_output(inputs["x"], 7).stride()
    assert_exact(fused, eager, reference64(inputs, True, False))


def test_float32_weights_with_bfloat16_input():
    inputs = make_sepconv_inputs(2, 20, 12, 6, 6, dtype=torch.bfloat16, device=DEVICE, residual=True)
    for name in ("dw_weight", "pw_weight", "bias"):
        inputs[name] = make_sepconv_inputs(2, 20, 12, 6, 6, device=DEVICE)[name]
    assert inputs["pw_weight"].dtype == torch.float32
    fused, eager = run(inputs, True, True)
    assert fused.dtype == torch.bfloat16
    assert_exact(fused, eager, reference64(inputs, True, True))


def test_bfloat16_output_is_rounded_to_nearest_even():
    # y = x + bias exactly (one channel, centre tap 1, pointwise weight 1): one rounding of a float32
    # sum to bfloat16, which must be torch's round-to-nearest-even bit for bit.
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 1, 8, 8, generator=g).bfloat16().to(DEVICE)
    dw = torch.zeros(1, 1, 3, 3, device=DEVICE)
    dw[0, 0, 1, 1] = 1
    pw = torch.ones(1, 1, 1, 1, device=DEVICE)
    bias = (torch.randn(1, generator=g) * 1e-2).to(DEVICE)
    y = op(x, dw, pw, bias, False, False, None)
    assert torch.equal(y, (x.float() + bias).bfloat16())


# ----------------------------------------------------------------------------------------------
# Contract: errors, purity, determinism, the Python API

def good_args(device=DEVICE):
    i = make_sepconv_inputs(1, 4, 6, 5, 5, device=device, residual=True)
    return [i["x"], i["dw_weight"], i["pw_weight"], i["bias"], True, False, i["residual"]]


BAD = [
    ("x", lambda a: a[0][0]),
    ("x", lambda a: a[0].int()),
    ("x", lambda a: a[0][:, :, :0]),
    ("dw_weight", lambda a: a[1][:, :, :2]),
    ("dw_weight", lambda a: torch.cat([a[1], a[1][:1]])),
    ("pw_weight", lambda a: a[2][:, :3]),
    ("pw_weight", lambda a: a[2].expand(-1, -1, 3, 3)),
    ("pw_weight", lambda a: a[2].half()),
    ("bias", lambda a: a[3][:5]),
    ("residual", lambda a: a[6][..., :4]),
    ("residual", lambda a: a[6].bfloat16()),
    ("dw_weight", lambda a: a[1].to("meta")),
]
POSITION = {"x": 0, "dw_weight": 1, "pw_weight": 2, "bias": 3, "residual": 6}


@pytest.mark.parametrize("name, make_bad", BAD, ids=[f"{b[0]}-{i}" for i, b in enumerate(BAD)])
def test_bad_input_raises_the_checks_error(name, make_bad):
    args = good_args()
    args[POSITION[name]] = make_bad(args)
    with pytest.raises(Exception) as expected:
        check_args(args[0], args[1], args[2], args[3], args[6])
    assert name in str(expected.value)
    with pytest.raises(type(expected.value), match=re.escape(str(expected.value))):
        op(*args)


def test_float64_is_refused():
    args = good_args()
    args = [a.double() if isinstance(a, torch.Tensor) else a for a in args]
    with pytest.raises(ValueError, match="x must be float32, float16 or bfloat16"):
        op(*args)


@pytest.mark.gpu
def test_cpu_tensors_are_refused_when_compiled():
    with pytest.raises(ValueError, match="x must be a CUDA tensor"):
        op(*good_args("cpu"))


def test_inputs_are_not_modified_and_results_are_deterministic():
    inputs = make_sepconv_inputs(3, 40, 37, 5, 7, dtype=torch.bfloat16, device=DEVICE, residual=True)
    before = {k: v.clone() for k, v in inputs.items() if v is not None}
    first, _ = run(inputs, True, True)
    second, _ = run(inputs, True, True)
    assert torch.equal(first, second)
    for k in before:
        assert torch.equal(before[k], inputs[k]), k
        assert first.data_ptr() != inputs[k].data_ptr()


def test_python_api_backend_triton_is_this_op():
    i = make_sepconv_inputs(2, 13, 7, 5, 6, device=DEVICE, residual=True)
    via_api = xception_fast.sepconv_bn(i["x"], i["dw_weight"], i["pw_weight"], i["bias"], relu_input=True,
                                       relu_output=True, residual=i["residual"], backend="triton")
    direct = op(i["x"], i["dw_weight"], i["pw_weight"], i["bias"], True, True, i["residual"])
    assert torch.equal(via_api, direct)


ALL = "all of the dtype's configs"
PRUNED_TILES = [  # (dtype, M, C, Cout) -> the (BLOCK_M, BLOCK_N, BLOCK_K) tuned on a GPU
    (torch.bfloat16, 20, 3, 5, {(64, 64, 32)}),  # every tile is wider: the smallest alone
    (torch.float32, 20, 3, 5, {(32, 64, 32)}),
    (torch.bfloat16, 100, 40, 30, {(128, 64, 32), (64, 64, 32)}),
    (torch.float32, 100, 40, 30, {(64, 64, 32), (32, 64, 32)}),
    (torch.bfloat16, 300000, 64, 128,
     {(128, 128, 64), (128, 128, 32), (64, 128, 32), (128, 64, 32), (64, 64, 32)}),
    (torch.bfloat16, 2888, 728, 728, ALL),
    (torch.float32, 2888, 728, 728, ALL),
]


@pytest.mark.parametrize("dtype, m, c, cout, tiles", PRUNED_TILES)
def test_autotuning_keeps_the_tiles_that_fit_the_problem(dtype, m, c, cout, tiles):
    ours = triton_sepconv._FP32_CONFIGS if dtype == torch.float32 else triton_sepconv._HALF_CONFIGS
    kept = triton_sepconv._prune_configs(triton_sepconv._GPU_CONFIGS,
                                         {"x_ptr": torch.empty(0, dtype=dtype), "M": m, "C": c, "Cout": cout})
    def tile(cfg):
        return cfg.kwargs["BLOCK_M"], cfg.kwargs["BLOCK_N"], cfg.kwargs["BLOCK_K"]

    expected = ours if tiles == ALL else [cfg for cfg in ours if tile(cfg) in tiles]
    assert kept == expected


# ----------------------------------------------------------------------------------------------
# Gradients (the shared backward in xception_fast.autograd, recomputing through this op)

@pytest.mark.parametrize("relu_input, relu_output, residual", list(itertools.product([False, True], repeat=3)))
def test_gradients_match_the_reference(relu_input, relu_output, residual):
    inputs = make_sepconv_inputs(2, 5, 6, 4, 5, device=DEVICE, residual=residual, seed=1)
    grad_out = torch.randn(2, 6, 4, 5, generator=torch.Generator().manual_seed(2))
    names = [k for k, v in inputs.items() if v is not None]

    def grads(fn, tensors):
        leaves = {k: tensors[k].detach().requires_grad_() for k in names}
        args = [leaves.get(k) for k in ("x", "dw_weight", "pw_weight", "bias")]
        y = fn(*args, relu_input, relu_output, leaves.get("residual"))
        return dict(zip(names, torch.autograd.grad(y, [leaves[k] for k in names], grad_out.to(y))))

    fused = grads(op, inputs)
    eager = grads(sepconv_bn_reference, inputs)
    exact = grads(sepconv_bn_reference, {k: v.cpu().double() for k, v in inputs.items() if v is not None})
    for k in names:
        assert_exact(fused[k], eager[k], exact[k], f"grad of {k}")


# ----------------------------------------------------------------------------------------------
# GPU only: Xception-sized problems, the CUDA op, torch.library and torch.compile integration

XCEPTION_CASES = [
    # middle flow: ReLU -> sepconv -> BN, the third one adding the block's input
    (8, 728, 728, 19, torch.bfloat16, True, False, False),
    (8, 728, 728, 19, torch.bfloat16, True, False, True),
    (8, 728, 728, 19, torch.float16, True, False, True),
    (8, 728, 728, 19, torch.float32, True, False, True),
    # entry flow block 1: sepconv -> BN -> ReLU at 147 x 147
    (2, 64, 128, 147, torch.bfloat16, False, True, False),
    # exit flow
    (4, 1536, 2048, 10, torch.bfloat16, False, True, False),
]


@pytest.mark.gpu
@pytest.mark.parametrize("n, c, cout, hw, dtype, relu_input, relu_output, residual", XCEPTION_CASES)
def test_xception_sized(n, c, cout, hw, dtype, relu_input, relu_output, residual):
    torch.backends.cudnn.allow_tf32 = True  # PyTorch's default: float32 here runs on TF32 tensor cores
    check(n, c, cout, hw, hw, dtype=dtype, relu_input=relu_input, relu_output=relu_output, residual=residual)


@pytest.mark.gpu
def test_float32_tf32_follows_the_cudnn_flag():
    errors = {}
    for allow_tf32 in (False, True):
        torch.backends.cudnn.allow_tf32 = allow_tf32
        errors[allow_tf32] = check(4, 256, 256, 19, 19, dtype=torch.float32)[0]
    # TF32 keeps 10 mantissa bits against float32's 23: its error is orders of magnitude larger.
    assert errors[True] > 8 * errors[False], errors


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=str)
def test_agrees_with_the_cuda_op(dtype):
    from xception_fast import _extension

    if not _extension.has_cuda_kernel():
        pytest.skip("the extension was built without its CUDA kernel")
    inputs = make_sepconv_inputs(8, 728, 728, 19, 19, dtype=dtype, device="cuda", residual=True)
    args = (inputs["x"], inputs["dw_weight"], inputs["pw_weight"], inputs["bias"], True, False, inputs["residual"])
    triton_out = op(*args)
    cuda_out = torch.ops.xception_fast.sepconv_bn(*args)
    ref = reference64(inputs, True, False)
    assert_exact(triton_out, cuda_out, ref, "triton against cuda")
    assert_exact(cuda_out, triton_out, ref, "cuda against triton")


@pytest.mark.gpu
def test_large_tensor_offsets_need_int64():
    # x and the output have more than 2**31 elements; the last image is checked against the
    # reference, so 32-bit offsets that wrap would show there.
    n, c, cout, hw = 2049, 64, 64, 128
    assert n * c * hw * hw > 2 ** 31
    small = make_sepconv_inputs(1, c, cout, hw, hw, dtype=torch.bfloat16, device="cuda", residual=True, seed=3)
    x = small["x"].expand(n, -1, -1, -1).contiguous(memory_format=torch.channels_last)
    residual = small["residual"].expand(n, -1, -1, -1).contiguous(memory_format=torch.channels_last)
    y = op(x, small["dw_weight"], small["pw_weight"], small["bias"], True, False, residual)
    del x, residual
    last = y[-1:].clone()
    del y
    eager = sepconv_bn_reference(small["x"], small["dw_weight"], small["pw_weight"], small["bias"], True, False,
                                 small["residual"])
    assert_exact(last, eager, reference64(small, True, False))


@pytest.mark.gpu
def test_opcheck():
    i = make_sepconv_inputs(2, 5, 7, 4, 3, device="cuda", residual=True)
    args = (i["x"], i["dw_weight"], i["pw_weight"], i["bias"], True, True, i["residual"])
    torch.library.opcheck(torch.ops.xception_fast.sepconv_bn_triton.default, args)
    grad_args = tuple(a.detach().requires_grad_() if isinstance(a, torch.Tensor) else a for a in args)
    torch.library.opcheck(torch.ops.xception_fast.sepconv_bn_triton.default, grad_args)
    no_options = (i["x"], i["dw_weight"], i["pw_weight"], None, False, False, None)
    torch.library.opcheck(torch.ops.xception_fast.sepconv_bn_triton.default, no_options)


@pytest.mark.gpu
def test_torch_compile_fullgraph():
    i = make_sepconv_inputs(4, 128, 96, 19, 19, dtype=torch.bfloat16, device="cuda", residual=True)

    def unit(sepconv, x, dw, pw, b, r):
        return sepconv(x * 2, dw, pw, b, True, True, r) - 1

    args = (i["x"], i["dw_weight"], i["pw_weight"], i["bias"], i["residual"])
    compiled = torch.compile(lambda *a: unit(op, *a), fullgraph=True)
    result = compiled(*args)
    eager = unit(sepconv_bn_reference, *args)
    exact = unit(sepconv_bn_reference, *(a.cpu().double() for a in args))
    assert_exact(result, eager, exact)
