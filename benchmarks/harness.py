"""What is benchmarked (per device and profile), how each contender is built, and how it is timed.

Environment:
    XCEPTION_FAST_BENCH_DEVICE   "cuda" or "cpu" (default: cuda when available)
    XCEPTION_FAST_BENCH_PROFILE  "full" (default: the main job) or "quick" (the GPU check's subset;
                                 on a CPU a dry-run-sized subset)
    XCEPTION_FAST_BENCH_DIR      where the summary goes (default: benchmarks/results)
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
from dataclasses import dataclass

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import xception_fast
from xception_fast.model import SeparableConv2d, Xception

DEVICE = torch.device(os.environ.get("XCEPTION_FAST_BENCH_DEVICE")
                      or ("cuda" if torch.cuda.is_available() else "cpu"))
PROFILE = os.environ.get("XCEPTION_FAST_BENCH_PROFILE", "full")
if PROFILE not in ("full", "quick"):
    raise ValueError(f"XCEPTION_FAST_BENCH_PROFILE must be 'full' or 'quick', got {PROFILE!r}")
OUT_DIR = os.environ.get("XCEPTION_FAST_BENCH_DIR") or os.path.join(os.path.dirname(__file__), "results")

# (C, Cout, H = W, residual): Xception's ten separable-unit shapes at 299 x 299, and the middle
# flow's third unit, which also adds the block input.
UNIT_SHAPES = [
    (64, 128, 147, False), (128, 128, 147, False), (128, 256, 74, False), (256, 256, 74, False),
    (256, 728, 37, False), (728, 728, 37, False), (728, 728, 19, False), (728, 728, 19, True),
    (728, 1024, 19, False), (1024, 1536, 10, False), (1536, 2048, 10, False),
]

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
# Model precisions: plain fp32, or bf16 autocast over fp32 weights (how the model is run on a GPU).
MODEL_PRECISIONS = {"fp32": None, "amp-bf16": torch.bfloat16}

# Every contender, in the order the summary lists them.
CONTENDERS = ("eager_nchw", "eager_cl", "compile", "compile_max_autotune", "fused_cpu", "fused_cuda", "fused_triton")
COMPILERS = ("compile", "compile_max_autotune")
_GPU_EAGER = ("eager_nchw", "eager_cl")
_GPU_FUSED = ("fused_cuda", "fused_triton")

# Per device and profile: kind -> [(dtype or precision, batch, contenders)]. On a CPU the matrix is
# sized so that the full profile stays within ~10 minutes on 2 cores: the per-layer target
# configuration (batch 8, fp32) gets every contender; torch.compile (slow to compile there) runs
# once per unit shape at that configuration and once for the model at batch 8; batch 32 races the
# fused op against eager channels_last only; the training step runs at batch 4.
MATRIX = {
    ("cpu", "full"): {
        "unit": [("fp32", 8, ("eager_nchw", "eager_cl", "compile", "fused_cpu")),
                 ("bf16", 8, ("eager_nchw", "eager_cl", "fused_cpu")),
                 ("fp32", 1, ("eager_nchw", "eager_cl", "fused_cpu")),
                 ("fp32", 32, ("eager_cl", "fused_cpu"))],
        "infer": [("fp32", 1, ("eager_nchw", "eager_cl", "fused_cpu")),
                  ("fp32", 8, ("eager_nchw", "eager_cl", "compile", "fused_cpu"))],
        "train": [("fp32", 4, ("eager_cl", "fused_cpu"))],
    },
    ("cpu", "quick"): {
        "unit": [("fp32", 1, ("eager_cl", "fused_cpu"))],
        "infer": [("fp32", 1, ("eager_cl", "fused_cpu"))],
        "train": [],
    },
    ("cuda", "full"): {
        "unit": [(dtype, batch, _GPU_EAGER + _GPU_FUSED + (COMPILERS if (dtype, batch) == ("bf16", 128) else ()))
                 for dtype in ("bf16", "fp16", "fp32") for batch in (128, 32, 1)],
        "infer": [("amp-bf16", 128, _GPU_EAGER + COMPILERS + _GPU_FUSED),
                  ("amp-bf16", 1, _GPU_EAGER + COMPILERS + _GPU_FUSED),
                  ("fp32", 128, _GPU_EAGER + COMPILERS + _GPU_FUSED)],
        "train": [("amp-bf16", 128, _GPU_EAGER + ("compile",) + _GPU_FUSED)],
    },
    ("cuda", "quick"): {
        "unit": [("bf16", 128, ("eager_cl", "fused_triton", "fused_cuda"))],
        # max-autotune's compilation comes last: if it overruns the check's time limit, the rest is
        # already measured and written.
        "infer": [("amp-bf16", 128, ("eager_cl", "fused_cuda", "fused_triton", "compile_max_autotune"))],
        "train": [],
    },
}


@dataclass(frozen=True)
class Case:
    kind: str        # "unit", "infer" (one forward, eval mode) or "train" (one training step)
    dtype: str       # a DTYPES key for units, a MODEL_PRECISIONS key for the model
    batch: int
    contender: str
    shape: tuple = None  # units: (C, Cout, H = W, residual)

    @property
    def label(self):
        if self.kind != "unit":
            return "Xception 299²"
        channels, out_channels, size, residual = self.shape
        return f"{channels}→{out_channels} @{size}²" + (" +res" if residual else "")

    @property
    def group(self):
        """The contenders that race each other."""
        return f"{self.kind} {self.label} {self.dtype} b{self.batch}"

    @property
    def panel(self):
        """The summary's section (one table, one chart panel)."""
        if self.kind == "unit":
            return f"Per layer, {self.dtype}, batch {self.batch}"
        return f"Whole model, {self.label}"

    @property
    def row(self):
        if self.kind == "unit":
            return self.label
        return f"{'inference' if self.kind == 'infer' else 'training step'}, {self.dtype}, batch {self.batch}"

    @property
    def id(self):
        if self.kind != "unit":
            return f"{self.kind}-{self.dtype}-b{self.batch}-{self.contender}"
        channels, out_channels, size, residual = self.shape
        return f"{channels}to{out_channels}x{size}{'+res' if residual else ''}-{self.dtype}-b{self.batch}-{self.contender}"


