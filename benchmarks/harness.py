"""What is benchmarked (per device and profile), how each contender is built, and how it is timed.

Environment:
    XCEPTION_FAST_BENCH_DEVICE   "cuda" or "cpu" (default: cuda when available)
    XCEPTION_FAST_BENCH_PROFILE  "full" (default: the main job) or "quick" (the GPU check's subset;
                                 on a CPU a dry-run-sized subset)
    XCEPTION_FAST_BENCH_MODELS   "default" (Xception, MobileNetV2, EfficientNet-lite0, xception41),
                                 "all" (every model of MODELS) or a comma-separated list of names
    XCEPTION_FAST_BENCH_DIR      where the summary goes (default: benchmarks/results)
    XCEPTION_FAST_BENCH_HOST_ALLOCATOR
                                 on a CPU, "kept" (default: glibc keeps what the process frees, the
                                 steady state; keep_freed_host_memory) or "default" (as a fresh
                                 process has it; the results go to a file of their own)
"""
import contextlib
import ctypes
import ctypes.util
import dataclasses
import itertools
import math
import os
import statistics
import time
import types
from dataclasses import dataclass

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import xception_fast
from xception_fast.fusion import FusedSeparableConv2d
from xception_fast.model import Xception

DEVICE = torch.device(os.environ.get("XCEPTION_FAST_BENCH_DEVICE")
                      or ("cuda" if torch.cuda.is_available() else "cpu"))
PROFILE = os.environ.get("XCEPTION_FAST_BENCH_PROFILE", "full")
if PROFILE not in ("full", "quick"):
    raise ValueError(f"XCEPTION_FAST_BENCH_PROFILE must be 'full' or 'quick', got {PROFILE!r}")
OUT_DIR = os.environ.get("XCEPTION_FAST_BENCH_DIR") or os.path.join(os.path.dirname(__file__), "results")
HOST_ALLOCATOR = os.environ.get("XCEPTION_FAST_BENCH_HOST_ALLOCATOR", "kept")
if HOST_ALLOCATOR not in ("kept", "default"):
    raise ValueError(f"XCEPTION_FAST_BENCH_HOST_ALLOCATOR must be 'kept' or 'default', got {HOST_ALLOCATOR!r}")


# ----------------------------------------------------------------------------------------------
# The units and models

