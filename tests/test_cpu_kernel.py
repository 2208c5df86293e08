"""The CPU kernel's own paths (xception_fast/csrc/cpu/sepconv_cpu.cpp): each product strategy, the
rule that chooses between them, the depthwise result kept for the backward, the fp32 precision
setting, packed weights in the fused modules going stale when a weight changes, and the depthwise
conv's backward; and each vector width the kernel's loops are compiled for."""
import concurrent.futures
import contextlib
import dataclasses
import copy
import os
import pathlib
import subprocess
import sys

import pytest
import torch
from torch import nn

import xception_fast
from exactness import (Unit, as_float64, assert_exact, eager, eager_depthwise, make_inputs, op_args, randomize_model_,
                       reference64)

STRATEGIES = {"tiled": 0, "materialized": 1}  # the header's layout field
SUM_DEPTH = 256  # kFp32SumDepth: a product deeper than this is summed in chunks


def pack(tensors, dtype, strategy, output_size=None):
    return torch.ops.xception_fast.pack_cpu(tensors["dw_weight"], tensors["dw_bias"], tensors["pw_weight"],
                                            tensors["pw_bias"], dtype, strategy, output_size)


def run(tensors, unit, packed):
    return torch.ops.xception_fast.sepconv(*op_args(tensors, unit, packed))


UNITS = [(3, Unit(act_in="relu")), (5, Unit(stride=2, act_mid="relu6", act_out="relu")),
         (3, Unit(dilation=2, act_in="hardswish", act_out="relu6"))]
STRATEGY_DTYPES = [("tiled", d) for d in (torch.float32, torch.bfloat16, torch.float16)] + [
    ("materialized", d) for d in (torch.float32, torch.bfloat16, torch.float16, torch.float64)]
KEPT_STRATEGY_DTYPES = [("tiled", torch.float32), ("tiled", torch.bfloat16), ("materialized", torch.float32)]


@pytest.mark.parametrize("strategy, dtype", STRATEGY_DTYPES, ids=[f"{s}-{d}" for s, d in STRATEGY_DTYPES])
@pytest.mark.parametrize("k, unit", UNITS, ids=[f"k{k}-{u.act_in}-{u.act_mid}-{u.act_out}" for k, u in UNITS])
@pytest.mark.parametrize("residual", [False, True])
@pytest.mark.parametrize("c, cout", [(13, 7), (40, 70), (300, 200)])
def test_each_strategy(strategy, dtype, k, unit, residual, c, cout):
    tensors, unit = make_inputs(2, c, cout, 9, 7, k=k, unit=unit, dtype=dtype, layout="channels_last", dw_bias=True,
                                residual=residual)
    packed = pack(tensors, dtype, strategy)
    assert packed[0][5].item() == STRATEGIES[strategy]
    got = run(tensors, unit, packed)
    if dtype == torch.float64:
        assert (got - reference64(tensors, unit)).abs().max().item() < 1e-10
        return
    assert_exact(got, eager(tensors, unit), reference64(tensors, unit), f"{strategy} {dtype}")
    # With the reorder for the call's shape (what the fused modules pass): the same result.
    shaped = pack(tensors, dtype, strategy, list(got.shape))
    assert torch.equal(run(tensors, unit, shaped), got)
    assert_keeps_its_depthwise_result(tensors, unit, packed, got)


def assert_keeps_its_depthwise_result(tensors, unit, packed, out):
    """sepconv_keeping_depthwise: the same output, and the depthwise result the product multiplied,
    channels-last in x's dtype, under the exactness rule against eager's depthwise conv."""
    got, depthwise = torch.ops.xception_fast.sepconv_keeping_depthwise(*op_args(tensors, unit, packed))
    assert torch.equal(got, out)
    expected = eager_depthwise(tensors, unit)
    assert depthwise.dtype == tensors["x"].dtype and depthwise.shape == expected.shape
    assert depthwise.is_contiguous(memory_format=torch.channels_last)
    assert_exact(depthwise, expected, eager_depthwise(as_float64(tensors), unit), "kept depthwise result")


