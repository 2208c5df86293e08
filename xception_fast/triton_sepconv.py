"""The fused unit in Triton: ``torch.ops.xception_fast.sepconv_triton``.

    y = act_out( PW( act_mid( DW(act_in(x)) + dw_bias ) ) + pw_bias ) + residual

The C++ op's contract (contract.SCHEMA, contract.check_args), for any GPU that Triton targets. It
is a second op, not a second kernel of xception_fast::sepconv: both run on CUDA tensors and a
dispatch key holds one kernel per op, while which of the two runs is the user's choice per call
or per fused module; and as an op of its own (torch.library.triton_op) torch.compile can trace
into its Triton kernel. One program computes a tile of NHWC output pixels x output channels and walks the input
channels in slices: each slice's depthwise result (k x k shifted loads, stride and dilation applied
to the addresses) is built in float32 registers, gets dw_bias and act_mid, is rounded to x's dtype
and goes straight into ``tl.dot`` with the slice's pointwise weights, so the depthwise
intermediate never reaches global memory. The weights come packed (gpu_pack.pack_gpu, shared with
the CUDA kernel): taps [k*k, C_pad] and biases in float32, the pointwise weight [Cout_pad, C_pad] in
x's dtype, zero-padded so that the kernel reads them without masks and the call does no weight work.

Under ``TRITON_INTERPRET=1`` (read by Triton when this module is imported) the kernel runs on CPU
tensors, with one small config instead of autotuning. Nothing here needs the C++ extension.
"""
import os

import torch
import triton
import triton.language as tl
from torch._prims_common import suggest_memory_format
from torch._subclasses.fake_tensor import is_fake
from triton.runtime.interpreter import InterpretedFunction

from .contract import ACTIVATIONS, SCHEMA, check_args, empty_output, sepconv_reference
from .gpu_pack import C_MULTIPLE, COUT_MULTIPLE, check_packed_gpu, pack_gpu
from .registration import register_autocast, register_autograd

__all__ = ["sepconv_triton", "sepconv_reference"]

OP_NAME = "xception_fast::sepconv_triton"


# ----------------------------------------------------------------------------------------------
# Reference: the op's semantics are contract.sepconv_reference (re-exported here), which the tests
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
# float32 tiles hold twice the bytes per element: fewer of them, and smaller. (num_stages matters
# only where the slice loop is innermost, k = 1: for larger k the loop over kernel rows inside it
# keeps the compiler from pipelining it, and the tiles are not multi-buffered.)
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

# The packed weights' padding is what lets the kernel read them without masks: every channel slice
# and every output-channel tile that a program touches lies inside [Cout_pad, C_pad].
assert all(C_MULTIPLE % cfg.kwargs["BLOCK_K"] == 0 and COUT_MULTIPLE % cfg.kwargs["BLOCK_N"] == 0
           for cfg in _GPU_CONFIGS + _INTERPRETER_CONFIGS)

# The kernel's activation codes (csrc/sepconv.h, Act).
_ACT_CODES = {name: code for code, name in enumerate(ACTIVATIONS)}


def _next_pow2(n):
    return 1 << max(int(n) - 1, 0).bit_length()


def _prune_configs(configs, named_args, **kwargs):
    """The configs for x's dtype, less tiles far wider than the problem (mostly masked work), so
    that tuning small shapes is cheap; where every tile is wider, the smallest one alone."""
    ours = _FP32_CONFIGS if named_args["x_ptr"].dtype == torch.float32 else _HALF_CONFIGS
    ours = [cfg for cfg in configs if cfg in ours] or list(configs)
    cap_m = max(32, _next_pow2(named_args["M"]))
    cap_n = max(64, _next_pow2(named_args["COUT_DIV"] * kwargs["COUT_VEC"]))
    cap_k = max(32, _next_pow2(named_args["C_DIV"] * kwargs["C_VEC"]))
    kept = [cfg for cfg in ours
            if cfg.kwargs["BLOCK_M"] <= cap_m and cfg.kwargs["BLOCK_N"] <= cap_n and cfg.kwargs["BLOCK_K"] <= cap_k]
    smallest = min(ours, key=lambda cfg: (cfg.kwargs["BLOCK_M"] * cfg.kwargs["BLOCK_N"], cfg.kwargs["BLOCK_K"]))
    return kept or [smallest]


