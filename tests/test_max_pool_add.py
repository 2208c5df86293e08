"""The max-pool with its residual add in one pass (torch.ops.xception_fast.max_pool_add, a C++ CPU
kernel) and its place in fuse(): FusedMaxPool2d at the end of Xception's down-sampling blocks.

The op computes ``max_pool2d(x, k, s, p) + residual``: a maximum is exact and the add rounds once, as
eager's add does, so its result is eager's to the bit (NaN where eager's is NaN, the sign of a zero
included). That is what these tests hold it to, with NaN, infinities and signed zeros among the
inputs, odd channel counts (vector tails), both memory formats and every dtype.
"""
import copy

import pytest
import torch
from torch import nn

import xception_fast
import xception_fast.fusion as fusion
from xception_fast import Xception
from xception_fast.contract import max_pool_add_reference
from xception_fast.ops import max_pool_add
from exactness import assert_exact, randomize_model_

DTYPES = [torch.float32, torch.float64, torch.bfloat16, torch.float16]
# (kernel_size, stride, padding): Xception's, a non-overlapping one, stride 1, a wide one, the identity.
POOLS = [(3, 2, 1), (2, 2, 0), (3, 1, 1), (5, 3, 2), (1, 1, 0)]
LAYOUTS = {"nchw": torch.contiguous_format, "channels_last": torch.channels_last}


def special_values(shape, dtype, seed):
    """Random values with NaN, +-inf and +-0 sprinkled in, as dtype."""
    g = torch.Generator().manual_seed(seed)
    t = torch.randn(shape, generator=g, dtype=torch.float64)
    pick = torch.rand(shape, generator=g, dtype=torch.float64)
    t[pick < 0.02] = float("nan")
    t[(pick >= 0.02) & (pick < 0.04)] = float("inf")
    t[(pick >= 0.04) & (pick < 0.07)] = float("-inf")
    t[(pick >= 0.07) & (pick < 0.12)] = 0.0
    t[(pick >= 0.12) & (pick < 0.17)] = -0.0
    return t.to(dtype)