@pytest.mark.parametrize("strategy, dtype", KEPT_STRATEGY_DTYPES, ids=[f"{s}-{d}" for s, d in KEPT_STRATEGY_DTYPES])
@pytest.mark.parametrize("n, size", [(1, 5), (3, 11)])
def test_kept_depthwise_result_when_output_channels_split(strategy, dtype, n, size):
    """One tile of pixels whose output channels several threads share (batch 1, a small map, many
    output channels): each tile's depthwise rows are kept once, whichever thread computes them."""
    tensors, unit = make_inputs(n, 40, 600, size, size, dtype=dtype, layout="channels_last", dw_bias=True,
                                unit=Unit(act_mid="relu6"))
    packed = pack(tensors, dtype, strategy)
    out = run(tensors, unit, packed)
    assert_exact(out, eager(tensors, unit), reference64(tensors, unit), f"{strategy} {dtype}")
    assert_keeps_its_depthwise_result(tensors, unit, packed, out)


def last_level_cache_bytes():
    """The size of cpu0's highest cache level in Linux's sysfs, which the kernel reads to decide
    when its bf16 depthwise result goes past the caches; None where sysfs does not say."""
    caches = pathlib.Path("/sys/devices/system/cpu/cpu0/cache")
    sizes = {}
    for index in sorted(caches.glob("index*")):
        try:
            level, size = (index / "level").read_text().strip(), (index / "size").read_text().strip()
        except OSError:
            continue
        sizes[int(level)] = int(size[:-1]) << {"K": 10, "M": 20}[size[-1]]
    return sizes[max(sizes)] if sizes else None


