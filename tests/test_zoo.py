"""fuse() on the depthwise-separable models people run: every unit fused, logits exact.

Each family at its own widths (they are what the matcher must recognise) with random weights and
random BatchNorm statistics, on small odd non-square inputs, against eager in the same dtype and
memory format with a float64 reference (the 2x rule, tests/exactness.py). The CPU kernel runs the
units (backend="cpu").
"""
import copy

import pytest
import torch

import xception_fast
from exactness import assert_exact, randomize_model_

timm = pytest.importorskip("timm")
torchvision = pytest.importorskip("torchvision")


def _timm(name, **kwargs):
    return lambda: timm.create_model(name, pretrained=False, num_classes=10, **kwargs)


# name -> (constructor, input H x W, depthwise convs = units fused, of them with the residual add,
# convs with a folded BatchNorm)
FAMILIES = {
    "legacy_xception": (_timm("legacy_xception"), (79, 61), 34, 8, 6),
    "xception41": (_timm("xception41"), (71, 45), 39, 12, 6),
    "xception41_os16": (_timm("xception41", output_stride=16), (71, 45), 39, 12, 6),
    "xception65": (_timm("xception65"), (71, 45), 63, 20, 6),
    "mobilenetv1_100": (_timm("mobilenetv1_100"), (67, 45), 13, 0, 1),
    "mobilenetv2_100": (_timm("mobilenetv2_100"), (67, 45), 17, 10, 18),
    "efficientnet_lite0": (_timm("efficientnet_lite0"), (67, 45), 16, 9, 17),
    "mnasnet_100": (_timm("mnasnet_100"), (67, 45), 17, 10, 18),
    "tv_mobilenet_v2": (lambda: torchvision.models.mobilenet_v2(num_classes=10), (67, 45), 17, 10, 18),
}

_built = {}


def built(name):
    """(eager model, fused copy, report, input, float64 logits), made once per family."""
    if name not in _built:
        make, size, *_ = FAMILIES[name]
        eager = randomize_model_(make(), seed=len(_built) + 1).eval()
        fused, report = xception_fast.fuse(copy.deepcopy(eager), backend="cpu")
        # Eight inputs: the rule compares the largest logit error of each side, and over a handful
        # of logits that maximum is one draw of a wide distribution (deep networks amplify some
        # rounding differences far more than others, for eager and fused alike).
        x = torch.randn(8, 3, *size, generator=torch.Generator().manual_seed(7))
        with torch.no_grad():
            reference = copy.deepcopy(eager).double()(x.double())
        _built.clear()  # one family at a time: the largest hold a few hundred MB in float64
        _built[name] = (eager, fused, report, x, reference)
    return _built[name]


@pytest.mark.parametrize("name", FAMILIES)
def test_every_unit_is_fused(name):
    _, fused, report, _, _ = built(name)
    _, _, units, residuals, folds = FAMILIES[name]
    depthwise = [n for n, m in fused.named_modules()
                 if isinstance(m, torch.nn.Conv2d) and m.groups > 1 and m.groups == m.in_channels]
    assert len(depthwise) == units
    assert report.refused == [], str(report)
    assert report.count == units and sorted(report.names) == sorted(depthwise)
    assert len(report.with_residual) == residuals, str(report)
    assert len(report.folded) == folds, str(report)
    assert all(isinstance(fused.get_submodule(n), xception_fast.FusedSeparableConv2d) for n in report.names)


@pytest.mark.parametrize("memory_format", ["nchw", "channels_last"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("name", FAMILIES)
def test_logits_are_exact(name, dtype, memory_format):
    eager, fused, _, x, reference = built(name)
    fmt = torch.channels_last if memory_format == "channels_last" else torch.contiguous_format
    x = x.to(dtype).contiguous(memory_format=fmt)
    # The fused model converted like the eager one: the fold and the packed weights are redone for
    # the new dtype and layout.
    fused, eager = (copy.deepcopy(m).to(dtype=dtype, memory_format=fmt) for m in (fused, eager))
    with torch.no_grad():
        got, want = fused(x), eager(x)
    assert got.dtype == want.dtype == dtype
    assert_exact(got, want, reference, f"{name} {dtype} {memory_format}")


@pytest.mark.parametrize("name", ["xception41", "mobilenetv2_100"])
def test_autocast_bf16_logits_are_exact(name):
    eager, fused, _, x, reference = built(name)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        got, want = fused(x), eager(x)
    assert got.dtype == want.dtype
    assert_exact(got.float(), want.float(), reference, f"{name} autocast bf16")
