"""A few calls of the CUDA kernel, each checked, for compute-sanitizer (memcheck and racecheck).

    compute-sanitizer --tool memcheck --error-exitcode 1 python benchmarks/cuda_sanitizer_calls.py
    compute-sanitizer --tool racecheck --error-exitcode 1 python benchmarks/cuda_sanitizer_calls.py

The calls reach every instantiation but one kind of each (k = 1, 3, 5, 7; bf16, fp16, fp32 exact
and TF32), stride 2 on odd sizes, dilation 2 on a map smaller than the dilated kernel, padding
that leaves whole windows outside x, every activation in each of the three places, dw_bias and
residual, the kernel's ragged paths (C and Cout not multiples of the vector, the slice or the
tile: scalar loads and stores; and multiples of the vector only: vector accesses with partial
tiles), a non-contiguous x, and one Xception-sized call (several tiles in every direction).

Each call runs twice, with the weights packed per call (packed=None) and with gpu_pack.pack_gpu's
weights: the two results must be the same bit for bit (which also checks that a call repeats
exactly), have x's dtype and memory format, and meet the project's exactness rule against the
float64 CPU reference (tests/exactness.py). One more call puts NaN into x and checks that the
fused op's NaNs are eager's. Exits nonzero on any mismatch, and at once (2) when no CUDA device
or no CUDA kernel is present.
"""
import dataclasses
import os
import sys

import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@dataclasses.dataclass(frozen=True)
class Case:
    what: str
    dtype: torch.dtype
    n: int
    c: int
    cout: int
    h: int
    w: int
    k: int
    unit: dict  # the exactness.Unit fields
    layout: str = "nchw"
    dw_bias: bool = True
    pw_bias: bool = True
    residual: bool = True
    tf32: bool = False  # fp32 only: cuDNN's TF32 flag, which the kernel follows
    fp32_weights: bool = False  # half-precision x with float32 weights, as autocast gives the op


CASES = [
    Case("k=3 bf16, C=13 Cout=7 (scalar paths), strided x", torch.bfloat16, 2, 13, 7, 5, 6, 3,
         dict(act_in="relu", act_mid="identity", act_out="hardswish"), layout="strided"),
    Case("k=5 fp16, stride 2 on 9x11, C=24 Cout=40", torch.float16, 2, 24, 40, 9, 11, 5,
         dict(stride=2, act_in="hardswish", act_mid="relu6", act_out="relu"), layout="channels_last"),
    Case("k=7 fp32 exact, dilation 2 on 5x6 (< the dilated 13), C=20 Cout=33", torch.float32, 1, 20, 33, 5, 6, 7,
         dict(dilation=2, act_in="relu6", act_mid="hardswish", act_out="relu6"), residual=False),
    Case("k=3 bf16, stride 2 dilation 2 on 10x7, C=72 Cout=264 (vectors, partial tiles)", torch.bfloat16, 2, 72,
         264, 10, 7, 3, dict(stride=2, dilation=2, act_in="identity", act_mid="relu", act_out="identity"),
         layout="channels_last"),
    Case("k=1 fp16, stride 2 padding 1 on 7x7 (border pixels all padding)", torch.float16, 3, 40, 24, 7, 7, 1,
         dict(stride=2, padding=1, act_in="relu", act_mid="hardswish", act_out="identity"), pw_bias=False),
    Case("k=5 fp32 TF32, padding 3 on 8x8, C=36 Cout=20", torch.float32, 2, 36, 20, 8, 8, 5,
         dict(padding=3, act_in="identity", act_mid="identity", act_out="relu"), tf32=True, dw_bias=False),
    Case("k=7 bf16, stride 2 on 13x9, C=64 Cout=256 (whole tiles)", torch.bfloat16, 1, 64, 256, 13, 9, 7,
         dict(stride=2, act_in="relu6", act_mid="relu", act_out="hardswish"), layout="channels_last"),
    Case("Xception middle flow, bf16 with float32 weights and residual", torch.bfloat16, 8, 728, 728, 19, 19, 3,
         dict(act_in="relu", act_mid="identity", act_out="identity"), layout="channels_last", dw_bias=False,
         fp32_weights=True),
]