def test_bf16_depthwise_result_streamed_past_the_cache():
    """A bf16 batch whose depthwise result and output together exceed the last-level cache: the
    depthwise result is written with non-temporal stores. It is the same, to the bit, as each
    image's alone (which stays cached), and the output is within the exactness rule."""
    llc = last_level_cache_bytes()
    if llc is None:
        pytest.skip("sysfs gives no cache sizes here: the kernel never streams")
    c, size = 64, 48
    per_image = 2 * c * size * size * 2  # the depthwise result and the output, bf16
    n = llc // per_image + 1
    tensors, unit = make_inputs(n, c, c, size, size, unit=Unit(act_in="relu"), dtype=torch.bfloat16,
                                layout="channels_last", dw_bias=True)
    packed = pack(tensors, torch.bfloat16, "materialized")
    out, depthwise = torch.ops.xception_fast.sepconv_keeping_depthwise(*op_args(tensors, unit, packed))
    assert per_image * n > llc > 2 * per_image
    for i in (0, n // 2, n - 1):
        alone = dict(tensors, x=tensors["x"][i:i + 1])
        assert torch.equal(depthwise[i:i + 1], torch.ops.xception_fast.sepconv_keeping_depthwise(
            *op_args(alone, unit, packed))[1]), i
    sample = dict(tensors, x=tensors["x"][:4])
    assert_exact(out[:4], eager(sample, unit), reference64(sample, unit), "streamed bf16 unit")


def test_materialized_scratch_is_in_no_result():
    """Where the caller does not keep it, the materialized product's depthwise result goes to one
    buffer that the process keeps from call to call: later calls that use it (another input of the
    shape, then a larger one, which grows it) leave a kept depthwise result and every output as they
    were, and each gets its own result."""
    tensors, unit = make_inputs(2, 40, 70, 9, 7, dtype=torch.bfloat16, layout="channels_last", dw_bias=True,
                                unit=Unit(act_mid="relu6"))
    packed = pack(tensors, torch.bfloat16, "materialized")
    out, depthwise = torch.ops.xception_fast.sepconv_keeping_depthwise(*op_args(tensors, unit, packed))
    first = run(tensors, unit, packed)
    saved = out.clone(), depthwise.clone(), first.clone()
    g = torch.Generator().manual_seed(1)
    for n, h, w in ((2, 9, 7), (3, 15, 13)):
        other = dict(tensors, x=torch.randn(n, 40, h, w, generator=g).to(torch.bfloat16).contiguous(
            memory_format=torch.channels_last))
        got = run(other, unit, packed)
        assert_exact(got, eager(other, unit), reference64(other, unit), f"materialized bf16 {n}x{h}x{w}")
    for now, then in zip((out, depthwise, first), saved):
        assert torch.equal(now, then)
    assert torch.equal(first, out)
    assert torch.equal(run(tensors, unit, packed), out)  # once the buffer has grown


def test_materialized_calls_from_several_threads():
    """Calls at once from several threads: one borrows the kept buffer for its depthwise result, the
    others make their own, and each gets its own input's result."""
    inputs = []
    for seed in range(4):
        tensors, unit = make_inputs(2, 96, 64, 20, 20, dtype=torch.bfloat16, layout="channels_last", seed=seed)
        inputs.append(tensors)
    packed = pack(inputs[0], torch.bfloat16, "materialized")
    calls = [dict(inputs[0], x=t["x"]) for t in inputs]
    expected = [run(t, unit, packed) for t in calls]

    def repeatedly(t):
        return [run(t, unit, packed) for _ in range(20)]

    with concurrent.futures.ThreadPoolExecutor(len(calls)) as pool:
        results = list(pool.map(repeatedly, calls))
    for i, (outs, want) in enumerate(zip(results, expected)):
        assert all(torch.equal(o, want) for o in outs), i


def cpu_flags():
    """The CPU's feature flags as Linux names them, or None off x86 Linux."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return None


def test_the_rule():
    """fp32 multiplies in the tiled product (its blocked sums); fp64 in the materialized one; half
    precision in the materialized one (oneDNN's convolution) where the CPU has instructions that
    multiply in it (bf16: AVX512-BF16; fp16: AVX512-FP16), otherwise in the tiled one, in fp32 on
    the rounded values, as /proc/cpuinfo's flags say."""
    flags = cpu_flags()
    if flags is None or "avx512f" not in flags and "avx2" not in flags:
        pytest.skip("not an x86 CPU whose flags Linux lists: the half-precision rule is x86's")
    tensors, _ = make_inputs(1, 64, 128, 4, 4)
    half = {dtype: "materialized" if flag in flags else "tiled"
            for dtype, flag in ((torch.bfloat16, "avx512_bf16"), (torch.float16, "avx512_fp16"))}
    for dtype, strategy in ((torch.float32, "tiled"), (torch.bfloat16, half[torch.bfloat16]),
                            (torch.float16, half[torch.float16]), (torch.float64, "materialized")):
        packed = xception_fast.pack_weights("cpu", dtype, tensors["dw_weight"], None, tensors["pw_weight"], None)
        assert packed[0][5].item() == STRATEGIES[strategy], dtype


def test_keeping_the_depthwise_result_multiplies_materialized_when_weights_come_unpacked():
    """A training step's weights: the kept depthwise result is the product's input, in eager's
    convolution, with no per-call layout of the weights for the tiled product."""
    tensors, unit = make_inputs(2, 300, 70, 9, 7, layout="channels_last", dw_bias=True)
    kept, _ = torch.ops.xception_fast.sepconv_keeping_depthwise(*op_args(tensors, unit))
    materialized = run(tensors, unit, pack(tensors, torch.float32, "materialized"))
    assert torch.equal(kept, materialized)
    assert not torch.equal(kept, run(tensors, unit, None))  # the plain op's own choice, tiled, sums otherwise


def test_tiled_is_refused_for_float64_and_fp32_multiplied_in_bf16():
    tensors, _ = make_inputs(1, 8, 8, 4, 4)
    with pytest.raises(ValueError, match="strategy 'tiled' multiplies in fp32"):
        pack(tensors, torch.float64, "tiled")
    with fp32_convs_in("bf16"):
        with pytest.raises(ValueError, match="strategy 'tiled' multiplies in fp32"):
            pack(tensors, torch.float32, "tiled")
    with pytest.raises(ValueError, match="strategy must be 'auto', 'tiled' or 'materialized'"):
        pack(tensors, torch.float32, "fast")


@pytest.mark.parametrize("c, cout", [(1024, 1536), (1536, 2048), (728, 1024)])
def test_deep_products_are_summed_in_blocks(c, cout):
    """One running sum over K in the thousands is several times less exact than eager's convolution
    where eager's is a blocked GEMM (a single small image, as here): the tiled product's chunks keep
    it within the rule."""
    assert c > SUM_DEPTH
    for seed in range(3):
        tensors, unit = make_inputs(1, c, cout, 4, 3, unit=Unit(act_out="relu"), residual=True,
                                    layout="channels_last", seed=seed)
        got = run(tensors, unit, pack(tensors, torch.float32, "tiled"))
        assert_exact(got, eager(tensors, unit), reference64(tensors, unit), f"{c}->{cout} seed {seed}")


@contextlib.contextmanager
def fp32_convs_in(precision):
    saved = torch.backends.mkldnn.conv.fp32_precision
    torch.backends.mkldnn.conv.fp32_precision = precision
    try:
        yield
    finally:
        torch.backends.mkldnn.conv.fp32_precision = saved


@pytest.mark.skipif(not torch.backends.mkldnn.is_available(), reason="needs oneDNN")
def test_fp32_follows_the_mkldnn_precision_setting():
    # Large enough that eager's convolutions run in oneDNN (and so follow the setting) too.
    tensors, unit = make_inputs(4, 64, 96, 12, 12, unit=Unit(act_out="relu"), layout="channels_last", residual=True)
    ref = reference64(tensors, unit)
    errors, eager_errors = {}, {}
    for precision in ("none", "bf16"):
        with fp32_convs_in(precision):
            got = xception_fast.sepconv(tensors["x"], tensors["dw_weight"], tensors["pw_weight"], tensors["pw_bias"],
                                        act_in="relu", act_out="relu", residual=tensors["residual"], backend="cpu")
            assert got.dtype == torch.float32
            expected = eager(tensors, unit)
            errors[precision] = assert_exact(got, expected, ref, f"fp32_precision={precision}")[0]
            eager_errors[precision] = (expected.double() - ref).abs().max().item()
    # bf16 products keep 8 mantissa bits against fp32's 24: errors orders of magnitude apart. Whether
    # eager's fp32 convolutions take the setting depends on the CPU (PyTorch honours it only where
    # oneDNN has fast bf16 for them; an AMD EPYC with AVX512-BF16 and no AMX kept fp32): the kernel
    # multiplies in bf16 exactly where eager does.
    eager_in_bf16 = eager_errors["bf16"] > 100 * eager_errors["none"]
    assert (errors["bf16"] > 100 * errors["none"]) == eager_in_bf16, (errors, eager_errors)


def test_packed_weights_made_under_another_precision_setting_are_refused():
    tensors, unit = make_inputs(2, 16, 8, 5, 5)
    packed = pack(tensors, torch.float32, "auto")
    with fp32_convs_in("bf16"):
        with pytest.raises(ValueError, match="pack them again"):
            run(tensors, unit, packed)


def test_packed_weights_with_a_header_of_another_length_are_refused():
    tensors, unit = make_inputs(2, 16, 8, 5, 5)
    packed = pack(tensors, torch.float32, "auto")
    fields = packed[0].numel()
    for header in (packed[0][:-1], torch.cat([packed[0], packed[0][:1]])):
        with pytest.raises(ValueError, match=f"header of {header.numel()} fields.*writes {fields}.*pack them again"):
            run(tensors, unit, [header, *packed[1:]])


def test_packed_weights_without_this_units_pointwise_bias_are_refused():
    tensors, unit = make_inputs(2, 16, 8, 5, 5, dtype=torch.bfloat16)
    packed = pack(tensors, torch.bfloat16, "materialized")
    for bias in (packed[5].float(), packed[5][:-1]):
        with pytest.raises(ValueError, match="pointwise bias"):
            run(tensors, unit, [*packed[:5], bias])


class Unit2(nn.Module):
    """DW -> BN -> ReLU6 -> PW -> BN, a MobileNet-style unit with a residual."""

    def __init__(self, c=24, cout=24):
        super().__init__()
        self.dw = nn.Conv2d(c, c, 3, padding=1, groups=c, bias=False)
        self.bn1 = nn.BatchNorm2d(c)
        self.act = nn.ReLU6()
        self.pw = nn.Conv2d(c, cout, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)

    def forward(self, x):
        return self.bn2(self.pw(self.act(self.bn1(self.dw(x))))) + x


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_packed_weights_go_stale_when_a_weight_changes(dtype):
    net = randomize_model_(Unit2(), seed=1).eval()
    fused, report = xception_fast.fuse(copy.deepcopy(net), backend="cpu")
    assert report.count == 1
    x = torch.randn(2, 24, 9, 11, generator=torch.Generator().manual_seed(2)).to(dtype)
    fused, net = fused.to(dtype), net.to(dtype)
    changes = [lambda m: m.pw.weight.mul_(1.5), lambda m: m.bn1.running_var.add_(0.5),
               lambda m: m.dw.weight.neg_(), lambda m: m.bn2.bias.add_(1.0)]
    with torch.no_grad():
        before = fused(x)
        for change in changes:
            change(fused)
            change(net)
            after = fused(x)
            assert not torch.equal(after, before), "a changed weight left the fused unit's result as it was"
            assert_exact(after, net(x), copy.deepcopy(net).double()(x.double()))
            before = after


# ----------------------------------------------------------------------------------------------
# The depthwise conv's backward (the unit's backward on a CPU)

def depthwise_grads(x, dw_weight, grad, unit, k):
    """Eager's gradients of x and dw_weight through act_in and the depthwise conv."""
    x, w = x.detach().clone().requires_grad_(), dw_weight.detach().clone().requires_grad_()
    a = xception_fast.contract.activation(x, unit.act_in)
    out = torch.nn.functional.conv2d(a, w.to(x.dtype), stride=unit.stride, padding=unit.padding,
                                     dilation=unit.dilation, groups=x.shape[1])
    out.backward(grad)
    return x.grad, w.grad


DEPTHWISE_BACKWARD_CASES = [(3, Unit(act_in="relu")), (3, Unit(stride=2, act_in="relu6")),
                            (5, Unit(dilation=2, act_in="hardswish")), (7, Unit(stride=2, act_in="identity")),
                            (1, Unit(act_in="relu")), (3, Unit(padding=0, act_in="relu"))]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64], ids=str)
