"""The fused separable unit as a PyTorch op, and its Python API.

    y = act_out( PW( act_mid( DW(act_in(x)) + dw_bias ) ) + pw_bias ) + residual

``torch.ops.xception_fast.sepconv`` is defined here (its schema is contract.SCHEMA), with its fake,
its autograd and its autocast rule; its CPU and CUDA kernels are C++ (xception_fast/csrc), loaded
on the first call that needs them. ``torch.ops.xception_fast.sepconv_triton`` is the Triton
implementation of the same schema (xception_fast.triton_sepconv). ``sepconv`` and ``sepconv_bn``
below choose between them.

``torch.ops.xception_fast.max_pool_add`` is the max-pool and the residual add after it in one pass
(a C++ CPU kernel; contract.MAX_POOL_ADD_SCHEMA), with its fake and autograd; ``max_pool_add``
below calls it.
"""
import os

import torch
from torch._prims_common import suggest_memory_format

from . import _extension
from .contract import (BACKENDS, MAX_POOL_ADD_SCHEMA, SCHEMA, SCHEMA_KEEPING_DEPTHWISE, check_args,
                       check_max_pool_add_args, empty_depthwise, empty_output, fold_bn, sepconv_reference)
from .registration import call_below_autograd_and_autocast, register_autocast, register_autograd

__all__ = ["sepconv", "sepconv_bn", "pack_weights", "max_pool_add", "sepconv_reference", "fold_bn", "BACKENDS"]

# ----------------------------------------------------------------------------------------------
# Registration

_lib = torch.library.Library("xception_fast", "DEF")
_lib.define("sepconv" + SCHEMA)
_lib.define("sepconv_keeping_depthwise" + SCHEMA_KEEPING_DEPTHWISE)
# The CPU kernel's weights in its own layout (see csrc/cpu/sepconv_cpu.cpp): the product's strategy
# ("auto", "tiled" or "materialized") is chosen here, once per weight version; output_size, the
# output's [N, Cout, Ho, Wo], lets oneDNN's weights be laid out for the shape they will meet.
_lib.define("pack_cpu(Tensor dw_weight, Tensor? dw_bias, Tensor pw_weight, Tensor? pw_bias, ScalarType dtype, "
            "str strategy='auto', int[]? output_size=None) -> Tensor[]")
# The backward of the depthwise conv of act_in(x) (the unit's backward on a CPU): the gradients of x
# and of dw_weight from the gradient at the depthwise output, act_in applied as x is read.
_lib.define("depthwise_backward(Tensor grad, Tensor x, Tensor dw_weight, int stride, int padding, int dilation, "
            "str act_in, bool[2] output_mask) -> (Tensor, Tensor)")
# The width in bytes of the vectors the CPU kernel's channel loops run on this machine: 64 (AVX-512),
# 32 (AVX2) or 16 (any other CPU); ATen's choice of instruction set (ATEN_CPU_CAPABILITY) caps it.
_lib.define("cpu_vector_bytes() -> int")
_lib.define("max_pool_add" + MAX_POOL_ADD_SCHEMA)
_extension.install_loaders("xception_fast", {"sepconv": ("CPU", "CUDA"), "sepconv_keeping_depthwise": ("CPU",),
                                             "pack_cpu": ("CPU",), "depthwise_backward": ("CPU",),
                                             "max_pool_add": ("CPU",),
                                             "cpu_vector_bytes": ("CompositeExplicitAutograd",)})


@torch.library.register_fake("xception_fast::sepconv")
def _sepconv_fake(x, dw_weight, dw_bias, pw_weight, pw_bias, residual, stride, padding, dilation, act_in, act_mid,
                  act_out, packed):
    return empty_output(x, check_args(x, dw_weight, dw_bias, pw_weight, pw_bias, residual, stride, padding,
                                      dilation, act_in, act_mid, act_out))


