"""The fused ops' contracts: what every backend computes, what it accepts, what it returns.

The separable unit (``sepconv``):

    y = act_out( PW( act_mid( DW(act_in(x)) + dw_bias ) ) + pw_bias ) + residual

DW is a depthwise k x k convolution (k odd, stride 1 or 2, dilation d >= 1, zero padding p), PW a
pointwise 1x1 convolution; BatchNorm in eval mode is folded into them (``fold_bn``): a BatchNorm
after DW into ``dw_weight``/``dw_bias``, one after PW into ``pw_weight``/``pw_bias``.

This module imports no backend. It holds the reference (``sepconv_reference``, the one definition
every backend is tested against), the op's schema text, the argument checks of the Python call
paths (the fake and the Triton kernel; the C++ kernels make the same checks in C++), the output's
allocation and the list of backends.

The max-pool with the residual add after it (``max_pool_add``), the tail of Xception's
down-sampling blocks: ``max_pool2d(x, kernel_size, stride, padding) + residual``.
"""
import torch
import torch.nn.functional as F
from torch._prims_common import suggest_memory_format

__all__ = ["ACTIVATIONS", "BACKENDS", "KERNEL_SIZES", "STRIDES", "SCHEMA", "SCHEMA_KEEPING_DEPTHWISE",
           "sepconv_reference", "depthwise_reference", "fold_bn", "check_args", "output_size", "empty_output",
           "empty_depthwise", "MAX_POOL_ADD_SCHEMA", "max_pool_add_reference", "check_max_pool_add_args"]

# "auto": the CUDA kernel (else Triton) on a GPU, the C++ kernel on a CPU. "reference": the eager
# composition below, for checking.
BACKENDS = ("auto", "cpu", "cuda", "triton", "reference")
ACTIVATIONS = ("identity", "relu", "relu6", "hardswish")
# The GPU kernels unroll the taps at compile time, one instantiation per size.
KERNEL_SIZES = (1, 3, 5, 7)
STRIDES = (1, 2)

# The arguments of every implementation of the unit, in order: the C++ op
# (torch.ops.xception_fast.sepconv) and the Triton op (torch.ops.xception_fast.sepconv_triton) are
# defined from this one text. `packed`: the weights in a backend's own layout, made once per weight
# version by that backend's pack function; when given, the kernel reads them instead of dw_weight,
# dw_bias, pw_weight and pw_bias (which still give the shapes, and the gradients).
_ARGUMENTS = ("(Tensor x, Tensor dw_weight, Tensor? dw_bias, Tensor pw_weight, Tensor? pw_bias, Tensor? residual, "
              "int stride, int padding, int dilation, str act_in, str act_mid, str act_out, Tensor[]? packed)")
SCHEMA = _ARGUMENTS + " -> Tensor"
# The same unit returning its depthwise result act_mid(DW(act_in(x)) + dw_bias) as well (channels-last,
# in x's dtype: what eager's depthwise conv hands the pointwise one), which a backward keeps instead
# of recomputing it (torch.ops.xception_fast.sepconv_keeping_depthwise, CPU).
SCHEMA_KEEPING_DEPTHWISE = _ARGUMENTS + " -> (Tensor, Tensor)"
# torch.ops.xception_fast.max_pool_add (CPU): no dilation, floor mode, as nn.MaxPool2d's defaults.
MAX_POOL_ADD_SCHEMA = "(Tensor x, Tensor residual, int kernel_size, int stride, int padding) -> Tensor"


# ----------------------------------------------------------------------------------------------
# Reference

def activation(v, name):
    """``name`` (one of ACTIVATIONS) applied to ``v``, as the nn modules compute it."""
    if name == "identity":
        return v
    if name == "relu":
        return F.relu(v)
    if name == "relu6":
        return F.relu6(v)
    if name == "hardswish":
        return F.hardswish(v)
    raise ValueError(f"sepconv: an activation must be one of {ACTIVATIONS}, got {name!r}")


def sepconv_reference(x, dw_weight, dw_bias, pw_weight, pw_bias, residual, stride, padding, dilation, act_in,
                      act_mid, act_out):
    """The unit's semantics: eager PyTorch, one step at a time, in x's dtype on x's device (the
    weights rounded to x's dtype, as modules of that dtype hold them)."""
    d = depthwise_reference(x, dw_weight, dw_bias, stride, padding, dilation, act_in, act_mid)
    z = F.conv2d(d, pw_weight.to(x.dtype), None if pw_bias is None else pw_bias.to(x.dtype))
    z = activation(z, act_out)
    return z if residual is None else z + residual