# What the best tile depends on besides the tensors' dtypes (which Triton adds): the problem's
# sizes and every compile-time choice that changes the kernel's work per tile.
_AUTOTUNE_KEY = ["M", "H", "W", "C_DIV", "COUT_DIV", "stride", "padding", "dilation", "K", "C_VEC", "COUT_VEC",
                 "ACT_IN", "ACT_MID", "ACT_OUT", "HAS_RESIDUAL", "ALLOW_TF32"]


# XCEPTION_FAST_TRITON_AUTOTUNE=0 (read at import): one config per dtype, the first of each list
# that fits the problem, with no timing of the others: every new problem then costs one compile
# instead of one per config (what the test suite and a time-boxed GPU check can afford).
AUTOTUNE_ENV = "XCEPTION_FAST_TRITON_AUTOTUNE"


def _autotune(fn):
    if isinstance(fn, InterpretedFunction):
        return triton.autotune(configs=_INTERPRETER_CONFIGS, key=[])(fn)
    prune = _prune_configs
    if os.environ.get(AUTOTUNE_ENV, "1") == "0":
        def prune(configs, named_args, **kwargs):
            return _prune_configs(configs, named_args, **kwargs)[:1]
    return triton.autotune(configs=_GPU_CONFIGS, key=_AUTOTUNE_KEY, prune_configs_by={"early_config_prune": prune})(fn)


@triton.jit
def _activation(v, ACT: tl.constexpr):
    """Activation ``ACT`` (identity, relu, relu6, hardswish) of float32 v, as torch computes it;
    the comparisons keep NaN, as torch.relu and relu6 do."""
    if ACT == 1:
        v = tl.where(v < 0.0, 0.0, v)
    elif ACT == 2:
        v = tl.where(v < 0.0, 0.0, tl.where(v > 6.0, 6.0, v))
    elif ACT == 3:
        r = v + 3.0
        r = tl.where(r < 0.0, 0.0, tl.where(r > 6.0, 6.0, r))
        v = tl.math.div_rn(v * r, 6.0)  # x * relu6(x + 3) / 6, correctly rounded as torch's division
    return v


@triton.jit
def _round(v, dtype: tl.constexpr, BF16_BY_HAND: tl.constexpr):
    """float32 v rounded to nearest even in dtype. Under BF16_BY_HAND (the interpreter, bfloat16)
    the result is the bfloat16 value carried in float32: the interpreter's float32 -> bfloat16 cast
    truncates, and its tl.dot multiplies bfloat16 operands as their raw bits."""
    if BF16_BY_HAND:
        bits = v.to(tl.uint32, bitcast=True)
        bits = (bits + (0x7FFF + ((bits >> 16) & 1))) & 0xFFFF0000
        v = tl.where(v != v, v, bits.to(tl.float32, bitcast=True))  # a NaN stays a NaN
    else:
        v = v.to(dtype)
    return v


@triton.jit
def _depthwise_row(d, x_ptr, taps_ptr, row, ih, iw0, kh, m_ok, offs_k, k_ok, H, W, C, C_PAD, dilation,
                   K: tl.constexpr, ACT_IN: tl.constexpr):
    """d plus the taps of kernel row kh, whose input row is ih (row: its NHWC offset at column
    iw0), for the pixels and channels of d's tile."""
    h_ok = m_ok & (ih >= 0) & (ih < H)
    for kw in tl.static_range(K):
        iw = iw0 + kw * dilation
        ok = h_ok & (iw >= 0) & (iw < W)
        src = row + kw * dilation * C
        v = tl.load(x_ptr + (src[:, None] + offs_k[None, :]), mask=ok[:, None] & k_ok[None, :], other=0.0)
        # act_in of the zero padding is zero for every activation, so masking first is right.
        v = _activation(v.to(tl.float32), ACT_IN)
        tap = tl.load(taps_ptr + ((kh * K + kw) * C_PAD + offs_k))  # no mask: zero past C
        d += v * tap[None, :]
    return d


