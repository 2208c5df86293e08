"""Memory: the peak memory of one training step of Xception at 299 x 299, batch 8, eager
(channels_last) against its fused copy with the same weights. The fused model must not use more.
On a CPU the fused copy is measured twice: keeping the depthwise results for the backward (the
default) and recomputing them (``fuse(recompute_depthwise=True)``); a GPU backward always recomputes.

One training step is: gradients cleared, forward, cross-entropy on fixed random labels, backward,
SGD (momentum) step. Each model takes one step first, so that the measured step finds its momentum
buffers made and its first-call work done. The peak is counted in live tensor bytes above what was
allocated before the step:

- on a CPU (fp32), from the profiler's memory accounting: every allocation and free made through
  PyTorch's CPU allocator during the step, in time order, as a running sum, whose maximum is the
  peak. Memory that libraries allocate behind PyTorch's allocator (oneDNN, BLAS packing) is not
  seen, for either model. The profiler does not see a free of a block allocated before it
  started, so the step must free nothing it did not allocate: gradients are cleared before it;
- on a GPU (bf16 autocast over forward and loss), ``torch.cuda.max_memory_allocated`` after
  ``torch.cuda.reset_peak_memory_stats``.

The suite runs under ``--benchmark-only``, which asks every test for a timing: this one times the
fused step it measures, once (``rounds=1``; on a CPU under the profiler); the speed comparison is
test_model's.
"""
import copy

import pytest
import torch
from torch.autograd import DeviceType
from torch.profiler import ProfilerActivity, profile

import xception_fast
from xception_fast.model import Xception

from .harness import DEVICE, MODEL_PRECISIONS, PROFILE, fused_backend, require, training_step

BATCH = 8
# The eager model's precision per device: plain fp32 on a CPU, bf16 autocast on a GPU.
PRECISION = {"cpu": "fp32", "cuda": "amp-bf16"}[DEVICE.type]
AMP_DTYPE = MODEL_PRECISIONS[PRECISION]
# The fused contenders measured against eager. The GPU check ("quick") leaves out Triton, whose
# autotuning for batch-8 shapes in the warm-up step would take much of its time.
FUSED = {"cpu": ("fused_cpu",), "cuda": ("fused_cuda",) if PROFILE == "quick" else ("fused_cuda", "fused_triton")}[
    DEVICE.type]

# Where the profiler files allocations that live in host memory (as torch's own accounting does).
_HOST_DEVICE_TYPES = (DeviceType.CPU, DeviceType.MKLDNN, DeviceType.IDEEP)


def host_memory_profile(fn):
    """Run ``fn`` under the profiler's memory accounting; return (peak, retained): the maximum,
    and the final value, of the bytes allocated through PyTorch's CPU allocator during the call
    and not yet freed.

    The profiler's FunctionEvents (``prof.events()``) give an op's allocations only as a net sum
    over the op, in which a temporary that lives and dies inside it disappears, and keep as
    separate "[memory]" events only those made outside any op; so the raw records are walked
    instead, one per allocation (+bytes) or free (-bytes), each with its time.
    """
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    records = sorted((e for e in prof.profiler.kineto_results.events()
                      if e.name() == "[memory]" and e.device_type() in _HOST_DEVICE_TYPES),
                     key=lambda e: e.start_ns())
    live = peak = 0
    for record in records:
        live += record.nbytes()
        peak = max(peak, live)
    return peak, live


def check_host_memory_profile():
    """The CPU accounting on a case whose answer is known: 1 + 4 + 2 MiB allocated, the 4 MiB
    freed, then an op sequence whose float copy (4 MiB) is a temporary that lives only while the
    result (4 MiB) is made: the peak is 3 + 4 + 4 = 11 MiB, above the 7 MiB reached before and
    below the 15 MiB allocated in all; everything is freed by the end."""
    mib = 1 << 20

    def allocations():
        a = torch.empty(mib, dtype=torch.uint8)
        b = torch.empty(4 * mib, dtype=torch.uint8)
        c = torch.empty(2 * mib, dtype=torch.uint8)
        del b
        d = a.float().neg()
        del a, c, d

    peak, retained = host_memory_profile(allocations)
    if (peak, retained) != (11 * mib, 0):
        raise AssertionError(f"the profiler's memory accounting gave a peak of {peak} B and {retained} B retained "
                             f"on a case whose answer is {11 * mib} B and 0 B: its peaks cannot be trusted here")