def pooled_shape(x, k, s, p):
    n, c, h, w = x.shape
    return (n, c, (h + 2 * p - k) // s + 1, (w + 2 * p - k) // s + 1)


def assert_same_bits(got, want):
    """Equal values, NaN where NaN, the same sign of every zero."""
    torch.testing.assert_close(got, want, rtol=0, atol=0, equal_nan=True)
    numbers = ~want.isnan()
    assert torch.equal(got.signbit()[numbers], want.signbit()[numbers]), "the sign of a zero differs"


@pytest.mark.parametrize("layout", sorted(LAYOUTS))
@pytest.mark.parametrize("k, s, p", POOLS, ids=[f"k{k}s{s}p{p}" for k, s, p in POOLS])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_matches_eager_to_the_bit(dtype, k, s, p, layout):
    # 37 channels: two 16-lane vectors and a tail; 13 x 11 pixels: windows cut by every border.
    for seed, shape in enumerate([(2, 37, 13, 11), (1, 5, 7, 9)]):
        x = special_values(shape, dtype, seed).contiguous(memory_format=LAYOUTS[layout])
        residual = special_values(pooled_shape(x, k, s, p), dtype, seed + 10).contiguous(
            memory_format=LAYOUTS[layout])
        before = (x.clone(), residual.clone())
        got = max_pool_add(x, residual, k, s, p)
        want = max_pool_add_reference(x, residual, k, s, p)
        assert got.dtype == dtype and got.shape == want.shape
        assert got.is_contiguous(memory_format=LAYOUTS[layout]), "the output has x's memory format"
        assert_same_bits(got, want)
        assert_same_bits(x, before[0]) and assert_same_bits(residual, before[1])


def test_first_of_equal_maxima_as_eager():
    """+0 and -0 are equal maxima: the one met first in the window (row by row) is kept, as by eager."""
    x = torch.tensor([[[[-0.0, 0.0], [0.0, -0.0]]], [[[0.0, -0.0], [-0.0, 0.0]]]]).expand(2, 20, 2, 2)
    for memory_format in LAYOUTS.values():
        x_in = x.contiguous(memory_format=memory_format)
        residual = torch.full((2, 20, 1, 1), -0.0)
        got = max_pool_add(x_in, residual, 2, 2, 0)
        assert_same_bits(got, max_pool_add_reference(x_in, residual, 2, 2, 0))
        assert got[0].signbit().all() and not got[1].signbit().any()


def test_residual_in_another_memory_format_and_default_stride():
    x = torch.randn(2, 24, 10, 10).contiguous(memory_format=torch.channels_last)
    residual = torch.randn(2, 24, 5, 5)
    assert_same_bits(max_pool_add(x, residual, 2), max_pool_add_reference(x, residual, 2, 2, 0))


@pytest.mark.parametrize("layout", sorted(LAYOUTS))
def test_gradients_match_eager(layout):
    x = torch.randn(2, 19, 9, 8, dtype=torch.float64).contiguous(memory_format=LAYOUTS[layout])
    x[0, 0, :2, :2] = 1.0  # tied maxima: the gradient goes to the first, as eager's
    residual = torch.randn(2, 19, 5, 4, dtype=torch.float64)
    grad = torch.randn(2, 19, 5, 4, dtype=torch.float64)
    results = []
    for fn in (lambda a, r: max_pool_add(a, r, 3, 2, 1), lambda a, r: max_pool_add_reference(a, r, 3, 2, 1)):
        a, r = x.clone().requires_grad_(), residual.clone().requires_grad_()
        fn(a, r).backward(grad)
        results.append((a.grad, r.grad))
    assert torch.equal(results[0][0], results[1][0]) and torch.equal(results[0][1], results[1][1])


def test_opcheck():
    x = torch.randn(2, 19, 9, 8).contiguous(memory_format=torch.channels_last)
    residual = torch.randn(2, 19, 5, 4)
    torch.library.opcheck(torch.ops.xception_fast.max_pool_add.default, (x, residual, 3, 2, 1))
    torch.library.opcheck(torch.ops.xception_fast.max_pool_add.default,
                          (x.requires_grad_(), residual.requires_grad_(), 3, 2, 1))


BAD = [
    (lambda x, r: (x[0], r, 3, 2, 1), "x must be a 4-D"),
    (lambda x, r: (x.int(), r.int(), 3, 2, 1), "x must be float32"),
    (lambda x, r: (x, r, 0, 2, 1), "kernel_size must be >= 1"),
    (lambda x, r: (x, r, 3, 0, 1), "stride must be >= 1"),
    (lambda x, r: (x, r, 3, 2, 2), "padding must be between 0 and half of kernel_size"),
    (lambda x, r: (x, r, 3, 2, -1), "padding must be between 0 and half of kernel_size"),
    (lambda x, r: (x[:, :, :1, :1], r, 5, 2, 1), "smaller than the window"),
    (lambda x, r: (x[:, :0], r, 3, 2, 1), "x needs C, H, W >= 1"),
    (lambda x, r: (x, r[:, :, :4], 3, 2, 1), "residual must have the pooled shape"),
    (lambda x, r: (x, r.double(), 3, 2, 1), "residual must have x's dtype"),
]


@pytest.mark.parametrize("where", ["kernel", "fake"])
@pytest.mark.parametrize("make, message", BAD, ids=[m for _, m in BAD])
def test_bad_input_names_the_argument(make, message, where):
    x, residual = torch.randn(2, 6, 9, 8), torch.randn(2, 6, 5, 4)
    args = make(x, residual)
    if where == "fake":
        from torch._subclasses.fake_tensor import FakeTensorMode

        with FakeTensorMode() as mode:
            args = tuple(mode.from_tensor(a) if isinstance(a, torch.Tensor) else a for a in args)
            with pytest.raises(ValueError, match=message):
                torch.ops.xception_fast.max_pool_add(*args)
    else:
        with pytest.raises(ValueError, match=message):
            torch.ops.xception_fast.max_pool_add(*args)


def test_python_api_checks_its_arguments():
    x, residual = torch.randn(2, 6, 9, 8), torch.randn(2, 6, 5, 4)
    with pytest.raises(TypeError, match="residual must be a Tensor"):
        max_pool_add(x, None, 3, 2, 1)
    with pytest.raises(TypeError, match="kernel_size must be an int"):
        max_pool_add(x, residual, (3, 3), 2, 1)
    with pytest.raises(ValueError, match="x must be on the CPU"):
        max_pool_add(x.to("meta"), residual.to("meta"), 3, 2, 1)


# ----------------------------------------------------------------------------------------------
# In fuse()

def op_calls(fn):
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        result = fn()
    return result, sum(e.count for e in prof.key_averages() if e.key == "xception_fast::max_pool_add")


@pytest.fixture(scope="module")
def xception():
    return randomize_model_(Xception(num_classes=10), seed=31).eval().to(memory_format=torch.channels_last)


def test_xception_blocks_take_their_add_into_the_pool(xception):
    """The four down-sampling blocks' ``maxpool(x) + shortcut``: one pass each in channels-last on a
    CPU, the logits those of the same fused model with eager's pool and add, to the bit."""
    fused, report = xception_fast.fuse(copy.deepcopy(xception), backend="cpu")
    names = ["entry_block1.maxpool", "entry_block2.maxpool", "entry_block3.maxpool", "exit_block.maxpool"]
    assert report.pooled == names
    assert "residual add taken into 4 max-pools" in report.summary and names[0] in str(report)
    assert all(type(fused.get_submodule(n)) is fusion.FusedMaxPool2d for n in names)
    assert "self.maxpool(" in fused.entry_block1.fused_code and "residual" in fused.entry_block1.fused_code
    eager_pools = copy.deepcopy(fused)
    for name in names:
        eager_pools.get_submodule(name).backend = "reference"
    x = torch.randn(2, 3, 79, 86).contiguous(memory_format=torch.channels_last)
    for dtype in (torch.float32, torch.bfloat16):
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == torch.bfloat16):
            got, calls = op_calls(lambda: fused(x))
            want, eager_calls = op_calls(lambda: eager_pools(x))
        assert calls == 4 and eager_calls == 0
        assert torch.equal(got, want)
    # NCHW, and where a gradient is made: eager's pool and add (the same values).
    x_nchw = x.contiguous()
    fused_nchw, eager_pools_nchw = (copy.deepcopy(m).to(memory_format=torch.contiguous_format)
                                    for m in (fused, eager_pools))
    with torch.no_grad():
        got, calls = op_calls(lambda: fused_nchw(x_nchw))
        assert calls == 0 and torch.equal(got, eager_pools_nchw(x_nchw))
    _, calls = op_calls(lambda: fused(x.requires_grad_()).sum().backward())
    assert calls == 0


