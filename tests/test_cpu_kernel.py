"""The CPU kernel's own paths (xception_fast/csrc/cpu/sepconv_cpu.cpp): each product strategy, the
rule that chooses between them, the fp32 precision setting, and packed weights in the fused
modules going stale when a weight changes."""
import contextlib
import copy

import pytest
import torch
from torch import nn

import xception_fast
from exactness import Unit, assert_exact, eager, make_inputs, op_args, randomize_model_, reference64

STRATEGIES = {"tiled": 0, "materialized": 1}  # the header's layout field
SUM_DEPTH = 256  # kFp32SumDepth: a product deeper than this is summed in chunks


def pack(tensors, dtype, strategy, output_size=None):
    return torch.ops.xception_fast.pack_cpu(tensors["dw_weight"], tensors["dw_bias"], tensors["pw_weight"],
                                            tensors["pw_bias"], dtype, strategy, output_size)


def run(tensors, unit, packed):
    return torch.ops.xception_fast.sepconv(*op_args(tensors, unit, packed))


UNITS = [(3, Unit(act_in="relu")), (5, Unit(stride=2, act_mid="relu6", act_out="relu")),
         (3, Unit(dilation=2, act_in="hardswish", act_out="relu6"))]
STRATEGY_DTYPES = [("tiled", torch.float32)] + [("materialized", d) for d in
                                                (torch.float32, torch.bfloat16, torch.float16, torch.float64)]


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


def test_the_rule():
    """fp32 multiplies in the tiled product (its blocked sums); half precision and fp64 in the
    materialized one."""
    tensors, _ = make_inputs(1, 64, 128, 4, 4)
    for dtype, strategy in ((torch.float32, "tiled"), (torch.bfloat16, "materialized"),
                            (torch.float16, "materialized"), (torch.float64, "materialized")):
        packed = xception_fast.pack_weights("cpu", dtype, tensors["dw_weight"], None, tensors["pw_weight"], None)
        assert packed[0][5].item() == STRATEGIES[strategy], dtype


def test_tiled_is_refused_for_half_precision():
    tensors, _ = make_inputs(1, 8, 8, 4, 4)
    with pytest.raises(ValueError, match="strategy 'tiled' multiplies in fp32"):
        pack(tensors, torch.bfloat16, "tiled")
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