def depthwise_reference(x, dw_weight, dw_bias, stride, padding, dilation, act_in, act_mid):
    """The unit's depthwise result, act_mid(DW(act_in(x)) + dw_bias), as sepconv_reference computes
    it (what sepconv_keeping_depthwise returns beside the output)."""
    a = activation(x, act_in)
    d = F.conv2d(a, dw_weight.to(x.dtype), None if dw_bias is None else dw_bias.to(x.dtype), stride=stride,
                 padding=padding, dilation=dilation, groups=x.shape[1])
    return activation(d, act_mid)


def max_pool_add_reference(x, residual, kernel_size, stride, padding):
    """The pool and add as eager runs them: two ops, in x's dtype on x's device."""
    return F.max_pool2d(x, kernel_size, stride, padding) + residual


def fold_bn(weight, bn_weight, bn_bias, running_mean, running_var, eps, conv_bias=None):
    """Fold eval-mode BatchNorm into the convolution before it, in float32 whatever the inputs'
    dtype: scale = gamma / sqrt(var + eps); W' = W * scale (per output channel); b' = beta + (b -
    mean) * scale. Works for the pointwise [Cout, C, 1, 1] and the depthwise [C, 1, k, k] weight.

    ``bn_weight`` / ``bn_bias`` may be None (affine=False). Returns float32 (weight, bias).
    """
    f32 = torch.float32
    scale = torch.rsqrt(running_var.to(f32) + eps)
    if bn_weight is not None:
        scale = scale * bn_weight.to(f32)
    shift = -running_mean.to(f32) if conv_bias is None else conv_bias.to(f32) - running_mean.to(f32)
    bias = shift * scale
    if bn_bias is not None:
        bias = bias + bn_bias.to(f32)
    return weight.to(f32) * scale.reshape(-1, *([1] * (weight.dim() - 1))), bias


# ----------------------------------------------------------------------------------------------
# Checks and allocation (the C++ kernels make the same checks, with the same messages, in
# csrc/sepconv_checks.cpp)

_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def output_size(size, kernel_size, stride, padding, dilation):
    """The depthwise conv's output extent along one axis, as nn.Conv2d computes it."""
    return (size + 2 * padding - dilation * (kernel_size - 1) - 1) // stride + 1


def _shape(t):
    return list(t.shape)


def check_args(x, dw_weight, dw_bias, pw_weight, pw_bias, residual, stride, padding, dilation, act_in, act_mid,
               act_out):
    """Raise an error naming the first bad argument; return the output shape [N, Cout, Ho, Wo].

    Written with torch._check so that it runs on fake tensors with symbolic shapes too.
    """
    for name, act in (("act_in", act_in), ("act_mid", act_mid), ("act_out", act_out)):
        torch._check_value(act in ACTIVATIONS, lambda: f"sepconv: {name} must be one of {ACTIVATIONS}, got {act!r}")
    torch._check_value(x.dim() == 4, lambda: f"sepconv: x must be a 4-D [N, C, H, W] tensor, got shape {_shape(x)}")
    torch._check_value(x.dtype in _DTYPES or (x.dtype == torch.float64 and x.device.type == "cpu"),
                       lambda: f"sepconv: x must be float32, float16 or bfloat16 (float64 on CPU), got {x.dtype}")
    n, c, h, w = x.shape
    torch._check_value(c >= 1 and h >= 1 and w >= 1, lambda: f"sepconv: x needs C, H, W >= 1, got shape {_shape(x)}")
    torch._check_value(dw_weight.dim() == 4 and dw_weight.shape[0] == c and dw_weight.shape[1] == 1
                       and dw_weight.shape[2] == dw_weight.shape[3],
                       lambda: f"sepconv: dw_weight must be a depthwise kernel of shape [C, 1, k, k] with C = {c}, "
                               f"got {_shape(dw_weight)}")
    k = dw_weight.shape[2]
    torch._check_value(k in KERNEL_SIZES,
                       lambda: f"sepconv: dw_weight's kernel size k must be one of {KERNEL_SIZES}, got {k}")
    torch._check_value(stride in STRIDES, lambda: f"sepconv: stride must be 1 or 2, got {stride}")
    torch._check_value(dilation >= 1, lambda: f"sepconv: dilation must be >= 1, got {dilation}")
    torch._check_value(padding >= 0, lambda: f"sepconv: padding must be >= 0, got {padding}")
    ho, wo = (output_size(s, k, stride, padding, dilation) for s in (h, w))
    torch._check_value(ho >= 1 and wo >= 1,
                       lambda: f"sepconv: x of size {h}x{w} is smaller than the dilated kernel "
                               f"({dilation * (k - 1) + 1}) with padding {padding}: the output would be empty")
    torch._check_value(pw_weight.dim() == 4 and pw_weight.shape[1] == c and pw_weight.shape[2] == 1
                       and pw_weight.shape[3] == 1 and pw_weight.shape[0] >= 1,
                       lambda: f"sepconv: pw_weight must be a pointwise kernel of shape [Cout, C, 1, 1] with C = {c}, "
                               f"got {_shape(pw_weight)}")
    cout = pw_weight.shape[0]
    for name, bias, size in (("dw_bias", dw_bias, c), ("pw_bias", pw_bias, cout)):
        if bias is not None:
            torch._check_value(bias.dim() == 1 and bias.shape[0] == size,
                               lambda: f"sepconv: {name} must have shape [{size}], got {_shape(bias)}")
    if residual is not None:
        torch._check_value(list(residual.shape) == [n, cout, ho, wo],
                           lambda: f"sepconv: residual must have the output's shape {[n, cout, ho, wo]}, "
                                   f"got {_shape(residual)}")
        torch._check_value(residual.dtype == x.dtype,
                           lambda: f"sepconv: residual must have x's dtype ({x.dtype}), got {residual.dtype}")
    for name, t in (("dw_weight", dw_weight), ("dw_bias", dw_bias), ("pw_weight", pw_weight), ("pw_bias", pw_bias),
                    ("residual", residual)):
        if t is None:
            continue
        torch._check_value(t.device == x.device, lambda: f"sepconv: {name} is on {t.device} but x is on {x.device}")
        if name != "residual":
            torch._check_value(t.dtype in (x.dtype, torch.float32),
                               lambda: f"sepconv: {name} must have x's dtype ({x.dtype}) or float32, got {t.dtype}")
    return [n, cout, ho, wo]