def inputs(case, seed, make_inputs, Unit):
    dtype = torch.float32 if case.fp32_weights else case.dtype
    tensors, unit = make_inputs(case.n, case.c, case.cout, case.h, case.w, k=case.k, unit=Unit(**case.unit),
                                dtype=dtype, device="cuda", layout=case.layout, dw_bias=case.dw_bias,
                                pw_bias=case.pw_bias, residual=case.residual, seed=seed)
    if case.fp32_weights:
        for name in ("x", "residual"):
            if tensors[name] is not None:
                tensors[name] = tensors[name].to(case.dtype)
    return tensors, unit


def run_case(case, seed, helpers):
    from xception_fast.gpu_pack import pack_gpu

    make_inputs, Unit, op_args, eager, reference64, assert_exact = helpers
    torch.backends.cudnn.allow_tf32 = case.tf32
    tensors, unit = inputs(case, seed, make_inputs, Unit)
    x = tensors["x"]
    op = torch.ops.xception_fast.sepconv
    packed = pack_gpu(tensors["dw_weight"], tensors["dw_bias"], tensors["pw_weight"], tensors["pw_bias"], x.dtype)

    fused = op(*op_args(tensors, unit))
    fused_packed = op(*op_args(tensors, unit, packed))
    eager_out = eager(tensors, unit)
    torch.cuda.synchronize()

    problems = []
    if fused.dtype != case.dtype:
        problems.append(f"dtype {fused.dtype}, expected {case.dtype}")
    expected_format = torch.channels_last if case.layout == "channels_last" else torch.contiguous_format
    if not fused.is_contiguous(memory_format=expected_format):
        problems.append(f"output strides {fused.stride()} are not {expected_format}")
    if not torch.equal(fused, fused_packed):
        problems.append("packed=None and packed=pack_gpu(...) gave different results")
    try:
        fused_err, eager_err = assert_exact(fused, eager_out, reference64(tensors, unit), case.what)
    except AssertionError as e:
        problems.append(str(e))
    else:
        print(f"{case.what}: max abs error {fused_err:.3e} (eager {eager_err:.3e})")
    return report(case.what, problems)


def run_nan_case(seed, helpers):
    """NaN in x: relu and relu6 (and the identity) keep it, as torch's do."""
    make_inputs, Unit, op_args, eager, _, _ = helpers
    what = "NaN in x through relu, relu6 (bf16)"
    torch.backends.cudnn.allow_tf32 = False
    tensors, unit = make_inputs(1, 16, 24, 6, 5, k=3, unit=Unit(act_in="relu", act_mid="relu6", act_out="relu"),
                                dtype=torch.bfloat16, device="cuda", layout="channels_last", dw_bias=True, seed=seed)
    tensors["x"][0, 3, 2, 1] = float("nan")
    fused = torch.ops.xception_fast.sepconv(*op_args(tensors, unit))
    expected = eager(tensors, unit)
    torch.cuda.synchronize()
    problems = []
    if not torch.equal(fused.isnan(), expected.isnan()):
        problems.append(f"NaN at {int(fused.isnan().sum())} places, eager at {int(expected.isnan().sum())}")
    elif not expected.isnan().any():
        problems.append("eager has no NaN: the case checks nothing")
    else:
        print(f"{what}: NaN at the same {int(expected.isnan().sum())} places as eager")
    return report(what, problems)


def report(what, problems):
    for p in problems:
        print(f"MISMATCH {what}: {p}", file=sys.stderr)
    return not problems


def main():
    if not torch.cuda.is_available():
        print("cuda_sanitizer_calls: no CUDA device is visible (torch.cuda.is_available() is False); "
              "this script exercises the CUDA kernel and needs one", file=sys.stderr)
        return 2
    sys.path.insert(0, REPO)
    sys.path.insert(0, os.path.join(REPO, "tests"))
    from exactness import Unit, assert_exact, eager, make_inputs, op_args, reference64

    import xception_fast.ops  # noqa: F401  - defines torch.ops.xception_fast.sepconv
    from xception_fast import _extension

    if not _extension.has_cuda_kernel():
        print("cuda_sanitizer_calls: the extension was built without its CUDA kernel", file=sys.stderr)
        return 2
    helpers = (make_inputs, Unit, op_args, eager, reference64, assert_exact)
    saved = torch.backends.cudnn.allow_tf32
    try:
        ok = [run_case(case, seed, helpers) for seed, case in enumerate(CASES)]
        ok.append(run_nan_case(len(CASES), helpers))
    finally:
        torch.backends.cudnn.allow_tf32 = saved
    failed = ok.count(False)
    print(f"{len(ok) - failed} passed, {failed} failed")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