@torch.library.register_fake("xception_fast::sepconv_keeping_depthwise")
def _sepconv_keeping_depthwise_fake(x, dw_weight, dw_bias, pw_weight, pw_bias, residual, stride, padding, dilation,
                                    act_in, act_mid, act_out, packed):
    shape = check_args(x, dw_weight, dw_bias, pw_weight, pw_bias, residual, stride, padding, dilation, act_in, act_mid,
                       act_out)
    return empty_output(x, shape), empty_depthwise(x, shape)


@torch.library.register_fake("xception_fast::depthwise_backward")
def _depthwise_backward_fake(grad, x, dw_weight, stride, padding, dilation, act_in, output_mask):
    acc_dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
    grad_x = torch.empty_like(x, memory_format=suggest_memory_format(x)) if output_mask[0] else None
    grad_w = dw_weight.new_empty(dw_weight.shape, dtype=acc_dtype) if output_mask[1] else None
    return grad_x, grad_w


@torch.library.register_fake("xception_fast::max_pool_add")
def _max_pool_add_fake(x, residual, kernel_size, stride, padding):
    return empty_output(x, check_max_pool_add_args(x, residual, kernel_size, stride, padding))


def _max_pool_add_setup_context(ctx, inputs, output):
    x, _, kernel_size, stride, padding = inputs
    ctx.pool = (kernel_size, stride, padding)
    ctx.save_for_backward(x)


def _max_pool_add_backward(ctx, grad):
    # The forward kept no indices: eager's max-pool finds them again, so the gradient goes where
    # eager's would (the first of equal maxima).
    (x,) = ctx.saved_tensors
    kernel_size, stride, padding = ctx.pool
    grad_x = None
    if ctx.needs_input_grad[0]:
        pool = ([kernel_size] * 2, [stride] * 2, [padding] * 2, [1, 1], False)
        _, indices = torch.ops.aten.max_pool2d_with_indices(x, *pool)
        grad_x = torch.ops.aten.max_pool2d_with_indices_backward(grad, x, *pool, indices)
    return grad_x, grad if ctx.needs_input_grad[1] else None, None, None, None


torch.library.register_autograd("xception_fast::max_pool_add", _max_pool_add_backward,
                                setup_context=_max_pool_add_setup_context)
register_autograd("xception_fast::sepconv", torch.ops.xception_fast.sepconv)
register_autograd("xception_fast::sepconv_keeping_depthwise", torch.ops.xception_fast.sepconv, keeps_depthwise=True)
register_autocast(_lib, "sepconv", torch.ops.xception_fast.sepconv)
register_autocast(_lib, "sepconv_keeping_depthwise", torch.ops.xception_fast.sepconv_keeping_depthwise)


# ----------------------------------------------------------------------------------------------
# Python API

def _triton_usable(device):
    return device.type == "cuda" or os.environ.get("TRITON_INTERPRET", "0") == "1"


def resolve_backend(backend, device):
    """The concrete backend for ``backend`` on ``device``; never silently another one."""
    if backend not in BACKENDS:
        raise ValueError(f"sepconv: backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "auto":
        if device.type == "cuda":
            return "cuda" if _extension.has_cuda_kernel() else "triton"
        return "cpu" if device.type == "cpu" else "reference"
    if backend == "cpu" and device.type != "cpu":
        raise ValueError(f"sepconv: backend='cpu' needs CPU tensors, x is on {device}")
    if backend == "cuda":
        if device.type != "cuda":
            raise ValueError(f"sepconv: backend='cuda' needs CUDA tensors, x is on {device}")
        if not _extension.has_cuda_kernel():
            raise RuntimeError("sepconv: backend='cuda' was asked for, but the extension was built without its "
                               "CUDA kernel (no CUDA toolkit at build time, or XCEPTION_FAST_SKIP_CUDA set)")
    if backend == "triton" and not _triton_usable(device):
        raise ValueError(f"sepconv: backend='triton' needs CUDA tensors (or TRITON_INTERPRET=1), x is on {device}")
    return backend


def backend_op(backend):
    """The op that runs a concrete backend (not "reference")."""
    if backend == "triton":
        from . import triton_sepconv

        return triton_sepconv.sepconv_triton
    return torch.ops.xception_fast.sepconv


def run_backend(backend, args, recompute_depthwise=False):
    """The unit on a concrete backend (not "reference") with the schema's arguments ``args``: on a
    CPU, where a gradient is needed and ``recompute_depthwise`` is not set, through the op that
    keeps its depthwise result for the backward; where none is, the C++ op's kernel without the
    Python layers around it (registration.call_below_autograd_and_autocast)."""
    needs_grad = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in args[:6])
    if backend == "cpu" and not recompute_depthwise and needs_grad:
        return torch.ops.xception_fast.sepconv_keeping_depthwise(*args)[0]
    if backend == "triton" or needs_grad or torch.compiler.is_compiling():
        return backend_op(backend)(*args)
    return call_below_autograd_and_autocast(backend_op(backend), args)


