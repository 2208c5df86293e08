"""Per layer: each separable-unit shape (Xception's, MobileNetV2's and EfficientNet-lite0's), eager
(channels_last, and NCHW on a GPU), torch.compile and the fused op side by side."""
import pytest

from .harness import DEVICE, DTYPES, build_unit, cases, measure, paired_baselines, precision_context, require
from .peaks import math_mode, unit_cost

CASES = cases("unit")


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_unit(benchmark, results, case):
    require(case.contender)
    benchmark.group = case.group
    baselines = paired_baselines(case)
    with precision_context(case.dtype, inference=True):
        fn = build_unit(case)
        median, baseline_medians, fork_join = measure(benchmark, fn, [build_unit(b, fresh=False) for b in baselines])
    s = case.shape
    dtype = DTYPES[case.dtype]
    layers = [unit_cost(case.batch * s.out_size ** 2, s.channels, s.out_channels, dtype.itemsize, s.residual,
                        k=s.k, input_pixels=case.batch * s.size ** 2)]
    results.add(benchmark, case, median, layers, math_mode(DEVICE, dtype), paired=zip(baselines, baseline_medians),
                fork_join=fork_join)