@pytest.mark.parametrize("k, unit", DEPTHWISE_BACKWARD_CASES,
                         ids=[f"k{k}-s{u.stride}-d{u.dilation}-p{u.padding}-{u.act_in}"
                              for k, u in DEPTHWISE_BACKWARD_CASES])
@pytest.mark.parametrize("layout", ["channels_last", "nchw"])
def test_depthwise_backward_matches_eager(dtype, k, unit, layout):
    """Channels past the last full vector (37 = 2 x 16 + 5 in fp32), every border, each act_in."""
    tensors, unit = make_inputs(3, 37, 5, 11, 9, k=k, unit=unit, dtype=dtype, layout=layout)
    x, w = tensors["x"], tensors["dw_weight"]
    out_shape = eager_depthwise(dict(tensors, dw_bias=None), dataclasses.replace(unit, act_mid="identity")).shape
    grad = torch.randn(out_shape, generator=torch.Generator().manual_seed(7)).to(dtype)
    if layout == "channels_last":
        grad = grad.contiguous(memory_format=torch.channels_last)
    got_x, got_w = torch.ops.xception_fast.depthwise_backward(grad, x, w, unit.stride, unit.padding, unit.dilation,
                                                              unit.act_in, [True, True])
    eager_x, eager_w = depthwise_grads(x, w, grad, unit, k)
    ref_x, ref_w = depthwise_grads(x.double(), w.double(), grad.double(), unit, k)
    assert got_x.dtype == dtype and got_x.is_contiguous(memory_format=torch.channels_last) == (layout != "nchw")
    assert got_w.dtype == (torch.float64 if dtype == torch.float64 else torch.float32) and got_w.shape == w.shape
    if dtype == torch.float64:  # eager is the reference: only the order of the sums differs
        assert (got_x - ref_x).abs().max().item() < 1e-10 and (got_w - ref_w).abs().max().item() < 1e-10
    else:
        assert_exact(got_x, eager_x, ref_x, f"grad of x ({dtype})")
        assert_exact(got_w, eager_w, ref_w, f"grad of dw_weight ({dtype})")
    only_x, none_w = torch.ops.xception_fast.depthwise_backward(grad, x, w, unit.stride, unit.padding, unit.dilation,
                                                                unit.act_in, [True, False])
    none_x, only_w = torch.ops.xception_fast.depthwise_backward(grad, x, w, unit.stride, unit.padding, unit.dilation,
                                                                unit.act_in, [False, True])
    assert none_w is None and none_x is None
    assert torch.equal(only_x, got_x) and torch.equal(only_w, got_w)


