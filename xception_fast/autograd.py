"""Autograd for the fused op, shared by its C++ and Triton implementations.

The forward saves only its inputs. The backward recomputes the depthwise output (and, with
act_out = ReLU, the pre-activation through the fused op itself) instead of keeping them, which is
where training through the fused op saves activation memory.
"""
import torch
import torch.nn.functional as F

_conv_backward = torch.ops.aten.convolution_backward.default


def register_autograd(op_name, forward_op):
    """Register the backward of ``op_name``; ``forward_op`` recomputes the pre-activation."""

    def setup_context(ctx, inputs, output):
        x, dw_weight, pw_weight, bias, relu_input, relu_output, residual = inputs
        ctx.relu_input, ctx.relu_output = relu_input, relu_output
        ctx.has_bias, ctx.has_residual = bias is not None, residual is not None
        ctx.save_for_backward(x, dw_weight, pw_weight, bias)

    def backward(ctx, grad):
        x, dw_weight, pw_weight, bias = ctx.saved_tensors
        need_x, need_dw, need_pw, need_bias, _, _, need_residual = ctx.needs_input_grad
        channels = x.shape[1]
        dw = dw_weight.to(x.dtype)
        pw = pw_weight.to(x.dtype)
        grad = grad.to(x.dtype)
        a = F.relu(x) if ctx.relu_input else x
        d = F.conv2d(a, dw, padding=1, groups=channels)
        g = grad
        if ctx.relu_output:
            z = forward_op(x, dw_weight, pw_weight, bias, ctx.relu_input, False, None)
            g = grad * (z > 0)
        grad_d, grad_pw, _ = _conv_backward(g, d, pw, None, [1, 1], [0, 0], [1, 1], False, [0, 0], 1,
                                            [need_x or need_dw, need_pw, False])
        grad_x = grad_dw = None
        if need_x or need_dw:
            grad_a, grad_dw, _ = _conv_backward(grad_d, a, dw, None, [1, 1], [1, 1], [1, 1], False, [0, 0],
                                                channels, [need_x, need_dw, False])
            if need_x:
                grad_x = grad_a * (x > 0) if ctx.relu_input else grad_a
        return (
            grad_x,
            None if grad_dw is None else grad_dw.to(dw_weight.dtype),
            None if grad_pw is None else grad_pw.to(pw_weight.dtype),
            g.sum((0, 2, 3)).to(bias.dtype) if need_bias and ctx.has_bias else None,
            None,
            None,
            grad if need_residual and ctx.has_residual else None,
        )

    torch.library.register_autograd(op_name, backward, setup_context=setup_context)