def _check_types(**tensors):
    for name, t in tensors.items():
        if t is not None and not isinstance(t, torch.Tensor):
            raise TypeError(f"sepconv: {name} must be a Tensor or None, got {type(t).__name__}")


def _default_padding(dw_weight, dilation):
    return dilation * (dw_weight.shape[-1] - 1) // 2


def sepconv(x, dw_weight, pw_weight, pw_bias=None, *, dw_bias=None, stride=1, padding=None, dilation=1,
            act_in="identity", act_mid="identity", act_out="identity", residual=None, packed=None, backend="auto",
            recompute_depthwise=False):
    """One depthwise-separable unit in one kernel:
    ``act_out(PW(act_mid(DW(act_in(x)) + dw_bias)) + pw_bias) + residual``.

    Args:
        x: [N, C, H, W], float32 / float16 / bfloat16 (float64 on CPU), NCHW or channels_last
            (other strides are copied). The output has x's memory format.
        dw_weight: [C, 1, k, k] depthwise kernel, k in (1, 3, 5, 7); with a BatchNorm after it
            folded in (:func:`fold_bn`), and ``dw_bias``: [C] or None.
        pw_weight: [Cout, C, 1, 1] pointwise kernel, usually with BatchNorm folded in; ``pw_bias``:
            [Cout] or None.
        stride: 1 or 2; padding: zeros, default ``dilation * (k - 1) // 2``; dilation >= 1.
        act_in, act_mid, act_out: "identity", "relu", "relu6" or "hardswish": on x, between the
            convs, and on the result before the residual add.
        residual: None or a tensor of the output's shape [N, Cout, Ho, Wo], added last.
        packed: the weights in the backend's own layout (:func:`pack_weights`), made once per
            weight version, or None (the kernel then packs them on every call).
        backend: "auto" (CUDA kernel, else Triton, on a GPU; the C++ kernel on CPU), "cpu",
            "cuda", "triton" or "reference" (the eager composition, for checking).
        recompute_depthwise: whether the backward recomputes the depthwise result rather than
            keeping it from the forward (the C++ CPU kernel keeps it when a gradient is needed,
            unless this is set; the GPU backends always recompute it).

    Weights and biases may be float32 for half-precision x. Differentiable in x, weights, biases
    and residual. Nothing passed in is modified.
    """
    _check_types(x=x, dw_weight=dw_weight, pw_weight=pw_weight, pw_bias=pw_bias, dw_bias=dw_bias, residual=residual)
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"sepconv: x must be a Tensor, got {type(x).__name__}")
    if padding is None:
        padding = _default_padding(dw_weight, dilation)
    chosen = resolve_backend(backend, x.device)
    if chosen == "reference":
        check_args(x, dw_weight, dw_bias, pw_weight, pw_bias, residual, stride, padding, dilation, act_in, act_mid,
                   act_out)
        return sepconv_reference(x, dw_weight, dw_bias, pw_weight, pw_bias, residual, stride, padding, dilation,
                                 act_in, act_mid, act_out)
    return run_backend(chosen, (x, dw_weight, dw_bias, pw_weight, pw_bias, residual, stride, padding, dilation, act_in,
                                act_mid, act_out, packed), recompute_depthwise)