@dataclass(frozen=True)
class UnitShape:
    """One separable unit: Xception's ReLU -> DW 3x3 -> PW -> BN, or the inverted-residual unit of
    MobileNetV2 / EfficientNet-lite, DW k x k (stride s) -> BN -> ReLU6 -> PW -> BN [+ input]."""
    family: str
    channels: int
    out_channels: int
    size: int  # the input's H = W
    k: int = 3
    stride: int = 1
    residual: bool = False

    @property
    def mid_bn(self):
        return self.family != "Xception"

    @property
    def out_size(self):
        return (self.size + 2 * (self.k // 2) - self.k) // self.stride + 1

    @property
    def label(self):
        geometry = f" k{self.k}" + (f" s{self.stride}" if self.stride > 1 else "")
        return (f"{self.family} {self.channels}→{self.out_channels} @{self.size}²"
                + ("" if self.family == "Xception" else geometry) + (" +res" if self.residual else ""))

    @property
    def slug(self):
        return (f"{self.family.lower()}-{self.channels}to{self.out_channels}x{self.size}k{self.k}s{self.stride}"
                + ("+res" if self.residual else ""))


# Xception's ten separable-unit shapes at 299 x 299 and the middle flow's unit with its residual
# add; the stride-2 and 5x5 units of MobileNetV2 and EfficientNet-lite0 at 224 x 224 (their
# depthwise convs run on the expanded channels).
UNIT_SHAPES = [
    UnitShape("Xception", c, co, s, residual=r) for c, co, s, r in (
        (64, 128, 147, False), (128, 128, 147, False), (128, 256, 74, False), (256, 256, 74, False),
        (256, 728, 37, False), (728, 728, 37, False), (728, 728, 19, False), (728, 728, 19, True),
        (728, 1024, 19, False), (1024, 1536, 10, False), (1536, 2048, 10, False))
] + [
    UnitShape("MobileNetV2", 96, 24, 112, stride=2), UnitShape("MobileNetV2", 144, 24, 56, residual=True),
    UnitShape("MobileNetV2", 144, 32, 56, stride=2), UnitShape("MobileNetV2", 384, 64, 14, residual=True),
    UnitShape("MobileNetV2", 576, 160, 14, stride=2), UnitShape("MobileNetV2", 960, 320, 7),
    UnitShape("EfficientNet-lite0", 144, 40, 56, k=5, stride=2),
    UnitShape("EfficientNet-lite0", 240, 40, 28, k=5, residual=True),
    UnitShape("EfficientNet-lite0", 480, 112, 14, k=5), UnitShape("EfficientNet-lite0", 672, 192, 14, k=5, stride=2),
    UnitShape("EfficientNet-lite0", 1152, 192, 7, k=5, residual=True),
]
UNIT_BY_LABEL = {s.label: s for s in UNIT_SHAPES}


def _timm(name, **kwargs):
    def build():
        import timm

        return timm.create_model(name, pretrained=False, **kwargs)
    return build


def _torchvision(name):
    def build():
        import torchvision

        return getattr(torchvision.models, name)(weights=None)
    return build


@dataclass(frozen=True)
class ModelSpec:
    name: str
    build: object
    size: int
    units: int  # the separable units fuse() must find (a benchmark of a model it fuses less of is a bug)


MODELS = {spec.name: spec for spec in (
    ModelSpec("Xception", Xception, 299, 34),
    ModelSpec("legacy_xception", _timm("legacy_xception"), 299, 34),
    ModelSpec("xception41", _timm("xception41"), 299, 39),
    ModelSpec("xception41-os16", _timm("xception41", output_stride=16), 299, 39),
    ModelSpec("xception65", _timm("xception65"), 299, 63),
    ModelSpec("mobilenetv1_100", _timm("mobilenetv1_100"), 224, 13),
    ModelSpec("mobilenetv2_100", _timm("mobilenetv2_100"), 224, 17),
    ModelSpec("efficientnet_lite0", _timm("efficientnet_lite0"), 224, 16),
    ModelSpec("mnasnet_100", _timm("mnasnet_100"), 224, 17),
    ModelSpec("tv_mobilenet_v2", _torchvision("mobilenet_v2"), 224, 17),
)}
DEFAULT_MODELS = ("Xception", "mobilenetv2_100", "efficientnet_lite0", "xception41")


def selected_models():
    chosen = os.environ.get("XCEPTION_FAST_BENCH_MODELS", "default")
    if chosen == "default":
        return list(DEFAULT_MODELS)
    if chosen == "all":
        return list(MODELS)
    names = [n.strip() for n in chosen.split(",") if n.strip()]
    unknown = [n for n in names if n not in MODELS]
    if unknown:
        raise ValueError(f"XCEPTION_FAST_BENCH_MODELS: unknown models {unknown}; known: {sorted(MODELS)}")
    return names


DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
# Model precisions: plain fp32, or bf16 autocast over fp32 weights.
MODEL_PRECISIONS = {"fp32": None, "amp-bf16": torch.bfloat16}

# Every contender, in the order the summary lists them. fused_*_compiled: torch.compile (default
# mode) of the fused model, against compile of the eager one. fused_cpu_recompute: a training step
# with fuse(recompute_depthwise=True), whose backward recomputes the depthwise results that
# fused_cpu keeps. product_only: not a way to run the unit but the ceiling of any fusion of it:
# the unit's pointwise product alone, eager's own 1x1 convolution (BatchNorm folded into its
# weights and bias) over a depthwise result computed beforehand, once; for a model, the fused
# model with each unit replaced by that product. A fused unit still has its depthwise conv to do:
# unless its own product runs faster than eager's convolution, its speedup over eager stays under
# the product's, which is how the benchmark shows the targets no fusion on this CPU can reach.
CONTENDERS = ("eager_nchw", "eager_cl", "compile", "compile_max_autotune", "product_only", "fused_cpu",
              "fused_cpu_recompute", "fused_cuda", "fused_triton", "fused_cpu_compiled", "fused_cuda_compiled")
COMPILERS = ("compile", "compile_max_autotune")
_GPU_EAGER = ("eager_nchw", "eager_cl")
_GPU_FUSED = ("fused_cuda", "fused_triton")
_CPU_UNIT = ("eager_cl", "product_only", "fused_cpu")
_CPU_MODEL = ("eager_cl", "compile", "fused_cpu")

# Per device and profile: kind -> [(dtype or precision, batch, contenders, targets)] (targets: the
# unit shapes (None: all of UNIT_SHAPES), or the model names ("selected": selected_models())). On a
# CPU the per-layer matrix is the CPU issue's: every unit at batch 1, 8 and 32 in fp32 and bf16
# against eager channels_last and the product alone, and torch.compile at batch 8 fp32; the models
# at batch 8 and 1 (fp32, bf16 autocast), with the products alone at batch 8; a training step of
# Xception at batch 4.
MATRIX = {
    ("cpu", "full"): {
        "unit": [("fp32", 8, ("eager_cl", "compile", "product_only", "fused_cpu"), None),
                 ("bf16", 8, _CPU_UNIT, None), ("fp32", 1, _CPU_UNIT, None), ("bf16", 1, _CPU_UNIT, None),
                 ("fp32", 32, _CPU_UNIT, None), ("bf16", 32, _CPU_UNIT, None)],
        "infer": [("fp32", 8, ("eager_cl", "compile", "product_only", "fused_cpu", "fused_cpu_compiled"), "selected"),
                  ("amp-bf16", 8, ("eager_cl", "compile", "product_only", "fused_cpu"), "selected"),
                  ("fp32", 1, _CPU_MODEL, "selected"), ("amp-bf16", 1, _CPU_MODEL, "selected")],
        "train": [("fp32", 4, ("eager_cl", "fused_cpu", "fused_cpu_recompute"), ("Xception",))],
    },
    ("cpu", "quick"): {
        "unit": [("fp32", 1, _CPU_UNIT, None)],
        "infer": [("fp32", 1, ("eager_cl", "fused_cpu"), ("Xception", "mobilenetv2_100"))],
        "train": [],
    },
    ("cuda", "full"): {
        "unit": [(dtype, batch, _GPU_EAGER + _GPU_FUSED + (COMPILERS if (dtype, batch) == ("bf16", 128) else ()), None)
                 for dtype in ("bf16", "fp16", "fp32") for batch in (128, 32, 1)],
        "infer": [("amp-bf16", 128, _GPU_EAGER + COMPILERS + _GPU_FUSED + ("fused_cuda_compiled",), "selected"),
                  ("amp-bf16", 1, _GPU_EAGER + COMPILERS + _GPU_FUSED, "selected"),
                  ("fp32", 128, _GPU_EAGER + COMPILERS + _GPU_FUSED, ("Xception",))],
        "train": [("amp-bf16", 128, _GPU_EAGER + ("compile",) + _GPU_FUSED, ("Xception",))],
    },
    # The GPU check: one call of at most ten minutes, build and tests included. Xception's units
    # and four of the zoo's (Triton autotunes each new shape; the Xception model's units then hit
    # its cache); the model at batch 128 and 1; max-autotune's compilation comes last: if it
    # overruns the check's time limit, the rest is already measured and written.
    ("cuda", "quick"): {
        "unit": [("bf16", 128, ("eager_cl", "fused_cuda", "fused_triton"),
                  [s for s in UNIT_SHAPES if s.family == "Xception"] + [
                      UnitShape("MobileNetV2", 96, 24, 112, stride=2), UnitShape("MobileNetV2", 960, 320, 7),
                      UnitShape("EfficientNet-lite0", 240, 40, 28, k=5, residual=True),
                      UnitShape("EfficientNet-lite0", 672, 192, 14, k=5, stride=2)])],
        "infer": [("amp-bf16", 128, ("eager_cl", "fused_cuda", "fused_triton"), ("Xception",)),
                  ("amp-bf16", 128, ("eager_cl", "fused_cuda"), ("mobilenetv2_100",)),
                  ("amp-bf16", 1, ("eager_cl", "fused_cuda", "fused_triton"), ("Xception",)),
                  ("amp-bf16", 128, ("compile_max_autotune",), ("Xception",))],
        "train": [],
    },
}


# The CPU issue's targets (#11), which the summary checks one by one (report.Results._targets):
# on a CPU, 2 threads, channels_last, eval, the fused op over eager channels_last (or
# torch.compile) timed in alternation. A target missed is not lowered: the summary works out
# whether the product alone leaves the fused op room to meet it.
@dataclass(frozen=True)
class Target:
    kind: str          # as Case.kind
    dtypes: tuple      # Case.dtype values
    batches: tuple
    over: str          # the baseline: "eager_cl" or "compile"
    at_least: float    # the speedup over it
    sizes: tuple = None  # units: the input sizes (UnitShape.size) it covers; None: every unit
    model: str = None    # models: the one it covers

    @property
    def label(self):
        over = "eager channels_last" if self.over == "eager_cl" else "torch.compile"
        what = (f"the {' and '.join(f'{s}²' for s in self.sizes)} units" if self.kind == "unit" and self.sizes
                else "every unit" if self.kind == "unit"
                else f"{self.model}, {'training step' if self.kind == 'train' else 'inference'}")
        return (f"{what}, {' and '.join(self.dtypes)}, batch {', '.join(map(str, self.batches))}: "
                f"≥ {self.at_least:g}× {over}")

    def covers(self, row):
        if row["kind"] != self.kind or row["dtype"] not in self.dtypes or row["batch"] not in self.batches:
            return False
        if self.kind == "unit":
            shape = UNIT_BY_LABEL.get(row["shape"])
            return self.sizes is None or (shape is not None and shape.size in self.sizes)
        return row["shape"] == f"{self.model} {MODELS[self.model].size}²"


TARGETS = {
    "cpu": (
        Target("unit", ("fp32", "bf16"), (1, 8, 32), "eager_cl", 1.0),
        Target("unit", ("fp32", "bf16"), (1, 8, 32), "eager_cl", 1.3, sizes=(147, 74)),
        Target("infer", ("fp32",), (8,), "eager_cl", 1.15, model="Xception"),
        Target("infer", ("fp32",), (8,), "compile", 1.0, model="Xception"),
        Target("infer", ("amp-bf16",), (8,), "eager_cl", 1.3, model="Xception"),
        Target("infer", ("fp32",), (1,), "eager_cl", 1.1, model="Xception"),
        Target("train", ("fp32",), (4,), "eager_cl", 1.0, model="Xception"),
    ),
    "cuda": (),
}


@dataclass(frozen=True)
class Case:
    kind: str        # "unit", "infer" (one forward, eval mode) or "train" (one training step)
    dtype: str       # a DTYPES key for units, a MODEL_PRECISIONS key for models
    batch: int
    contender: str
    shape: UnitShape = None  # units
    model: str = None        # models

    @property
    def label(self):
        if self.kind != "unit":
            return f"{self.model} {MODELS[self.model].size}²"
        return self.shape.label

    @property
    def group(self):
        """The contenders that race each other."""
        return f"{self.kind} {self.label} {self.dtype} b{self.batch}"

    @property
    def panel(self):
        """The summary's section (one table, one chart panel)."""
        if self.kind == "unit":
            return f"Per layer, {self.dtype}, batch {self.batch}"
        what = "inference" if self.kind == "infer" else "training step"
        return f"Whole model, {what}, {self.dtype}, batch {self.batch}"

    @property
    def row(self):
        return self.label

    @property
    def id(self):
        what = self.shape.slug if self.kind == "unit" else f"{self.kind}-{self.model}"
        return f"{what}-{self.dtype}-b{self.batch}-{self.contender}"


def cases(kind):
    """The cases of ``kind`` for this device and profile, contenders of one case adjacent."""
    out = []
    for dtype, batch, contenders, chosen in MATRIX[(DEVICE.type, PROFILE)][kind]:
        if kind == "unit":
            targets = [dict(shape=s) for s in (UNIT_SHAPES if chosen is None else chosen)]
        else:
            names = selected_models() if chosen == "selected" else list(chosen)
            targets = [dict(model=m) for m in names]
        out += [Case(kind, dtype, batch, contender, **target) for target in targets for contender in contenders]
    return out


def fused_backend(contender):
    """The xception_fast backend of a fused contender."""
    return contender[len("fused_"):].removesuffix("_compiled").removesuffix("_recompute")


# ----------------------------------------------------------------------------------------------
# Building the contenders

def _random_bn_(bn):
    with torch.no_grad():
        bn.weight.uniform_(0.5, 1.5)
        bn.bias.normal_(0.0, 0.1)
        bn.running_mean.normal_(0.0, 0.1)
        bn.running_var.uniform_(0.5, 1.5)
    return bn


class EagerUnit(nn.Module):
    """What a fused unit replaces, eval mode, random weights and running statistics: Xception's
    ReLU -> DW -> PW -> BN, or DW -> BN -> ReLU6 -> PW -> BN; then + residual."""

    def __init__(self, shape):
        super().__init__()
        c = shape.channels
        self.shape = shape
        self.act_in = nn.Identity() if shape.mid_bn else nn.ReLU()
        self.dw = nn.Conv2d(c, c, shape.k, stride=shape.stride, padding=shape.k // 2, groups=c, bias=False)
        self.mid = nn.Sequential(_random_bn_(nn.BatchNorm2d(c)), nn.ReLU6()) if shape.mid_bn else nn.Identity()
        self.pw = nn.Conv2d(c, shape.out_channels, 1, bias=False)
        self.bn = _random_bn_(nn.BatchNorm2d(shape.out_channels))
        self.eval()

    def forward(self, x, residual=None):
        y = self.bn(self.pw(self.mid(self.dw(self.act_in(x)))))
        return y if residual is None else y + residual

    def fused_call(self, backend, dtype, output_size):
        """The unit as one call of the fused op: BatchNorms folded in fp32 and the weights packed
        for the backend once, here (never per call)."""
        dw_weight, dw_bias = self.dw.weight, None
        if self.shape.mid_bn:
            bn = self.mid[0]
            dw_weight, dw_bias = xception_fast.fold_bn(dw_weight, bn.weight, bn.bias, bn.running_mean,
                                                       bn.running_var, bn.eps)
        bn = self.bn
        pw_weight, pw_bias = xception_fast.fold_bn(self.pw.weight, bn.weight, bn.bias, bn.running_mean,
                                                   bn.running_var, bn.eps)
        packed = xception_fast.pack_weights(backend, dtype, dw_weight, dw_bias, pw_weight, pw_bias, output_size)
        options = dict(stride=self.shape.stride, padding=self.shape.k // 2,
                       act_in="identity" if self.shape.mid_bn else "relu",
                       act_mid="relu6" if self.shape.mid_bn else "identity")

        def call(x, residual):
            return xception_fast.sepconv(x, dw_weight, pw_weight, pw_bias, dw_bias=dw_bias, residual=residual,
                                         packed=packed, backend=backend, **options)
        return call

    def product_alone(self, x, dtype):
        """The unit's pointwise product by itself (CONTENDERS, product_only): the depthwise result
        of ``x`` computed here, once, then each call eager's 1x1 convolution over it, in ``dtype``,
        with the BatchNorm after it folded into its weights and bias."""
        bn = self.bn
        weight, bias = xception_fast.fold_bn(self.pw.weight, bn.weight, bn.bias, bn.running_mean, bn.running_var,
                                             bn.eps)
        weight, bias = weight.to(dtype), bias.to(dtype)
        with torch.no_grad():
            depthwise = self.to(dtype).mid(self.dw(self.act_in(x))).contiguous(memory_format=torch.channels_last)
        return lambda x, residual: F.conv2d(depthwise, weight, bias)


def _memory_format(contender):
    return torch.contiguous_format if contender == "eager_nchw" else torch.channels_last


def _compile(module, contender, *example, fresh=True):
    """torch.compile of ``module``, compiled here by a first call (so compilation and autotuning
    are never timed). max-autotune runs with Inductor's freezing, which folds BatchNorm into the
    convs; freezing applies to inference only. ``fresh``: first reset Dynamo's caches (one test's
    first compilation; a reset would drop what the same test compiled before)."""
    if fresh:
        torch._dynamo.reset()  # a fresh cache per test: no reuse across modes, no recompile limit
    if contender != "compile_max_autotune":
        compiled = torch.compile(module, dynamic=False)
        compiled(*example)
        return compiled
    compiled = torch.compile(module, mode="max-autotune", dynamic=False)
    with torch._inductor.config.patch(freezing=True):
        compiled(*example)
    return compiled


def _rotated(tensors):
    """Copies of the inputs to cycle through, so that on a GPU each call reads its inputs from
    device memory rather than from an L2 that the previous call warmed: enough copies to span
    twice the L2. On a CPU one set."""
    if DEVICE.type != "cuda":
        return [tensors]
    nbytes = sum(t.numel() * t.element_size() for t in tensors if t is not None)
    l2 = torch.cuda.get_device_properties(DEVICE).L2_cache_size
    copies = max(2, math.ceil(2 * l2 / max(nbytes, 1)))
    return [tensors] + [tuple(None if t is None else t.clone() for t in tensors) for _ in range(copies - 1)]


def _timed_call(call, inputs):
    """The function to time: one call on the next set of inputs, synchronised on a GPU."""
    cycle = itertools.cycle(inputs)
    if DEVICE.type != "cuda":
        return lambda: call(*next(cycle))

    def fn():
        out = call(*next(cycle))
        torch.cuda.synchronize(DEVICE)
        return out

    return fn


def build_unit(case, fresh=True):
    """The no-argument function that runs ``case.contender`` on one separable-unit shape; to be
    called, as it is timed, under the case's precision_context. ``fresh``: as _compile's (False for
    the baselines a test builds after its contender)."""
    shape = case.shape
    dtype = DTYPES[case.dtype]
    torch.manual_seed(0)
    unit = EagerUnit(shape).to(DEVICE)
    fmt = _memory_format(case.contender)
    x = torch.randn(case.batch, shape.channels, shape.size, shape.size, device=DEVICE, dtype=dtype)
    x = x.contiguous(memory_format=fmt)
    out_shape = (case.batch, shape.out_channels, shape.out_size, shape.out_size)
    r = torch.randn(out_shape, device=DEVICE, dtype=dtype).contiguous(memory_format=fmt) if shape.residual else None
    if case.contender.startswith("fused_"):
        # Weights stay fp32 (the folded BatchNorms' precision); the kernels round them to the
        # product's dtype in the packing.
        call = unit.fused_call(fused_backend(case.contender), dtype, out_shape)
    elif case.contender == "product_only":
        call = unit.product_alone(x, dtype)
    else:
        call = unit.to(dtype).to(memory_format=fmt)
        if case.contender in COMPILERS:
            call = _compile(call, case.contender, x, r, fresh=fresh)
    return _timed_call(call, _rotated((x, r)))


def build_model(case, fresh=True):
    """The no-argument function that runs ``case.contender`` on a whole model: one inference
    (``case.kind == "infer"``, eval mode) or one training step (SGD, cross-entropy on random
    labels, train mode); to be called, as it is timed, under the case's precision_context.
    ``fresh``: as build_unit's. Returns (fn, extra info)."""
    spec = MODELS[case.model]
    training = case.kind == "train"
    fmt = _memory_format(case.contender)
    torch.manual_seed(0)
    model = spec.build().to(DEVICE).train(training).to(memory_format=fmt)
    x = torch.randn(case.batch, 3, spec.size, spec.size, device=DEVICE).contiguous(memory_format=fmt)
    extra = {}
    if case.contender.startswith("fused_"):
        model, report = xception_fast.fuse(model, backend=fused_backend(case.contender),
                                           recompute_depthwise=case.contender.endswith("_recompute"))
        if report.count != spec.units:
            raise AssertionError(f"fuse() fused {report.count} separable units of {spec.name}, which has "
                                 f"{spec.units}:\n{report}")
        extra["fused_units"] = report.count
        if case.contender.endswith("_compiled"):
            model = _compile(model, "compile", x, fresh=fresh)
    elif case.contender == "product_only":
        model, _ = xception_fast.fuse(model)
        _products_only(model)
    elif case.contender in COMPILERS:
        model = _compile(model, case.contender, x, fresh=fresh)
    if not training:
        return _timed_call(model, [(x,)]), extra

    labels = torch.randint(0, 1000, (case.batch,), device=DEVICE)
    step = training_step(model, MODEL_PRECISIONS.get(case.dtype))
    return _timed_call(step, [(x, labels)]), extra


def _products_only(fused_model):
    """Turn each separable unit of a model fuse() made into its pointwise product alone
    (CONTENDERS, product_only): eager's 1x1 convolution, the BatchNorm after it folded, over a
    random tensor of the depthwise result's shape and the compute dtype, made on the unit's first
    call. No depthwise conv, activation or residual add: the rest of the model runs as fused."""
    def product_op(unit, x, dw_bn, pw, pw_bn, act_in, act_mid, act_out, residual, dtype):
        key = (tuple(x.shape), dtype)
        if key not in unit.product_inputs:
            weight, bias = pw.weight, pw.bias
            if pw_bn is not None:
                weight, bias = xception_fast.fold_bn(weight, pw_bn.weight, pw_bn.bias, pw_bn.running_mean,
                                                     pw_bn.running_var, pw_bn.eps, conv_bias=bias)
            shape = unit._output_shape(x, pw)
            shape[1] = unit.out_channels
            depthwise = torch.randn(shape, device=x.device, dtype=dtype).contiguous(memory_format=torch.channels_last)
            unit.product_inputs[key] = (depthwise, weight.detach().to(dtype),
                                        None if bias is None else bias.detach().to(dtype))
        return F.conv2d(*unit.product_inputs[key])

    for module in fused_model.modules():
        if isinstance(module, FusedSeparableConv2d):
            module.product_inputs = {}
            module._op = types.MethodType(product_op, module)


def training_step(model, amp_dtype=None):
    """One training step of ``model`` as a function of (inputs, targets): gradients cleared,
    forward and cross-entropy (under autocast to ``amp_dtype`` if given), backward, SGD with
    momentum."""
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)

    def step(inputs, targets):
        optimizer.zero_grad(set_to_none=True)
        # Autocast opened per step, around forward and loss only: an autocast region kept open
        # across steps would reuse its cached low-precision copies of weights the optimizer changed.
        with torch.autocast(DEVICE.type, dtype=amp_dtype, enabled=amp_dtype is not None):
            loss = F.cross_entropy(model(inputs), targets)
        loss.backward()
        optimizer.step()
        return loss

    return step


@contextlib.contextmanager
def precision_context(precision, inference):
    """Grad mode and autocast for a case: per-layer dtypes are plain casts, model precisions
    may autocast. Inference only: a training step opens its own autocast region."""
    with contextlib.ExitStack() as stack:
        if inference:
            stack.enter_context(torch.no_grad())
            amp_dtype = MODEL_PRECISIONS.get(precision)
            if amp_dtype is not None:
                stack.enter_context(torch.autocast(DEVICE.type, dtype=amp_dtype))
        yield


# ----------------------------------------------------------------------------------------------
# Timing

def keep_freed_host_memory():
    """Make glibc keep the memory this process frees, as a caching allocator (jemalloc, tcmalloc,
    which PyTorch's CPU performance guide recommends) does: no fresh mapping per large tensor, no
    freed memory handed back to the kernel. Otherwise every large tensor is mapped anew and its
    first write takes a page fault per 4 KB, whose cost depends on what the process ran before.
    With it, every contender runs in the same steady state, the one a long-running process
    reaches. Returns what was set, for the summary."""
    try:
        mallopt = ctypes.CDLL(ctypes.util.find_library("c")).mallopt
    except (OSError, AttributeError, TypeError):
        return "the platform's own (no glibc mallopt)"
    m_trim_threshold, m_mmap_max = -1, -4
    if mallopt(m_mmap_max, 0) and mallopt(m_trim_threshold, 2 ** 31 - 1):
        return "glibc, keeping freed memory (mallopt M_MMAP_MAX=0, M_TRIM_THRESHOLD=2 GiB)"
    return "the platform's own (mallopt refused)"


def warm_up_session():
    """Run the device at the load the benchmarks put on it before the first benchmark, so that
    the first test of the process is not the one that pays for the clock ramping up, the thread
    pool and oneDNN's first primitives and the allocator's first large blocks: an eager Xception
    forward at batch 8, repeated for a few seconds. Returns the seconds spent."""
    start = time.perf_counter()
    torch.manual_seed(0)
    model = Xception().to(DEVICE).eval().to(memory_format=torch.channels_last)
    x = torch.randn(8, 3, 299, 299, device=DEVICE).contiguous(memory_format=torch.channels_last)
    seconds = TIMING[DEVICE.type]["session_warmup_s"]
    with torch.no_grad():
        while time.perf_counter() - start < seconds:
            model(x)
            if DEVICE.type == "cuda":
                torch.cuda.synchronize(DEVICE)
    return time.perf_counter() - start


# Per device and kind: a time budget per benchmark, bounds on its rounds, and a warm-up long
# enough for the state a steady run reaches: on a GPU settled clocks; on a CPU the host
# allocator's layout for the case's sizes (the first calls of an eager batch-32 unit take several
# times as long as the following ones). Models get more rounds: their medians are the verdicts,
# and their rounds fill the whole budget, so that a small model at batch 1 (a few milliseconds a
# call) is timed over seconds, as long as a large one, rather than inside one burst of the shared
# machine's load from elsewhere.
TIMING = {
    "cpu": {"budget_s": 1.5, "min_rounds": 5, "max_rounds": 15, "warmup_calls": 3, "warmup_s": 0.5,
            "model_budget_s": 6.0, "model_min_rounds": 9, "model_max_rounds": 400, "session_warmup_s": 8.0},
    "cuda": {"budget_s": 0.5, "min_rounds": 10, "max_rounds": 1000, "warmup_calls": 3, "warmup_s": 0.2,
             "model_budget_s": 1.0, "model_min_rounds": 10, "model_max_rounds": 1000, "session_warmup_s": 3.0},
}

# On a CPU (a shared VM, whose load from elsewhere comes in bursts of seconds) each contender is
# timed round by round in alternation with eager channels_last and, for a fused contender whose
# case has torch.compile, with torch.compile too: its speedups over them are ratios of the medians
# of those same rounds, so a burst slows all of them.
PAIRED_BASELINES = {"cpu": ("eager_cl", "compile"), "cuda": ()}


def paired_baselines(case):
    """The cases of the contenders timed in alternation with ``case``'s, in the order each round
    runs them: eager channels_last for any other contender, and torch.compile for a fused one
    where the case's plan (MATRIX) has torch.compile."""
    planned = {c.contender for c in cases(case.kind) if c.group == case.group}
    out = []
    for baseline in PAIRED_BASELINES[DEVICE.type]:
        if baseline == case.contender or baseline not in planned:
            continue
        if baseline != "eager_cl" and not case.contender.startswith("fused_"):
            continue
        out.append(dataclasses.replace(case, contender=baseline))
    return out


# A two-thread ATen op on a CPU tensor just over ATen's grain size (32768 elements), so that it
# splits in two: nearly all of its time is the threads' start and join. On a shared VM it reads
# one of two values for tens of seconds at a time, and every multi-threaded case's time moves
# with it, eager's small ops most (README: "How steady the timings are"). Each round reads it, so
# that the summary can say in which state each median was taken.
FORK_JOIN_ELEMENTS = 40_000
_FORK_JOIN_TENSOR = torch.zeros(FORK_JOIN_ELEMENTS)


def fork_join_probe(calls=20):
    """Seconds per call of the fork-join probe (the median of ``calls``)."""
    times = []
    for _ in range(calls):
        start = time.perf_counter()
        _FORK_JOIN_TENSOR.add_(1.0)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def _warm_up(fn, timing):
    """Calls ``fn`` until the device's steady state (TIMING); returns the time of one call."""
    start = time.perf_counter()
    fn()
    per_call = time.perf_counter() - start
    calls, start = 0, time.perf_counter()
    while calls < timing["warmup_calls"] or time.perf_counter() - start < timing["warmup_s"]:
        fn()
        calls += 1
    return (time.perf_counter() - start) / calls if calls else per_call


def measure(benchmark, fn, baselines=(), model=False):
    """Time ``fn`` with pytest-benchmark after a warm-up that is never timed: one call (the first
    call pays compilation, autotuning, allocation), then more until the device's steady state
    (TIMING). With ``baselines`` (no-argument functions), each round first runs each of them in
    turn (timed here, outside pytest-benchmark's timer); on a CPU each round reads the fork-join
    probe first. The round count fills the budget from the warm-up's per-call times. Returns the
    median of ``fn``, the list of the baselines' medians and the probe's median, in seconds (None,
    [] and None when pytest-benchmark is disabled; the probe's None on a GPU)."""
    timing = TIMING[DEVICE.type]
    per_round = _warm_up(fn, timing) + sum(_warm_up(b, timing) for b in baselines)
    budget = timing["model_budget_s"] if model else timing["budget_s"]
    least = timing["model_min_rounds"] if model else timing["min_rounds"]
    most = timing["model_max_rounds"] if model else timing["max_rounds"]
    rounds = max(least, min(most, int(budget / per_round)))
    baseline_times = [[] for _ in baselines]
    probe_times = []

    def setup():
        if DEVICE.type == "cpu":
            probe_times.append(fork_join_probe())
        for baseline, times in zip(baselines, baseline_times):
            start = time.perf_counter()
            baseline()
            times.append(time.perf_counter() - start)

    benchmark.pedantic(fn, setup=setup, rounds=rounds, warmup_rounds=0, iterations=1)
    if benchmark.stats is None:
        return None, [], None
    return (benchmark.stats.stats.median, [statistics.median(times) for times in baseline_times],
            statistics.median(probe_times) if probe_times else None)


def require(contender):
    """Skip, saying why, a fused contender this installation cannot run."""
    if fused_backend(contender) == "cuda" and contender.startswith("fused_"):
        from xception_fast import _extension

        if not _extension.has_cuda_kernel():
            pytest.skip("the extension was built without its CUDA kernel (no CUDA toolkit at build time, "
                        "or XCEPTION_FAST_SKIP_CUDA set)")