@_autotune
@triton.jit
def _sepconv_kernel(
    x_ptr,  # [N, H, W, C] x's dtype (NHWC)
    taps_ptr,  # [K * K, C_PAD] float32, tap (kh, kw) at row kh * K + kw
    dw_bias_ptr,  # [C_PAD] float32
    pw_ptr,  # [COUT_PAD, C_PAD] x's dtype: B transposed, K-major
    pw_bias_ptr,  # [COUT_PAD] float32
    res_ptr,  # [N, Ho, Wo, Cout] x's dtype (read only if HAS_RESIDUAL)
    out_ptr,  # [N, Ho, Wo, Cout] x's dtype
    M,  # N * Ho * Wo output pixels
    H, W, Ho, Wo,
    C_DIV,  # C // C_VEC: C = C_DIV * C_VEC, so that the compiler knows C's alignment (see the launcher)
    COUT_DIV,  # Cout // COUT_VEC
    C_PAD,  # the packed weights' row length (a multiple of 64)
    stride, padding, dilation,
    K: tl.constexpr,  # depthwise kernel size
    C_VEC: tl.constexpr,
    COUT_VEC: tl.constexpr,
    ACT_IN: tl.constexpr,
    ACT_MID: tl.constexpr,
    ACT_OUT: tl.constexpr,
    HAS_RESIDUAL: tl.constexpr,
    ALLOW_TF32: tl.constexpr,  # float32 x only: TF32 tensor cores, as cuDNN under allow_tf32
    BF16_BY_HAND: tl.constexpr,  # only under the interpreter, for bfloat16 x
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    C = C_DIV * C_VEC
    Cout = COUT_DIV * COUT_VEC
    # Output-channel tiles of one pixel tile are neighbours in launch order, so the pixel tile's
    # input rows are still in L2 when the other channel tiles recompute its depthwise result.
    pid = tl.program_id(0)
    num_pid_n = tl.cdiv(Cout, BLOCK_N)
    pid_m = pid // num_pid_n
    pid_n = pid % num_pid_n

    offs_m = pid_m.to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)  # int64: N*H*W*C may exceed 2**31
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)  # < COUT_PAD: BLOCK_N divides 256
    m_ok = offs_m < M
    ow = offs_m % Wo
    rest = offs_m // Wo
    oh = rest % Ho
    ih0 = oh * stride - padding  # the input row and column of tap (0, 0), maybe outside the map
    iw0 = ow * stride - padding
    pixel0 = ((rest // Ho) * H + ih0) * W + iw0  # its NHWC pixel index, int64
    row0 = pixel0 * C

    image_row = W.to(tl.int64) * C  # the NHWC distance between two input rows

    w_cols = pw_ptr + offs_n[None, :] * C_PAD

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, C, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)  # < C_PAD: BLOCK_K divides 64
        # The slice's pointwise weights, [BLOCK_K, BLOCK_N] with K contiguous (a transposed B tile),
        # from the padded layout without masks; loaded first, so that the depthwise phase hides
        # their latency.
        b = tl.load(w_cols + offs_k[:, None])
        k_ok = offs_k < C
        d = tl.zeros((BLOCK_M, BLOCK_K), dtype=tl.float32)
        if K == 1:  # no row loop: the slice loop is innermost, and the compiler may pipeline it
            d = _depthwise_row(d, x_ptr, taps_ptr, row0, ih0, iw0, 0, m_ok, offs_k, k_ok, H, W, C, C_PAD, dilation,
                               K, ACT_IN)
        else:
            # The kernel's rows in a loop, their taps unrolled: K tile loads in flight rather than
            # K * K, which neither the registers nor a software pipeline through shared memory
            # would hold for k = 5 or 7.
            for kh in range(K):
                d = _depthwise_row(d, x_ptr, taps_ptr, row0 + (kh * dilation) * image_row, ih0 + kh * dilation,
                                   iw0, kh, m_ok, offs_k, k_ok, H, W, C, C_PAD, dilation, K, ACT_IN)
        d = _activation(d + tl.load(dw_bias_ptr + offs_k)[None, :], ACT_MID)
        # The MMA operand is the depthwise result rounded to x's dtype (float32 stays float32), as
        # eager rounds the depthwise conv's output; channels past C are exact zeros.
        a = _round(d, x_ptr.dtype.element_ty, BF16_BY_HAND)
        if BF16_BY_HAND:
            b = b.to(tl.float32)  # exact; products of bfloat16 values are exact in float32
        if ALLOW_TF32:
            acc = tl.dot(a, b, acc, input_precision="tf32")
        else:
            acc = tl.dot(a, b, acc, input_precision="ieee")

    acc = _activation(acc + tl.load(pw_bias_ptr + offs_n)[None, :], ACT_OUT)
    out_offs = offs_m[:, None] * Cout + offs_n[None, :]
    out_mask = m_ok[:, None] & (offs_n < Cout)[None, :]
    if HAS_RESIDUAL:
        acc += tl.load(res_ptr + out_offs, mask=out_mask, other=0.0).to(tl.float32)
    out = _round(acc, out_ptr.dtype.element_ty, BF16_BY_HAND).to(out_ptr.dtype.element_ty)
    tl.store(out_ptr + out_offs, out, mask=out_mask)


# ----------------------------------------------------------------------------------------------
# Launchers

def _interpreted():
    return isinstance(_sepconv_kernel.fn, InterpretedFunction)


def _allow_tf32(x):
    return x.dtype == torch.float32 and x.device.type == "cuda" and torch.backends.cudnn.allow_tf32


def _alignment(n):
    """The largest power of two that divides n, up to 16: the channel counts are passed as
    n // that * that, so that the compiler can vectorize rows of C (or Cout) elements, such as
    Xception's 728, that its own specialization (multiples of 16 only) would not."""
    return min(n & -n, 16)


def _launch(x, taps, dw_bias, pw, pw_bias, residual, out, k, stride, padding, dilation, act_in, act_mid, act_out):
    """Run the kernel into ``out`` ([N, Cout, Ho, Wo], channels_last contiguous, N >= 1); x and
    residual are NHWC (channels_last contiguous), the weights packed."""
    n, c, h, w = x.shape
    _, cout, ho, wo = out.shape
    m = n * ho * wo
    c_vec, cout_vec = _alignment(c), _alignment(cout)

    def grid(meta):
        return (triton.cdiv(m, meta["BLOCK_M"]) * triton.cdiv(cout, meta["BLOCK_N"]),)

    # An absent residual gets a real tensor that the kernel never reads.
    torch.library.wrap_triton(_sepconv_kernel)[grid](
        x, taps, dw_bias, pw, pw_bias, out if residual is None else residual, out,
        m, h, w, ho, wo, c // c_vec, cout // cout_vec, taps.shape[1], stride, padding, dilation,
        K=k,
        C_VEC=c_vec,
        COUT_VEC=cout_vec,
        ACT_IN=_ACT_CODES[act_in],
        ACT_MID=_ACT_CODES[act_mid],
        ACT_OUT=_ACT_CODES[act_out],
        HAS_RESIDUAL=residual is not None,
        ALLOW_TF32=_allow_tf32(x),
        BF16_BY_HAND=x.dtype == torch.bfloat16 and _interpreted(),
    )


def _packed_weights(packed, x, dw_weight, dw_bias, pw_weight, pw_bias, cout):
    """(taps, dw_bias, pw, pw_bias) in the GPU layout: ``packed``'s, checked, or packed now."""
    if packed is None:
        return pack_gpu(dw_weight, dw_bias, pw_weight, pw_bias, x.dtype)[1:]
    if not (isinstance(packed, (list, tuple)) and len(packed) == 5 and is_fake(packed[0])):
        check_packed_gpu(packed, x, x.shape[1], cout, dw_weight.shape[2])
    # else: traced with fake tensors (torch.compile), where the header's values cannot be read; the
    # shapes are still those the kernel needs.
    return packed[1:]


# ----------------------------------------------------------------------------------------------
# Registration

def _sepconv_triton(x, dw_weight, dw_bias, pw_weight, pw_bias, residual, stride, padding, dilation, act_in, act_mid,
                    act_out, packed):
    shape = check_args(x, dw_weight, dw_bias, pw_weight, pw_bias, residual, stride, padding, dilation, act_in,
                       act_mid, act_out)
    if x.dtype == torch.float64:
        raise ValueError("sepconv (Triton kernel): x must be float32, float16 or bfloat16, got torch.float64 "
                         "(float64 runs on the CPU backend)")
    if x.device.type != "cuda" and not _interpreted():
        raise ValueError(f"sepconv (Triton kernel): x must be a CUDA tensor (CPU tensors need "
                         f"TRITON_INTERPRET=1 before xception_fast.triton_sepconv is imported), got {x.device}")
    taps, dw_b, pw, pw_b = _packed_weights(packed, x, dw_weight, dw_bias, pw_weight, pw_bias, shape[1])
    if shape[0] == 0:
        return empty_output(x, shape)
    out = torch.empty(shape, dtype=x.dtype, device=x.device, memory_format=torch.channels_last)
    res = None if residual is None else residual.contiguous(memory_format=torch.channels_last)
    if not (_interpreted() and is_fake(out)):  # interpreted kernels run on real tensors only
        _launch(x.contiguous(memory_format=torch.channels_last), taps, dw_b, pw, pw_b, res, out, dw_weight.shape[2],
                stride, padding, dilation, act_in, act_mid, act_out)
    return out.contiguous(memory_format=suggest_memory_format(x))


def _define_op(fn):
    """The op, defined from contract.SCHEMA, implemented by ``fn``.

    torch.library.triton_op makes the kernel visible to torch.compile, which then traces ``fn``
    instead of calling the op. Before pytorch/pytorch#188722 (2026; torch 2.11 is older),
    triton_op ignores its ``schema`` argument and infers one from annotations, which cannot spell
    ``Tensor[]? packed`` (nor ``int``), so it raises; the op is then a torch.library.custom_op of
    the same schema with ``fn`` as its fake: opaque to torch.compile, the same otherwise. So it is
    under the interpreter too, whose kernels torch.compile cannot trace."""
    if not _interpreted():
        try:
            return torch.library.triton_op(OP_NAME, fn, mutates_args=(), schema=SCHEMA)
        except ValueError as error:
            if "infer_schema" not in str(error):
                raise
    from torch._library.triton import set_wrap_triton_enabled

    def kernel(*args, **kwargs):
        with set_wrap_triton_enabled(False):  # launch the kernel itself, as triton_op's kernel does
            return fn(*args, **kwargs)

    op = torch.library.custom_op(OP_NAME, kernel, mutates_args=(), schema=SCHEMA)
    op.register_fake(fn)
    return op


_define_op(_sepconv_triton)
_registered = str(torch.ops.xception_fast.sepconv_triton.default._schema)
if _registered != str(torch._C.parse_schema(OP_NAME + SCHEMA)):
    raise RuntimeError(f"{OP_NAME}: registered with schema {_registered}, not contract.SCHEMA {SCHEMA}")
_lib = torch.library.Library("xception_fast", "FRAGMENT")
register_autograd(OP_NAME, torch.ops.xception_fast.sepconv_triton)
register_autocast(_lib, "sepconv_triton", torch.ops.xception_fast.sepconv_triton)


# ----------------------------------------------------------------------------------------------
# Python API

# sepconv_triton(x, dw_weight, dw_bias, pw_weight, pw_bias, residual, stride, padding, dilation,
# act_in, act_mid, act_out, packed): the registered op itself (contract.SCHEMA), so that eager
# calls, torch.compile and autograd all go through one entry point; xception_fast.sepconv(...,
# backend="triton") calls it positionally. ``packed``: gpu_pack.pack_gpu's output for x's dtype.
sepconv_triton = torch.ops.xception_fast.sepconv_triton