@contextlib.contextmanager
def set_threads(n):
    saved = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(saved)


@pytest.mark.parametrize("n, c, cout, size", [(1, 40, 600, 5), (3, 300, 200, 11), (2, 64, 96, 23)])
def test_the_tiled_result_does_not_depend_on_the_thread_count(n, c, cout, size):
    """The tiles of pixels, and the groups of output channels that share a tile, follow the thread
    count; each output's sums in the tiled product do not: the same bits with 1, 2, 3 and 8 threads.
    (The materialized product is a oneDNN convolution, whose sums, as eager's, follow its blocking
    for the thread count.)"""
    tensors, unit = make_inputs(n, c, cout, size, size, layout="channels_last", dw_bias=True,
                                unit=Unit(act_in="relu", act_out="relu6"))
    packed = pack(tensors, torch.float32, "tiled")
    results = {}
    for threads in (1, 2, 3, 8):
        with set_threads(threads):
            results[threads] = run(tensors, unit, packed)
    assert_exact(results[1], eager(tensors, unit), reference64(tensors, unit), "tiled")
    for threads, got in results.items():
        assert torch.equal(got, results[1]), f"{threads} threads differ from one"


@pytest.mark.parametrize("act_in", ["relu", "relu6", "hardswish"])
def test_depthwise_backward_at_the_activations_kinks(act_in):
    """x exactly at each kink (0, 6, -3, 3): the derivative eager's backward kernels take there."""
    values = torch.tensor([0.0, 6.0, -3.0, 3.0, -4.0, -0.5, 0.5, 7.0])
    x = values.repeat(2 * 16 * 6).reshape(2, 16, 8, 6).contiguous(memory_format=torch.channels_last)
    w = torch.randn(16, 1, 3, 3, generator=torch.Generator().manual_seed(8))
    grad = torch.randn(2, 16, 8, 6, generator=torch.Generator().manual_seed(9))
    got_x, _ = torch.ops.xception_fast.depthwise_backward(grad, x, w, 1, 1, 1, act_in, [True, False])
    eager_x, _ = depthwise_grads(x, w, grad, Unit(act_in=act_in).resolved(3), 3)
    torch.testing.assert_close(got_x, eager_x, rtol=1e-5, atol=1e-5)
    assert torch.equal(got_x == 0, eager_x == 0)