def test_the_pool_alone_is_the_pool_it_was(xception):
    fused, _ = xception_fast.fuse(copy.deepcopy(xception), backend="cpu")
    pool = fused.entry_block1.maxpool
    x = torch.randn(1, 8, 11, 11)
    assert torch.equal(pool(x), xception.entry_block1.maxpool(x))


class PoolThenAdd(nn.Module):
    """A conv, so that fuse() traces it; then pool(x) + r, with what a test puts between."""

    def __init__(self, pool=None, between=None, used_again=False, shortcut=None):
        super().__init__()
        self.conv = nn.Conv2d(8, 8, 3, padding=1)
        self.pool = pool or nn.MaxPool2d(3, 2, 1)
        self.shortcut = shortcut or nn.Conv2d(8, 8, 1, stride=2)
        self.between = between
        self.used_again = used_again

    def forward(self, x):
        y = self.conv(x)
        pooled = self.pool(y)
        if self.between is not None:
            self.between(y)
        out = pooled + self.shortcut(x)
        return (out, pooled) if self.used_again else out


def eager_and_fused(model):
    """(eager's result, the fused model's, the report, the op's calls) on a channels-last batch."""
    model = model.eval().to(memory_format=torch.channels_last)
    x = torch.randn(2, 8, 15, 15).contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        want = copy.deepcopy(model)(x)
        fused, report = xception_fast.fuse(copy.deepcopy(model), backend="cpu")
        got, calls = op_calls(lambda: fused(x))
    return want, got, report, calls, fused


REFUSED = {
    "ceil_mode": dict(pool=nn.MaxPool2d(3, 2, 1, ceil_mode=True)),
    "dilation": dict(pool=nn.MaxPool2d(3, 2, 1, dilation=2), shortcut=nn.Conv2d(8, 8, 3, stride=2)),
    "pool result used again": dict(used_again=True),
    "input written between pool and add": dict(between=lambda y: y.mul_(-1)),
}


@pytest.mark.parametrize("case", sorted(REFUSED))
def test_refused_where_the_add_cannot_be_taken(case):
    torch.manual_seed(0)
    want, got, report, calls, fused = eager_and_fused(PoolThenAdd(**REFUSED[case]))
    assert report.pooled == [] and calls == 0
    assert type(fused.pool) is nn.MaxPool2d
    for g, w in zip(got if isinstance(got, tuple) else (got,), want if isinstance(want, tuple) else (want,)):
        assert torch.equal(g, w)


def test_taken_in_a_block_of_its_own_and_in_either_order():
    class ShortcutFirst(PoolThenAdd):
        def forward(self, x):
            return self.shortcut(x) + self.pool(self.conv(x))

    for cls in (PoolThenAdd, ShortcutFirst):
        torch.manual_seed(1)
        want, got, report, calls, _ = eager_and_fused(cls())
        assert report.pooled == ["pool"] and calls == 1
        assert torch.equal(got, want)


def test_broadcast_residual_stays_eager():
    class Broadcast(PoolThenAdd):
        def forward(self, x):
            return self.pool(self.conv(x)) + self.shortcut(x).mean((2, 3), keepdim=True)

    torch.manual_seed(2)
    want, got, report, calls, _ = eager_and_fused(Broadcast())
    assert report.pooled == ["pool"] and calls == 0, "matched, but the add broadcasts: eager's add runs"
    assert torch.equal(got, want)


def test_compiles_fullgraph(xception):
    fused, _ = xception_fast.fuse(copy.deepcopy(xception), backend="cpu")
    x = torch.randn(1, 3, 71, 75).contiguous(memory_format=torch.channels_last)
    compiled = torch.compile(fused, fullgraph=True, backend="aot_eager")
    with torch.no_grad():
        compiled(x)
        got, calls = op_calls(lambda: compiled(x))
        reference = copy.deepcopy(xception).double()(x.double())
        assert_exact(got, xception(x), reference, "compiled")
    assert calls == 4
