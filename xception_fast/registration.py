"""What the C++ op and the Triton op of the fused unit both register: autograd and autocast; and
the call of the C++ op below both, where no gradient is made (call_below_autograd_and_autocast).

Autograd: the forward saves its inputs, and the backward recomputes the depthwise result in eager
steps instead of keeping it, which is where training through the fused op saves activation memory;
``sepconv_keeping_depthwise`` (CPU) returns the depthwise result as well, and its backward takes that
instead, where a training step would rather spend the memory than a depthwise conv per unit. When
act_out is not the identity, the pre-activation of the output is recomputed through the fused op
itself, so that the activation's mask is the one the forward applied. On a CPU the pointwise
conv's weight gradient is a GEMM (pointwise_backward) and the depthwise conv's backward the extension's
(act_in's derivative and act_in(x) applied as x is read, so act_in(x) is never made); elsewhere
both are eager's.
"""
import torch

from .contract import activation

_conv_backward = torch.ops.aten.convolution_backward.default
_aten = torch.ops.aten


def activation_backward(grad, pre, name):
    """The gradient through activation ``name`` at pre-activation ``pre``, with eager's own
    backward kernels (so that the masks at the kinks are eager's)."""
    if name == "identity":
        return grad
    if name == "relu":
        return _aten.threshold_backward(grad, pre, 0)
    if name == "relu6":
        return _aten.hardtanh_backward(grad, pre, 0.0, 6.0)
    if name == "hardswish":
        return _aten.hardswish_backward(grad, pre)
    raise ValueError(f"unknown activation {name!r}")


def pointwise_backward(grad, d, pw_weight, need_d, need_weight):
    """The gradients of the pointwise (1x1) conv ``pw_weight`` at its input ``d`` and at its weight
    from ``grad`` at its output, each None where not needed. The input's is eager's convolution
    backward (oneDNN's backward-data on a CPU). On a CPU, for channels-last float32 tensors, the
    weight's is a matrix product over the pixels' rows, ``at::mm``'s GEMM: oneDNN's 1x1 backward-weights
    ran up to twice a GEMM's time on an Intel Xeon and level with it on an AMD EPYC, where the GEMM
    took longer than oneDNN's backward-data for the input's (README, CPU kernel). Elsewhere the
    weight's is eager's convolution backward too."""
    channels_last = torch.channels_last
    weight_as_gemm = need_weight and (grad.device.type == "cpu" and grad.dtype == torch.float32
                                      and d.dtype == torch.float32 and grad.is_contiguous(memory_format=channels_last)
                                      and d.is_contiguous(memory_format=channels_last))
    grad_d = grad_weight = None
    if need_d or (need_weight and not weight_as_gemm):
        grad_d, grad_weight, _ = _conv_backward(grad, d, pw_weight, None, [1, 1], [0, 0], [1, 1], False, [0, 0],
                                                1, [need_d, need_weight and not weight_as_gemm, False])
    if weight_as_gemm:
        out_channels, channels = grad.shape[1], d.shape[1]
        grad_rows = grad.permute(0, 2, 3, 1).reshape(-1, out_channels)
        d_rows = d.permute(0, 2, 3, 1).reshape(-1, channels)
        grad_weight = torch.mm(grad_rows.t(), d_rows).view(out_channels, channels, 1, 1)
    return grad_d, grad_weight


