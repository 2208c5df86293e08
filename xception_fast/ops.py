"""The fused separable-conv + BatchNorm op.

    y = act_out(PW(DW(act_in(x))) + bias) + residual

DW is a depthwise 3x3 conv (stride 1, padding 1), PW a pointwise 1x1 conv whose weights carry the
folded eval-mode BatchNorm, act_in / act_out ReLU or identity. In this module: the reference
(the op's semantics, that every backend is tested against), the argument checks, the
registrations (fake and autograd of the C++ op), and the Python API.
"""
import os

import torch
import torch.nn.functional as F
from torch._prims_common import suggest_memory_format

from . import _extension
from .autograd import register_autograd

__all__ = ["sepconv_bn", "sepconv_bn_reference", "fold_bn", "BACKENDS"]

BACKENDS = ("auto", "cpu", "cuda", "triton", "reference")


# ----------------------------------------------------------------------------------------------
# Reference

def sepconv_bn_reference(x, dw_weight, pw_weight, bias=None, relu_input=False, relu_output=False, residual=None):
    """The op's semantics in eager PyTorch, computed in x's dtype on x's device."""
    a = F.relu(x) if relu_input else x
    d = F.conv2d(a, dw_weight.to(x.dtype), padding=1, groups=x.shape[1])
    z = F.conv2d(d, pw_weight.to(x.dtype), None if bias is None else bias.to(x.dtype))
    if relu_output:
        z = F.relu(z)
    return z if residual is None else z + residual


def fold_bn(pw_weight, bn_weight, bn_bias, running_mean, running_var, eps, pw_bias=None):
    """Fold eval-mode BatchNorm into the preceding pointwise conv, in float32 whatever the inputs'
    dtype: scale = gamma / sqrt(var + eps); W' = W * scale; b' = beta + (b - mean) * scale.

    ``bn_weight`` / ``bn_bias`` may be None (affine=False). Returns float32 (weight, bias).
    """
    f32 = torch.float32
    scale = torch.rsqrt(running_var.to(f32) + eps)
    if bn_weight is not None:
        scale = scale * bn_weight.to(f32)
    shift = -running_mean.to(f32) if pw_bias is None else pw_bias.to(f32) - running_mean.to(f32)
    bias = shift * scale
    if bn_bias is not None:
        bias = bias + bn_bias.to(f32)
    return pw_weight.to(f32) * scale.reshape(-1, 1, 1, 1), bias


# ----------------------------------------------------------------------------------------------
# Argument checks (the C++ kernels make the same checks in csrc/sepconv_bn.cpp)

_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def check_args(x, dw_weight, pw_weight, bias, residual):
    for name, t in (("x", x), ("dw_weight", dw_weight), ("pw_weight", pw_weight)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"sepconv_bn: {name} must be a Tensor, got {type(t).__name__}")
    for name, t in (("bias", bias), ("residual", residual)):
        if t is not None and not isinstance(t, torch.Tensor):
            raise TypeError(f"sepconv_bn: {name} must be a Tensor or None, got {type(t).__name__}")
    if x.dim() != 4:
        raise ValueError(f"sepconv_bn: x must be a 4-D [N, C, H, W] tensor, got shape {list(x.shape)}")
    if not (x.dtype in _DTYPES or (x.dtype == torch.float64 and x.device.type == "cpu")):
        raise ValueError(f"sepconv_bn: x must be float32, float16 or bfloat16 (float64 on CPU), got {x.dtype}")
    n, c, h, w = x.shape
    if c < 1 or h < 1 or w < 1:
        raise ValueError(f"sepconv_bn: x needs C, H, W >= 1, got shape {list(x.shape)}")
    if tuple(dw_weight.shape) != (c, 1, 3, 3):
        raise ValueError(f"sepconv_bn: dw_weight must be a depthwise 3x3 kernel of shape [C, 1, 3, 3] = "
                         f"[{c}, 1, 3, 3], got {list(dw_weight.shape)}")
    if pw_weight.dim() != 4 or pw_weight.shape[1] != c or tuple(pw_weight.shape[2:]) != (1, 1) or pw_weight.shape[0] < 1:
        raise ValueError(f"sepconv_bn: pw_weight must be a pointwise kernel of shape [Cout, C, 1, 1] with C = {c}, "
                         f"got {list(pw_weight.shape)}")
    cout = pw_weight.shape[0]
    if bias is not None and tuple(bias.shape) != (cout,):
        raise ValueError(f"sepconv_bn: bias must have shape [Cout] = [{cout}], got {list(bias.shape)}")
    if residual is not None:
        if tuple(residual.shape) != (n, cout, h, w):
            raise ValueError(f"sepconv_bn: residual must have the output's shape {[n, cout, h, w]}, "
                             f"got {list(residual.shape)}")
        if residual.dtype != x.dtype:
            raise ValueError(f"sepconv_bn: residual must have x's dtype ({x.dtype}), got {residual.dtype}")
    for name, t in (("dw_weight", dw_weight), ("pw_weight", pw_weight), ("bias", bias), ("residual", residual)):
        if t is None:
            continue
        if t.device != x.device:
            raise ValueError(f"sepconv_bn: {name} is on {t.device} but x is on {x.device}")
        if name != "residual" and t.dtype not in (x.dtype, torch.float32):
            raise ValueError(f"sepconv_bn: {name} must have x's dtype ({x.dtype}) or float32, got {t.dtype}")
    return cout