def sepconv_bn(x, dw_weight, pw_weight, bias=None, *, relu_input=False, relu_output=False, residual=None,
               backend="auto", **options):
    """Xception's separable unit, ``act_out(PW(DW(act_in(x))) + bias) + residual``, the original
    signature of :func:`sepconv`: ``relu_input`` / ``relu_output`` are ``act_in="relu"`` /
    ``act_out="relu"``, ``bias`` the pointwise bias. Every other keyword of :func:`sepconv` is
    taken too (dw_bias, stride, padding, dilation, act_mid, packed; act_in and act_out in place of
    the two flags)."""
    if not isinstance(relu_input, bool) or not isinstance(relu_output, bool):
        raise TypeError("sepconv_bn: relu_input and relu_output must be bool")
    for flag, name in ((relu_input, "act_in"), (relu_output, "act_out")):
        if flag and name in options:
            raise ValueError(f"sepconv_bn: give relu_{'input' if name == 'act_in' else 'output'} or {name}, not both")
    options.setdefault("act_in", "relu" if relu_input else "identity")
    options.setdefault("act_out", "relu" if relu_output else "identity")
    return sepconv(x, dw_weight, pw_weight, bias, residual=residual, backend=backend, **options)


def pack_weights(backend, dtype, dw_weight, dw_bias, pw_weight, pw_bias, output_size=None):
    """The unit's weights in ``backend``'s own layout for x of ``dtype`` ("cpu", "cuda" or "triton";
    no weight work is left for the call that takes them as ``packed``). Make them again when a
    weight changes, for another dtype or precision setting, and on another machine (the CPU
    kernel's bf16 taps are laid out for this CPU's vectors); the kernels check the last two.
    ``output_size`` ([N, Cout, Ho, Wo] of the calls to come) lets the CPU kernel lay oneDNN's
    weights out for that shape; other shapes still run, at the cost of a reorder per call."""
    # The packed weights are a copy, not a function of the weights that autograd follows.
    dw_weight, dw_bias, pw_weight, pw_bias = (t.detach() if isinstance(t, torch.Tensor) else t
                                              for t in (dw_weight, dw_bias, pw_weight, pw_bias))
    if backend == "cpu":
        return torch.ops.xception_fast.pack_cpu(dw_weight, dw_bias, pw_weight, pw_bias, dtype, "auto",
                                                None if output_size is None else list(output_size))
    if backend in ("cuda", "triton"):
        from .gpu_pack import pack_gpu

        return pack_gpu(dw_weight, dw_bias, pw_weight, pw_bias, dtype)
    raise ValueError(f"pack_weights: backend must be 'cpu', 'cuda' or 'triton', got {backend!r}")


def max_pool_add(x, residual, kernel_size, stride=None, padding=0):
    """``max_pool2d(x, kernel_size, stride, padding) + residual`` in one pass over x (CPU tensors):
    what ends Xception's down-sampling blocks, where eager writes the pool's output and reads it back
    for the add. ``stride`` defaults to ``kernel_size``, as nn.MaxPool2d's; square windows, no
    dilation, floor mode. ``residual`` has the pooled shape and x's dtype. The output has x's memory
    format. Differentiable in x and residual (the backward finds the maxima again with eager's pool)."""
    for name, t in (("x", x), ("residual", residual)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"max_pool_add: {name} must be a Tensor, got {type(t).__name__}")
    for name, v in (("kernel_size", kernel_size), ("stride", stride), ("padding", padding)):
        if v is not None and (isinstance(v, bool) or not isinstance(v, int)):
            raise TypeError(f"max_pool_add: {name} must be an int, got {type(v).__name__}")
    if x.device.type != "cpu":
        raise ValueError(f"max_pool_add: x must be on the CPU (the op has a CPU kernel only), x is on {x.device}")
    return torch.ops.xception_fast.max_pool_add(x, residual, kernel_size, kernel_size if stride is None else stride,
                                                padding)