def register_autograd(op_name, forward_op, keeps_depthwise=False):
    """Register the backward of ``op_name``; ``forward_op`` (the unit's op, sepconv) recomputes the
    pre-activation of the output. ``keeps_depthwise``: ``op_name`` returns (output, depthwise
    result), and the backward takes the depthwise result from it instead of recomputing it."""

    def setup_context(ctx, inputs, output):
        (x, dw_weight, dw_bias, pw_weight, pw_bias, residual, stride, padding, dilation, act_in, act_mid, act_out,
         packed) = inputs
        # autograd wants one entry per element of a list input: the packed weights get none.
        ctx.packed_grad = None if packed is None else [None] * len(packed)
        ctx.conv = (stride, padding, dilation)
        ctx.acts = (act_in, act_mid, act_out)
        ctx.has_residual = residual is not None
        saved = (x, dw_weight, dw_bias, pw_weight, pw_bias)
        if keeps_depthwise:
            ctx.mark_non_differentiable(output[1])
            # Its gradient is never defined: not made as a tensor of zeros for every backward.
            ctx.set_materialize_grads(False)
            saved += (output[1],)
        ctx.save_for_backward(*saved)

    def backward(ctx, grad, *depthwise_grad):
        if grad is None:  # not materialized (keeps_depthwise): no gradient reaches the output
            return (None,) * 12 + (ctx.packed_grad,)
        x, dw_weight, dw_bias, pw_weight, pw_bias, *kept = ctx.saved_tensors
        need = ctx.needs_input_grad
        need_x, need_dw, need_dw_bias, need_pw, need_pw_bias = need[:5]
        need_residual = need[5]
        stride, padding, dilation = ctx.conv
        act_in, act_mid, act_out = ctx.acts
        channels = x.shape[1]
        dtype = x.dtype

        def cast(t):
            return None if t is None else t.to(dtype)

        dw, pw = cast(dw_weight), cast(pw_weight)
        grad = grad.to(dtype)
        # ReLU's and ReLU6's masks are the same read from their output as from their input (each
        # maps the open interval it passes onto itself, and its ends onto the ends), so a kept
        # depthwise result serves act_mid's backward too; Hardswish's needs the pre-activation.
        recompute = not kept or act_mid == "hardswish"
        # On a CPU the depthwise conv's backward is the extension's (act_in applied as x is read),
        # which needs no act_in(x).
        on_cpu = x.device.type == "cpu"
        a = activation(x, act_in) if recompute or (need_dw and not on_cpu) else x
        if recompute:
            pre_d = torch.nn.functional.conv2d(a, dw, cast(dw_bias), stride=stride, padding=padding,
                                               dilation=dilation, groups=channels)
            d = kept[0] if kept else activation(pre_d, act_mid)
        else:
            d = pre_d = kept[0]
        g = grad
        if act_out != "identity":
            z = forward_op(x, dw_weight, dw_bias, pw_weight, pw_bias, None, stride, padding, dilation, act_in, act_mid,
                           "identity", None)
            g = activation_backward(grad, z, act_out)
        need_depthwise = need_x or need_dw or need_dw_bias
        grad_d, grad_pw = pointwise_backward(g, d, pw, need_depthwise, need_pw)
        grad_x = grad_dw = grad_dw_bias = None
        if need_depthwise:
            grad_pre = activation_backward(grad_d, pre_d, act_mid)
            if on_cpu:
                grad_x, grad_dw = torch.ops.xception_fast.depthwise_backward(grad_pre, x, dw_weight, stride, padding,
                                                                             dilation, act_in, [need_x, need_dw])
            else:
                grad_a, grad_dw, _ = _conv_backward(grad_pre, a, dw, None, [stride] * 2, [padding] * 2,
                                                    [dilation] * 2, False, [0, 0], channels, [need_x, need_dw, False])
                if need_x:
                    grad_x = activation_backward(grad_a, x, act_in)
            if need_dw_bias and dw_bias is not None:
                grad_dw_bias = grad_pre.sum((0, 2, 3)).to(dw_bias.dtype)
        return (
            grad_x,
            None if grad_dw is None else grad_dw.to(dw_weight.dtype),
            grad_dw_bias,
            None if grad_pw is None else grad_pw.to(pw_weight.dtype),
            g.sum((0, 2, 3)).to(pw_bias.dtype) if need_pw_bias and pw_bias is not None else None,
            grad if need_residual and ctx.has_residual else None,
            None, None, None, None, None, None, ctx.packed_grad,
        )

    torch.library.register_autograd(op_name, backward, setup_context=setup_context)


def register_autocast(library, op_name, op):
    """Autocast for the unit, as for nn.Conv2d: x and residual are cast to the autocast dtype. The
    weights are left as they are: the kernels take float32 weights with half-precision x and round
    them where they multiply in half precision, as autocast's cast would, so packed weights and
    their cache survive autocast (torch.library.register_autocast casts every floating tensor,
    packed weights included, on every call)."""
    for device_type in ("cpu", "cuda"):
        key = "Autocast" + torch._C._dispatch_key_for_device(device_type)
        library.impl(op_name, _autocast_kernel(op, device_type, key), key)


def _autocast_cast(t, device_type, dtype):
    """``t`` (x or the residual) as the unit's autocast kernel passes it on."""
    eligible = t is not None and t.is_floating_point() and t.device.type == device_type and t.dtype != torch.float64
    return t.to(dtype) if eligible else t


def _autocast_kernel(op, device_type, key):
    excluded = torch._C.DispatchKeySet(getattr(torch._C.DispatchKey, key))

    def kernel(x, dw_weight, dw_bias, pw_weight, pw_bias, residual, *options):
        dtype = torch.get_autocast_dtype(device_type)
        with torch._C._ExcludeDispatchKeyGuard(excluded):
            return op(_autocast_cast(x, device_type, dtype), dw_weight, dw_bias, pw_weight, pw_bias,
                      _autocast_cast(residual, device_type, dtype), *options)

    return kernel


_AUTOCAST_KEYS = torch._C.DispatchKeySet(torch._C.DispatchKey.AutocastCPU) | torch._C.DispatchKeySet(
    torch._C.DispatchKey.AutocastCUDA)


def call_below_autograd_and_autocast(op, args):
    """``op(*args)`` (the unit's schema) where no gradient is to be made, straight to its device
    kernel: autocast's cast made here as its kernel makes it, then the dispatcher told to skip the
    autograd and autocast kernels registered above. Both are Python (torch.library), and a call
    through them costs more than a small unit's own kernel; with no gradient to make and x already
    cast, neither has anything left to do. Not while torch.compile traces (the guards are not
    traceable)."""
    x, residual = args[0], args[5]
    device_type = x.device.type
    if device_type in ("cpu", "cuda") and torch.is_autocast_enabled(device_type):
        dtype = torch.get_autocast_dtype(device_type)
        args = (_autocast_cast(x, device_type, dtype), *args[1:5], _autocast_cast(residual, device_type, dtype),
                *args[6:])
    with torch._C._AutoDispatchBelowADInplaceOrView(), torch._C._ExcludeDispatchKeyGuard(_AUTOCAST_KEYS):
        return op(*args)