def empty_output(x, cout):
    """The output tensor's allocation: x's memory format, as nn.Conv2d gives."""
    n, _, h, w = x.shape
    return torch.empty((n, cout, h, w), dtype=x.dtype, device=x.device,
                       memory_format=suggest_memory_format(x))


# ----------------------------------------------------------------------------------------------
# Registration of the C++ op (schema and kernels in csrc/)

_extension.load()


@torch.library.register_fake("xception_fast::sepconv_bn")
def _sepconv_bn_fake(x, dw_weight, pw_weight, bias, relu_input, relu_output, residual):
    return empty_output(x, check_args(x, dw_weight, pw_weight, bias, residual))


register_autograd("xception_fast::sepconv_bn", torch.ops.xception_fast.sepconv_bn)


# ----------------------------------------------------------------------------------------------
# Python API

def _triton_usable(device):
    return device.type == "cuda" or os.environ.get("TRITON_INTERPRET", "0") == "1"


def resolve_backend(backend, device):
    """The concrete backend for ``backend`` on ``device``; never silently another one."""
    if backend not in BACKENDS:
        raise ValueError(f"sepconv_bn: backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "auto":
        if device.type == "cuda":
            return "cuda" if _extension.has_cuda_kernel() else "triton"
        return "cpu" if device.type == "cpu" else "reference"
    if backend == "cpu" and device.type != "cpu":
        raise ValueError(f"sepconv_bn: backend='cpu' needs CPU tensors, x is on {device}")
    if backend == "cuda":
        if device.type != "cuda":
            raise ValueError(f"sepconv_bn: backend='cuda' needs CUDA tensors, x is on {device}")
        if not _extension.has_cuda_kernel():
            raise RuntimeError("sepconv_bn: backend='cuda' was asked for, but the extension was built without its "
                               "CUDA kernel (no CUDA toolkit at build time, or XCEPTION_FAST_SKIP_CUDA set)")
    if backend == "triton" and not _triton_usable(device):
        raise ValueError(f"sepconv_bn: backend='triton' needs CUDA tensors (or TRITON_INTERPRET=1), x is on {device}")
    return backend


def sepconv_bn(x, dw_weight, pw_weight, bias=None, *, relu_input=False, relu_output=False, residual=None,
               backend="auto"):
    """One Xception separable unit in one kernel: ``act_out(PW(DW(act_in(x))) + bias) + residual``.

    Args:
        x: [N, C, H, W], float32 / float16 / bfloat16, NCHW or channels_last (other strides are
            copied). The output has x's memory format.
        dw_weight: [C, 1, 3, 3] depthwise kernel (stride 1, padding 1).
        pw_weight: [Cout, C, 1, 1] pointwise kernel, usually with BatchNorm folded in (:func:`fold_bn`).
        bias: [Cout] or None.
        relu_input / relu_output: apply ReLU to x before the depthwise conv / to the result before
            the residual add.
        residual: None or a tensor of the output's shape, added last.
        backend: "auto" (CUDA kernel, else Triton, on a GPU; the C++ kernel on CPU), "cpu", "cuda",
            "triton" or "reference" (the eager two-step, for checking).

    Weights and bias may be float32 for half-precision x. Differentiable in x, weights, bias and
    residual. Nothing passed in is modified.
    """
    check_args(x, dw_weight, pw_weight, bias, residual)
    if not isinstance(relu_input, bool) or not isinstance(relu_output, bool):
        raise TypeError("sepconv_bn: relu_input and relu_output must be bool")
    chosen = resolve_backend(backend, x.device)
    if chosen == "reference":
        return sepconv_bn_reference(x, dw_weight, pw_weight, bias, relu_input, relu_output, residual)
    if chosen == "triton":
        from . import triton_sepconv

        op = triton_sepconv.sepconv_bn_triton
    else:
        op = torch.ops.xception_fast.sepconv_bn
    return op(x, dw_weight, pw_weight, bias, relu_input, relu_output, residual)