def cases(kind):
    """The cases of ``kind`` for this device and profile, contenders of one case adjacent."""
    shapes = UNIT_SHAPES if kind == "unit" else [None]
    return [Case(kind, dtype, batch, contender, shape)
            for dtype, batch, contenders in MATRIX[(DEVICE.type, PROFILE)][kind]
            for shape in shapes for contender in contenders]


def _contender_backend(contender):
    return contender[len("fused_"):]


# ----------------------------------------------------------------------------------------------
# Building the contenders

class EagerUnit(nn.Module):
    """What a fused unit replaces: ReLU -> depthwise 3x3 -> pointwise 1x1 -> BatchNorm (eval)
    [-> + residual], with random weights and random running statistics."""

    def __init__(self, channels, out_channels):
        super().__init__()
        self.relu = nn.ReLU()
        self.sepconv = SeparableConv2d(channels, out_channels)
        self.bn = nn.BatchNorm2d(out_channels)
        with torch.no_grad():
            self.bn.weight.uniform_(0.5, 1.5)
            self.bn.bias.normal_(0.0, 0.1)
            self.bn.running_mean.normal_(0.0, 0.1)
            self.bn.running_var.uniform_(0.5, 1.5)
        self.eval()

    def forward(self, x, residual=None):
        y = self.bn(self.sepconv(self.relu(x)))
        return y if residual is None else y + residual


def _memory_format(contender):
    return torch.contiguous_format if contender == "eager_nchw" else torch.channels_last


def _compile(module, contender, *example):
    """torch.compile of ``module``, compiled here by a first call (so compilation and autotuning
    are never timed). max-autotune runs with Inductor's freezing, which folds BatchNorm into the
    convs; freezing applies to inference only."""
    torch._dynamo.reset()  # a fresh cache per contender: no reuse across modes, no recompile limit
    if contender == "compile":
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


def build_unit(case):
    """The no-argument function that runs ``case.contender`` on one separable-unit shape; to be
    called, as it is timed, under the case's precision_context."""
    channels, out_channels, size, residual = case.shape
    dtype = DTYPES[case.dtype]
    torch.manual_seed(0)
    unit = EagerUnit(channels, out_channels).to(DEVICE, dtype)
    fmt = _memory_format(case.contender)
    x = torch.randn(case.batch, channels, size, size, device=DEVICE, dtype=dtype).contiguous(memory_format=fmt)
    r = (torch.randn(case.batch, out_channels, size, size, device=DEVICE, dtype=dtype).contiguous(memory_format=fmt)
         if residual else None)
    if case.contender.startswith("fused_"):
        bn = unit.bn
        weight, bias = xception_fast.fold_bn(unit.sepconv.pconv.weight, bn.weight, bn.bias, bn.running_mean,
                                             bn.running_var, bn.eps)
        weight, bias = weight.to(dtype), bias.to(dtype)
        dw_weight = unit.sepconv.dconv.weight
        backend = _contender_backend(case.contender)

        def call(xi, ri):
            return xception_fast.sepconv_bn(xi, dw_weight, weight, bias, relu_input=True, residual=ri,
                                            backend=backend)
    else:
        call = unit.to(memory_format=fmt)
        if case.contender in COMPILERS:
            call = _compile(call, case.contender, x, r)
    return _timed_call(call, _rotated((x, r)))