def test_depthwise_backward_is_deterministic_and_checked():
    """The taps' sums in a fixed order, whatever the thread count."""
    tensors, unit = make_inputs(2, 20, 5, 30, 6, unit=Unit(act_in="relu"))
    x, w = tensors["x"], tensors["dw_weight"]
    grad = torch.randn(2, 20, 30, 6)
    args = (grad, x, w, 1, 1, 1, "relu", [True, True])
    first = torch.ops.xception_fast.depthwise_backward(*args)
    with set_threads(1):
        alone = torch.ops.xception_fast.depthwise_backward(*args)
    assert all(torch.equal(a, b) for a, b in zip(first, alone))
    torch.library.opcheck(torch.ops.xception_fast.depthwise_backward.default, args)
    with pytest.raises(ValueError, match="grad must have the depthwise output's shape"):
        torch.ops.xception_fast.depthwise_backward(grad[:, :, :-1], x, w, 1, 1, 1, "relu", [True, True])
    with pytest.raises(ValueError, match="act_in"):
        torch.ops.xception_fast.depthwise_backward(grad, x, w, 1, 1, 1, "gelu", [True, True])
    with pytest.raises(ValueError, match="dw_weight must be"):
        torch.ops.xception_fast.depthwise_backward(grad, x, w[:3], 1, 1, 1, "relu", [True, True])


