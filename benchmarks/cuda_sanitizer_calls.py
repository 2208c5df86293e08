"""A few calls of the CUDA kernel, each checked, for compute-sanitizer (memcheck and racecheck).

    compute-sanitizer --tool memcheck --error-exitcode 1 python benchmarks/cuda_sanitizer_calls.py
    compute-sanitizer --tool racecheck --error-exitcode 1 python benchmarks/cuda_sanitizer_calls.py

Small calls reach the kernel's ragged paths (C, Cout and N*H*W not multiples of the tiles, scalar
loads and stores) in each dtype with an exact eager counterpart; the Xception-sized call its
vector paths and several tiles in every direction. Each result is held to the project's exactness
rule against the float64 CPU reference and must be the same bit for bit when the call is
repeated. Exits nonzero on any mismatch, and at once when no CUDA device is present.
"""
import os
import sys

import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# (what, dtype, N, C, Cout, H, W, channels_last, bias, relu_input, relu_output, residual)
CASES = [
    ("small bf16, all options", torch.bfloat16, 2, 13, 7, 5, 6, False, True, True, True, True),
    ("small fp16, all options", torch.float16, 2, 13, 7, 5, 6, False, True, True, True, True),
    ("small fp32 (no TF32), all options", torch.float32, 2, 13, 7, 5, 6, False, True, True, True, True),
    ("Xception middle flow, bf16", torch.bfloat16, 8, 728, 728, 19, 19, True, True, True, False, True),
]


def make_inputs(dtype, n, c, cout, h, w, channels_last, with_bias, with_residual, seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, c, h, w, generator=g)
    dw = torch.randn(c, 1, 3, 3, generator=g) * (2.0 / 9) ** 0.5
    pw = torch.randn(cout, c, 1, 1, generator=g) * (2.0 / c) ** 0.5
    bias = torch.randn(cout, generator=g) * 0.1 if with_bias else None
    residual = torch.randn(n, cout, h, w, generator=g) if with_residual else None
    x = x.to(dtype)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    if residual is not None:
        residual = residual.to(dtype).contiguous(memory_format=torch.channels_last if channels_last
                                                 else torch.contiguous_format)
    return x, dw, pw, bias, residual


def on(device, t):
    return None if t is None else t.to(device)


def run_case(case, seed, reference_fn, assert_exact):
    what, dtype, n, c, cout, h, w, channels_last, with_bias, relu_in, relu_out, with_res = case
    x, dw, pw, bias, residual = make_inputs(dtype, n, c, cout, h, w, channels_last, with_bias, with_res, seed)
    dev = torch.device("cuda")
    args = (on(dev, x), on(dev, dw), on(dev, pw), on(dev, bias))
    res_dev = on(dev, residual)

    fused = torch.ops.xception_fast.sepconv_bn(*args, relu_in, relu_out, res_dev)
    torch.cuda.synchronize()
    again = torch.ops.xception_fast.sepconv_bn(*args, relu_in, relu_out, res_dev)
    eager = reference_fn(*args, relu_in, relu_out, res_dev)
    torch.cuda.synchronize()

    f64 = torch.float64
    reference64 = reference_fn(x.to(f64), dw.to(f64), pw.to(f64), None if bias is None else bias.to(f64),
                               relu_in, relu_out, None if residual is None else residual.to(f64))
    problems = []
    if fused.dtype != dtype:
        problems.append(f"dtype {fused.dtype}, expected {dtype}")
    expected_format = torch.channels_last if channels_last else torch.contiguous_format
    if not fused.is_contiguous(memory_format=expected_format):
        problems.append(f"output strides {fused.stride()} are not {expected_format}")
    if not torch.equal(fused, again):
        problems.append("a repeated call gave a different result")
    try:
        fused_err, eager_err = assert_exact(fused, eager, reference64, what)
    except AssertionError as e:
        problems.append(str(e))
    else:
        print(f"{what}: max abs error {fused_err:.3e} (eager {eager_err:.3e})")
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
    from exactness import assert_exact
    from xception_fast import _extension, sepconv_bn_reference

    if not _extension.has_cuda_kernel():
        print("cuda_sanitizer_calls: the extension was built without its CUDA kernel", file=sys.stderr)
        return 2
    # The fp32 case compares the exact FFMA path with an exact eager conv; TF32 would compare two
    # different roundings.
    torch.backends.cudnn.allow_tf32 = False
    ok = [run_case(case, seed, sepconv_bn_reference, assert_exact) for seed, case in enumerate(CASES)]
    failed = ok.count(False)
    print(f"{len(ok) - failed} passed, {failed} failed")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
