"""The fused op in Triton: ``torch.ops.xception_fast.sepconv_bn_triton``.

    y = act_out(PW(DW(act_in(x))) + bias) + residual

Same contract as the C++ op (``xception_fast.ops``): one kernel computes a tile of NHWC output
pixels x output channels, walking the input channels in slices; each slice's depthwise result is
built in registers from nine shifted loads and fed straight to ``tl.dot`` with the folded
pointwise weights, so the depthwise intermediate never reaches global memory.

Under ``TRITON_INTERPRET=1`` (read by Triton when this module is imported) the kernel runs on CPU
tensors, with one small config instead of autotuning.
"""
from typing import Optional

import torch
import triton
import triton.language as tl
from torch._prims_common import suggest_memory_format
from triton.runtime.interpreter import InterpretedFunction

from .autograd import register_autograd
from .ops import check_args, empty_output, sepconv_bn_reference

__all__ = ["sepconv_bn_triton", "sepconv_bn_reference"]


# ----------------------------------------------------------------------------------------------
# Reference: the op's semantics are ops.sepconv_bn_reference (re-exported here), which the tests
# hold this kernel to.


# ----------------------------------------------------------------------------------------------
# Kernels

def _config(block_m, block_n, block_k, num_warps, num_stages):
    return triton.Config({"BLOCK_M": block_m, "BLOCK_N": block_n, "BLOCK_K": block_k},
                         num_warps=num_warps, num_stages=num_stages)


# Hopper (228 KB smem/SM; wgmma wants BLOCK_M a multiple of 64 per warp group) and Ampere (164 KB
# on A100). Wide BLOCK_N pays the depthwise (on CUDA cores) once for more output channels; narrow
# tiles keep enough programs in flight for small maps such as the 19x19 middle flow.
_HALF_CONFIGS = [
    _config(128, 256, 32, 8, 3),
    _config(64, 256, 32, 8, 3),
    _config(128, 128, 64, 8, 3),
    _config(128, 128, 32, 8, 3),
    _config(64, 128, 32, 4, 3),
    _config(128, 64, 32, 4, 3),
    _config(64, 64, 32, 4, 3),
]
# In float32 the compiler software-pipelines the nine shifted input loads through shared memory
# (9 x BLOCK_M x BLOCK_K x 4 bytes a stage), so float32 tiles get fewer stages.
_FP32_CONFIGS = [
    _config(128, 128, 32, 8, 1),
    _config(64, 128, 32, 4, 2),
    _config(64, 64, 32, 4, 2),
    _config(32, 64, 32, 4, 3),
]
_GPU_CONFIGS = _HALF_CONFIGS + _FP32_CONFIGS

# The interpreter runs one Python pass per program: one config, large enough to keep that quick,
# small enough that the tests' shapes (~40 channels, ~100 pixels) span several tiles each way.
_INTERPRETER_CONFIGS = [_config(64, 32, 32, 4, 1)]


def _next_pow2(n):
    return 1 << max(int(n) - 1, 0).bit_length()


def _prune_configs(configs, named_args, **kwargs):
    """The configs for x's dtype, less tiles far wider than the problem (mostly masked work), so
    that tuning small shapes is cheap; where every tile is wider, the smallest one alone."""
    ours = _FP32_CONFIGS if named_args["x_ptr"].dtype == torch.float32 else _HALF_CONFIGS
    ours = [cfg for cfg in configs if cfg in ours]
    cap_m = max(32, _next_pow2(named_args["M"]))
    cap_n = max(64, _next_pow2(named_args["Cout"]))
    cap_k = max(32, _next_pow2(named_args["C"]))
    kept = [cfg for cfg in ours
            if cfg.kwargs["BLOCK_M"] <= cap_m and cfg.kwargs["BLOCK_N"] <= cap_n and cfg.kwargs["BLOCK_K"] <= cap_k]
    smallest = min(ours, key=lambda cfg: (cfg.kwargs["BLOCK_M"] * cfg.kwargs["BLOCK_N"], cfg.kwargs["BLOCK_K"]))
    return kept or [smallest]


def _autotune(fn):
    if isinstance(fn, InterpretedFunction):
        return triton.autotune(configs=_INTERPRETER_CONFIGS, key=[])(fn)
    return triton.autotune(
        configs=_GPU_CONFIGS,
        key=["N", "H", "W", "C", "Cout", "HAS_RESIDUAL", "ALLOW_TF32"],  # tensor dtypes are added by Triton
        prune_configs_by={"early_config_prune": _prune_configs},
    )(fn)