# What the narrower settings of ATEN_CPU_CAPABILITY leave the CPU kernel's loops, in bytes per
# vector, on an x86 CPU that has the instructions.
NARROWER_CAPABILITIES = {"avx2": 32, "default": 16}
TESTS = os.path.dirname(os.path.abspath(__file__))


def run_capped(capability, *args):
    env = dict(os.environ, ATEN_CPU_CAPABILITY=capability)
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, env=env, cwd=TESTS, timeout=900)


@pytest.mark.parametrize("capability", sorted(NARROWER_CAPABILITIES))
def test_each_vector_width(capability):
    """The channel loops are compiled once per vector width (AVX-512, AVX2, baseline) and the
    widest this CPU has runs: the rest of the suite tests that one. Capped by ATEN_CPU_CAPABILITY,
    a process runs a narrower one; there the op tests on CPU run again (exactness of every option,
    shape and dtype, the strategies, the depthwise backward, gradients, the max-pool with its add)."""
    widest = torch.ops.xception_fast.cpu_vector_bytes()
    capped = run_capped(capability, "-c", "import torch, xception_fast.ops; "
                                          "print(torch.ops.xception_fast.cpu_vector_bytes())")
    assert capped.returncode == 0, capped.stderr[-3000:]
    width = int(capped.stdout.split()[-1])
    assert width <= min(widest, NARROWER_CAPABILITIES[capability])
    if width == widest:
        pytest.skip(f"this CPU's widest loops are {widest}-byte ones already: the suite runs them")
    if torch.backends.cpu.get_cpu_capability() in ("AVX2", "AVX512"):
        assert width == NARROWER_CAPABILITIES[capability]
    done = run_capped(capability, "-m", "pytest", "-q", "-p", "no:cacheprovider", "test_cpu_kernel.py",
                      "test_sepconv.py", "test_gradients.py", "test_max_pool_add.py", "-k",
                      "not vector_width and not triton and not cuda and not reference and not gpu")
    assert done.returncode == 0, done.stdout[-6000:] + done.stderr[-3000:]
    assert " passed" in done.stdout, done.stdout[-3000:]


def test_bf16_weights_packed_for_other_vectors_are_refused(tmp_path):
    """bf16 taps are packed in the order this CPU's loops read them, two vectors of channels at a
    time: weights packed where the vectors are narrower (another CPU; here a capped process) are
    refused, not read in the wrong order."""
    saved = tmp_path / "packed.pt"
    capped = run_capped("default", "-c", "import sys, torch, xception_fast.ops\n"
                                         "torch.manual_seed(0)\n"
                                         "w = [torch.randn(s).bfloat16() for s in ((40, 1, 3, 3), (40,), (8, 40, 1, 1))]\n"
                                         "packed = torch.ops.xception_fast.pack_cpu(w[0], w[1], w[2], None, "
                                         "torch.bfloat16, 'auto', None)\n"
                                         "torch.save((w, packed), sys.argv[1])", str(saved))
    assert capped.returncode == 0, capped.stderr[-3000:]
    if torch.ops.xception_fast.cpu_vector_bytes() == 16:
        pytest.skip("this process's vectors are the capped process's: the same pack")
    (dw_weight, dw_bias, pw_weight), packed = torch.load(saved)
    x = torch.randn(2, 40, 6, 5).to(torch.bfloat16)
    args = (x, dw_weight, dw_bias, pw_weight, None, None, 1, 1, 1, "relu", "identity", "identity")
    with pytest.raises(ValueError, match="taps in pairs of 8 channels.*pack them again"):
        torch.ops.xception_fast.sepconv(*args, packed)
    here = torch.ops.xception_fast.pack_cpu(dw_weight, dw_bias, pw_weight, None, torch.bfloat16, "auto", None)
    assert torch.equal(torch.ops.xception_fast.sepconv(*args, here), torch.ops.xception_fast.sepconv(*args, None))
