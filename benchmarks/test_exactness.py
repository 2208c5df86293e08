"""What fuse() does to each model of the zoo: how many of its depthwise convs it fuses, and the
logits' error in the exactness rule's terms (fused max abs error over eager's in the same dtype,
both against a float64 run; the rule allows 2), for the README's models table.

Random weights and random BatchNorm statistics, batch 2, the model's own input size, eval mode:
fp32, bf16 (the model converted) and bf16 autocast over fp32 weights. Under --benchmark-only every
test must time something: this one times the fused forward once (rounds=1); the speed comparison is
test_model's.
"""
import copy
import os
import sys

import pytest
import torch

import xception_fast

from .harness import DEVICE, MODELS, PROFILE, fused_backend, selected_models

# The tests' exactness rule and random weights, the one definition of both.
sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tests"))
from exactness import max_abs_error, randomize_model_  # noqa: E402

BATCH = 2
FUSED = {"cpu": "fused_cpu", "cuda": "fused_cuda"}[DEVICE.type]
CASES = selected_models() if PROFILE == "full" else []


@pytest.mark.parametrize("name", CASES)
def test_fused_model_exactness(benchmark, results, name):
    spec = MODELS[name]
    torch.manual_seed(0)
    eager = randomize_model_(spec.build(), seed=1).eval()
    x = torch.randn(BATCH, 3, spec.size, spec.size, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        reference = copy.deepcopy(eager).double()(x.double())
    fused, report = xception_fast.fuse(copy.deepcopy(eager), backend=fused_backend(FUSED))
    eager, fused = eager.to(DEVICE), fused.to(DEVICE)
    xd = x.to(DEVICE)
    record = {"model": name, "contender": FUSED, "units": len(report.units), "fused_units": report.count,
              "with_residual": len(report.with_residual), "folded_convs": len(report.folded),
              "pooled": len(report.pooled)}
    with torch.no_grad():
        fused_fp32 = benchmark.pedantic(fused, (xd,), rounds=1, iterations=1, warmup_rounds=0)
        record["fp32"] = max_abs_error(fused_fp32, reference) / max_abs_error(eager(xd), reference)
        with torch.autocast(DEVICE.type, dtype=torch.bfloat16):
            record["amp-bf16"] = max_abs_error(fused(xd), reference) / max_abs_error(eager(xd), reference)
        fused_bf16, eager_bf16 = copy.deepcopy(fused).bfloat16(), copy.deepcopy(eager).bfloat16()
        xh = xd.bfloat16()
        record["bf16"] = max_abs_error(fused_bf16(xh), reference) / max_abs_error(eager_bf16(xh), reference)
    results.add_exactness(benchmark, record)