@triton.jit
def _cast(v, dtype: tl.constexpr, BF16_BY_HAND: tl.constexpr):
    """v (float32) cast to dtype, rounding to nearest even."""
    if BF16_BY_HAND:
        # The interpreter's float32 -> bfloat16 cast truncates; round the bit pattern to nearest
        # even first, so that the cast is exact.
        bits = v.to(tl.uint32, bitcast=True)
        bits = (bits + (0x7FFF + ((bits >> 16) & 1))) & 0xFFFF0000
        v = bits.to(tl.float32, bitcast=True)
    return v.to(dtype)


@_autotune
@triton.jit
def _sepconv_bn_kernel(
    x_ptr,  # [N, H, W, C] x's dtype
    taps_ptr,  # [9, C] float32 depthwise taps
    w_ptr,  # [C, Cout] pointwise weight in the dot's dtype
    bias_ptr,  # [Cout] float32 (read only if HAS_BIAS)
    res_ptr,  # [N, H, W, Cout] x's dtype (read only if HAS_RESIDUAL)
    out_ptr,  # [N, H, W, Cout] x's dtype
    M, N, H, W, C, Cout,  # M = N * H * W output pixels
    RELU_INPUT: tl.constexpr,
    RELU_OUTPUT: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    HAS_RESIDUAL: tl.constexpr,
    ALLOW_TF32: tl.constexpr,  # float32 x only: TF32 tensor cores, as cuDNN under allow_tf32
    BF16_BY_HAND: tl.constexpr,  # only under the interpreter, for bfloat16 x
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    # Output-channel tiles of one pixel tile are neighbours in launch order, so the pixel tile's
    # input rows are still in L2 when the other channel tiles recompute its depthwise result.
    pid = tl.program_id(0)
    num_pid_n = tl.cdiv(Cout, BLOCK_N)
    pid_m = pid // num_pid_n
    pid_n = pid % num_pid_n

    offs_m = pid_m.to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)  # int64: N*H*W*C may exceed 2**31
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    m_ok = offs_m < M
    n_ok = offs_n < Cout
    w_idx = offs_m % W
    h_idx = (offs_m // W) % H

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, C, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        k_ok = offs_k < C
        d = tl.zeros((BLOCK_M, BLOCK_K), dtype=tl.float32)
        for kh in tl.static_range(3):
            ih = h_idx + (kh - 1)
            row_ok = m_ok & (ih >= 0) & (ih < H)
            for kw in tl.static_range(3):
                iw = w_idx + (kw - 1)
                ok = row_ok & (iw >= 0) & (iw < W)
                src = (offs_m + ((kh - 1) * W + (kw - 1))) * C  # the neighbour's NHWC row, int64
                v = tl.load(x_ptr + (src[:, None] + offs_k[None, :]), mask=ok[:, None] & k_ok[None, :],
                            other=0.0).to(tl.float32)
                if RELU_INPUT:
                    v = tl.where(v < 0.0, 0.0, v)  # keeps NaN, as torch.relu does
                tap = tl.load(taps_ptr + ((kh * 3 + kw) * C + offs_k), mask=k_ok, other=0.0)
                d += v * tap[None, :]
        # The MMA operand is the depthwise result rounded to x's dtype (fp32 stays fp32), as in
        # eager; w_ptr's dtype is the dot's (see _dot_dtype for the interpreter's bf16).
        a = _cast(d, x_ptr.dtype.element_ty, BF16_BY_HAND).to(w_ptr.dtype.element_ty)
        b = tl.load(w_ptr + (offs_k[:, None] * Cout + offs_n[None, :]), mask=k_ok[:, None] & n_ok[None, :],
                    other=0.0)
        if ALLOW_TF32:
            acc = tl.dot(a, b, acc, input_precision="tf32")
        else:
            acc = tl.dot(a, b, acc, input_precision="ieee")

    if HAS_BIAS:
        acc += tl.load(bias_ptr + offs_n, mask=n_ok, other=0.0)[None, :]
    if RELU_OUTPUT:
        acc = tl.where(acc < 0.0, 0.0, acc)
    out_offs = offs_m[:, None] * Cout + offs_n[None, :]
    out_mask = m_ok[:, None] & n_ok[None, :]
    if HAS_RESIDUAL:
        acc += tl.load(res_ptr + out_offs, mask=out_mask, other=0.0).to(tl.float32)
    tl.store(out_ptr + out_offs, _cast(acc, out_ptr.dtype.element_ty, BF16_BY_HAND), mask=out_mask)


# ----------------------------------------------------------------------------------------------
# Launchers

def _interpreted():
    return isinstance(_sepconv_bn_kernel.fn, InterpretedFunction)


def _dot_dtype(dtype):
    # The interpreter's tl.dot multiplies bfloat16 operands as their raw uint16 bits (numpy has no
    # bfloat16); bf16-rounded values carried in float32 give the same products exactly.
    if dtype == torch.bfloat16 and _interpreted():
        return torch.float32
    return dtype


def _allow_tf32(x):
    return x.dtype == torch.float32 and x.device.type == "cuda" and torch.backends.cudnn.allow_tf32


def _launch(x, dw_weight, pw_weight, bias, relu_input, relu_output, residual, out):
    """Run the kernel into ``out`` ([N, Cout, H, W], channels_last contiguous, N >= 1)."""
    n, c, h, w = x.shape
    cout = out.shape[1]
    m = n * h * w
    x_nhwc = x.contiguous(memory_format=torch.channels_last)
    taps = dw_weight.reshape(c, 9).t().to(torch.float32).contiguous()
    pw_t = pw_weight.reshape(cout, c).to(x.dtype).t().to(_dot_dtype(x.dtype)).contiguous()
    bias32 = None if bias is None else bias.to(torch.float32).contiguous()
    res_nhwc = None if residual is None else residual.contiguous(memory_format=torch.channels_last)

    def grid(meta):
        return (triton.cdiv(m, meta["BLOCK_M"]) * triton.cdiv(cout, meta["BLOCK_N"]),)

    # Unused pointer arguments get a real tensor the kernel never reads.
    torch.library.wrap_triton(_sepconv_bn_kernel)[grid](
        x_nhwc, taps, pw_t, taps if bias32 is None else bias32, x_nhwc if res_nhwc is None else res_nhwc, out,
        m, n, h, w, c, cout,
        RELU_INPUT=relu_input,
        RELU_OUTPUT=relu_output,
        HAS_BIAS=bias32 is not None,
        HAS_RESIDUAL=res_nhwc is not None,
        ALLOW_TF32=_allow_tf32(x),
        BF16_BY_HAND=x.dtype == torch.bfloat16 and _interpreted(),
    )


# ----------------------------------------------------------------------------------------------
# Registration

@torch.library.triton_op("xception_fast::sepconv_bn_triton", mutates_args=())
def _sepconv_bn_triton(x: torch.Tensor, dw_weight: torch.Tensor, pw_weight: torch.Tensor, bias: Optional[torch.Tensor],
                       relu_input: bool, relu_output: bool, residual: Optional[torch.Tensor]) -> torch.Tensor:
    cout = check_args(x, dw_weight, pw_weight, bias, residual)
    if x.dtype == torch.float64:
        raise ValueError("sepconv_bn (Triton kernel): x must be float32, float16 or bfloat16, got torch.float64")
    if x.device.type != "cuda" and not _interpreted():
        raise ValueError(f"sepconv_bn (Triton kernel): x must be a CUDA tensor (CPU tensors need "
                         f"TRITON_INTERPRET=1 before import), got {x.device}")
    n, _, h, w = x.shape
    if n == 0:
        return empty_output(x, cout)
    out = torch.empty((n, cout, h, w), dtype=x.dtype, device=x.device, memory_format=torch.channels_last)
    _launch(x, dw_weight, pw_weight, bias, relu_input, relu_output, residual, out)
    return out.contiguous(memory_format=suggest_memory_format(x))


register_autograd("xception_fast::sepconv_bn_triton", torch.ops.xception_fast.sepconv_bn_triton)


# ----------------------------------------------------------------------------------------------
# Python API

# sepconv_bn_triton(x, dw_weight, pw_weight, bias, relu_input, relu_output, residual): the registered
# op itself, so that eager calls, torch.compile and autograd all go through one entry point;
# xception_fast.sepconv_bn(..., backend="triton") calls it positionally.
sepconv_bn_triton = torch.ops.xception_fast.sepconv_bn_triton
