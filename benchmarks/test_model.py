"""Whole models: Xception and the depthwise-separable zoo (harness.MODELS), one inference and one
training step, eager, torch.compile, the fused model and torch.compile of the fused model side
by side."""
import pytest
import torch

from .harness import (DEVICE, MODEL_PRECISIONS, MODELS, build_model, cases, measure, paired_baselines,
                      precision_context, require)
from .peaks import math_mode, model_layers

CASES = cases("infer") + cases("train")


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_model(benchmark, results, case):
    require(case.contender)
    benchmark.group = case.group
    baselines = paired_baselines(case)
    with precision_context(case.dtype, inference=case.kind == "infer"):
        fn, extra = build_model(case)
        median, baseline_medians, fork_join = measure(benchmark, fn, [build_model(b, fresh=False)[0] for b in baselines],
                                           model=True)
    # Under autocast the convs and the classifier run in the autocast dtype.
    dtype = MODEL_PRECISIONS[case.dtype] or torch.float32
    layers = model_layers(case.model, case.batch, dtype.itemsize, training=case.kind == "train")
    results.add(benchmark, case, median, layers, math_mode(DEVICE, dtype), extra,
                paired=zip(baselines, baseline_medians), fork_join=fork_join)