def build_model(case):
    """The no-argument function that runs ``case.contender`` on the whole model: one inference
    (``case.kind == "infer"``, eval mode) or one training step (SGD, cross-entropy on random
    labels, train mode); to be called, as it is timed, under the case's precision_context."""
    training = case.kind == "train"
    fmt = _memory_format(case.contender)
    torch.manual_seed(0)
    model = Xception().to(DEVICE).train(training).to(memory_format=fmt)
    x = torch.randn(case.batch, 3, 299, 299, device=DEVICE).contiguous(memory_format=fmt)
    extra = {}
    if case.contender.startswith("fused_"):
        model, report = xception_fast.fuse(model, backend=_contender_backend(case.contender))
        if report.count != 34:
            raise AssertionError(f"fuse() fused {report.count} separable units, Xception has 34: {report.names}")
        extra["fused_units"] = report.count
    elif case.contender in COMPILERS:
        model = _compile(model, case.contender, x)
    if not training:
        return _timed_call(model, [(x,)]), extra

    labels = torch.randint(0, 1000, (case.batch,), device=DEVICE)
    step = training_step(model, MODEL_PRECISIONS.get(case.dtype))
    return _timed_call(step, [(x, labels)]), extra


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
    first write takes a page fault per 4 KB, which on a VM costs as much as the arithmetic of a
    147 x 147 unit and depends on what the process ran before (measured here: the eager model at
    batch 8 took 0.79 s after the per-layer runs, 1.2 s in a fresh process). With it, every
    contender runs in the same steady state, the one a long-running process reaches. Returns what
    was set, for the summary."""
    try:
        mallopt = ctypes.CDLL(ctypes.util.find_library("c")).mallopt
    except (OSError, AttributeError, TypeError):
        return "the platform's own (no glibc mallopt)"
    m_trim_threshold, m_mmap_max = -1, -4
    if mallopt(m_mmap_max, 0) and mallopt(m_trim_threshold, 2 ** 31 - 1):
        return "glibc, keeping freed memory (mallopt M_MMAP_MAX=0, M_TRIM_THRESHOLD=2 GiB)"
    return "the platform's own (mallopt refused)"


# Per device: a time budget per benchmark, bounds on its rounds, and a warm-up long enough for
# the state a steady run reaches: on a GPU settled clocks; on a CPU the host allocator's layout
# for the case's sizes (measured here: the first two to three calls of an eager batch-32 unit took
# up to 4x as long as the following ones).
TIMING = {
    "cpu": {"budget_s": 1.5, "min_rounds": 3, "max_rounds": 15, "warmup_calls": 3, "warmup_s": 0.5},
    "cuda": {"budget_s": 0.5, "min_rounds": 10, "max_rounds": 1000, "warmup_calls": 3, "warmup_s": 0.2},
}


# On a CPU (here a shared VM, whose load from elsewhere comes in bursts of seconds) each contender
# is timed round by round in alternation with eager channels_last, and its speedup over eager
# channels_last is the ratio of the two medians of those same rounds: a burst slows both.
PAIRED_BASELINE = {"cpu": "eager_cl", "cuda": None}


def paired_baseline(case):
    """The case of the contender timed in alternation with ``case``'s, or None."""
    baseline = PAIRED_BASELINE[DEVICE.type]
    if baseline is None or case.contender == baseline:
        return None
    return dataclasses.replace(case, contender=baseline)


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


def measure(benchmark, fn, baseline=None):
    """Time ``fn`` with pytest-benchmark after a warm-up that is never timed: one call (the first
    call pays compilation, autotuning, allocation), then more until the device's steady state
    (TIMING). With ``baseline``, each round first runs the baseline (timed here, outside
    pytest-benchmark's timer). The round count fills the device's budget from the warm-up's
    per-call times. Returns the medians of ``fn`` and of the baseline in seconds (None for one
    not timed, and for both when pytest-benchmark is disabled)."""
    timing = TIMING[DEVICE.type]
    per_round = _warm_up(fn, timing) + (_warm_up(baseline, timing) if baseline else 0.0)
    rounds = max(timing["min_rounds"], min(timing["max_rounds"], int(timing["budget_s"] / per_round)))
    baseline_times = []

    def timed_baseline():
        start = time.perf_counter()
        baseline()
        baseline_times.append(time.perf_counter() - start)

    benchmark.pedantic(fn, setup=timed_baseline if baseline else None, rounds=rounds, warmup_rounds=0,
                       iterations=1)
    if benchmark.stats is None:
        return None, None
    return benchmark.stats.stats.median, statistics.median(baseline_times) if baseline_times else None


def require(contender):
    """Skip, saying why, a fused contender this installation cannot run."""
    if contender == "fused_cuda":
        from xception_fast import _extension

        if not _extension.has_cuda_kernel():
            pytest.skip("the extension was built without its CUDA kernel (no CUDA toolkit at build time, "
                        "or XCEPTION_FAST_SKIP_CUDA set)")