def empty_output(x, shape):
    """The output's allocation: x's memory format, as nn.Conv2d gives."""
    return torch.empty(shape, dtype=x.dtype, device=x.device, memory_format=suggest_memory_format(x))


def empty_depthwise(x, shape):
    """The kept depthwise result's allocation (SCHEMA_KEEPING_DEPTHWISE): [N, C, Ho, Wo] of the output
    ``shape``, channels-last, x's dtype."""
    n, _, ho, wo = shape
    return torch.empty((n, x.shape[1], ho, wo), dtype=x.dtype, device=x.device, memory_format=torch.channels_last)


def check_max_pool_add_args(x, residual, kernel_size, stride, padding):
    """The checks of max_pool_add (the CPU kernel makes the same, with the same messages); returns
    the output shape [N, C, Ho, Wo]."""
    torch._check_value(x.dim() == 4,
                       lambda: f"max_pool_add: x must be a 4-D [N, C, H, W] tensor, got shape {_shape(x)}")
    torch._check_value(x.dtype in _DTYPES + (torch.float64,),
                       lambda: f"max_pool_add: x must be float32, float64, float16 or bfloat16, got {x.dtype}")
    torch._check_value(kernel_size >= 1, lambda: f"max_pool_add: kernel_size must be >= 1, got {kernel_size}")
    torch._check_value(stride >= 1, lambda: f"max_pool_add: stride must be >= 1, got {stride}")
    torch._check_value(0 <= padding and 2 * padding <= kernel_size,
                       lambda: f"max_pool_add: padding must be between 0 and half of kernel_size ({kernel_size}), "
                               f"got {padding}")
    n, c, h, w = x.shape
    torch._check_value(c >= 1 and h >= 1 and w >= 1,
                       lambda: f"max_pool_add: x needs C, H, W >= 1, got shape {_shape(x)}")
    torch._check_value(h + 2 * padding >= kernel_size and w + 2 * padding >= kernel_size,
                       lambda: f"max_pool_add: x of size {h}x{w} is smaller than the window ({kernel_size}) with "
                               f"padding {padding}: the output would be empty")
    shape = [n, c] + [output_size(size, kernel_size, stride, padding, 1) for size in (h, w)]
    torch._check_value(list(residual.shape) == shape,
                       lambda: f"max_pool_add: residual must have the pooled shape {shape}, got {_shape(residual)}")
    torch._check_value(residual.dtype == x.dtype,
                       lambda: f"max_pool_add: residual must have x's dtype ({x.dtype}), got {residual.dtype}")
    torch._check_value(residual.device == x.device,
                       lambda: f"max_pool_add: residual is on {residual.device} but x is on {x.device}")
    return shape