def peak_memory(model, step):
    """(peak, retained) bytes of one call of ``step`` above what was allocated before it, with
    ``model``'s gradients cleared first (a free of memory allocated before the measurement would be
    invisible to the CPU accounting)."""
    model.zero_grad(set_to_none=True)
    if DEVICE.type == "cpu":
        return host_memory_profile(step)
    torch.cuda.synchronize(DEVICE)
    before = torch.cuda.memory_allocated(DEVICE)
    torch.cuda.reset_peak_memory_stats(DEVICE)
    step()
    torch.cuda.synchronize(DEVICE)
    return torch.cuda.max_memory_allocated(DEVICE) - before, torch.cuda.memory_allocated(DEVICE) - before


DEPTHWISE = {"cpu": ("kept", "recomputed"), "cuda": ("recomputed",)}[DEVICE.type]


@pytest.mark.parametrize("depthwise", DEPTHWISE)
@pytest.mark.parametrize("contender", FUSED)
def test_training_step_memory(benchmark, results, contender, depthwise):
    require(contender)
    if DEVICE.type == "cpu":
        check_host_memory_profile()
    benchmark.group = f"memory: training step, Xception 299², {PRECISION}, b{BATCH}, depthwise {depthwise}"
    torch.manual_seed(0)
    eager = Xception().to(DEVICE).train().to(memory_format=torch.channels_last)
    fused, report = xception_fast.fuse(copy.deepcopy(eager), backend=fused_backend(contender),
                                       recompute_depthwise=depthwise == "recomputed")
    if report.count != 34:
        raise AssertionError(f"fuse() fused {report.count} separable units, Xception has 34: {report.names}")
    x = torch.randn(BATCH, 3, 299, 299, device=DEVICE).contiguous(memory_format=torch.channels_last)
    labels = torch.randint(0, 1000, (BATCH,), device=DEVICE)

    eager_train, fused_train = training_step(eager, AMP_DTYPE), training_step(fused, AMP_DTYPE)

    def eager_step():
        return eager_train(x, labels)

    def fused_step():
        return fused_train(x, labels)

    # Momentum buffers, first-call allocations, cuDNN's algorithm search, Triton's autotuning.
    eager_step()
    fused_step()
    eager_peak, eager_retained = peak_memory(eager, eager_step)
    fused_peak, fused_retained = benchmark.pedantic(peak_memory, (fused, fused_step), rounds=1, iterations=1,
                                                    warmup_rounds=0)
    gradient_bytes = sum(p.numel() * p.element_size() for p in eager.parameters())
    results.add_memory(benchmark, {
        "kind": "train", "shape": "Xception 299²", "dtype": PRECISION, "batch": BATCH, "contender": contender,
        "depthwise": depthwise,
        "baseline": "eager_cl",
        "method": ("torch.profiler memory events (CPU allocator), running-sum peak" if DEVICE.type == "cpu"
                   else "torch.cuda.max_memory_allocated"),
        "eager_peak_bytes": eager_peak, "fused_peak_bytes": fused_peak,
        "eager_peak_mb": eager_peak / 1e6, "fused_peak_mb": fused_peak / 1e6,
        "saving": (eager_peak - fused_peak) / eager_peak,
        # What the step leaves allocated: its gradients.
        "eager_retained_bytes": eager_retained, "fused_retained_bytes": fused_retained,
        "gradient_bytes": gradient_bytes,
    })
    if DEVICE.type == "cpu":
        # The running sum must balance over the step: everything it allocated is freed but the gradients.
        assert eager_retained == fused_retained == gradient_bytes, (
            f"after the step the accounting holds {eager_retained} B (eager), {fused_retained} B (fused); the "
            f"gradients are {gradient_bytes} B")
    assert fused_peak <= eager_peak, (
        f"the fused training step peaks at {fused_peak / 1e6:.1f} MB, eager channels_last at {eager_peak / 1e6:.1f} MB")
