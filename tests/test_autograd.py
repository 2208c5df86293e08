"""Autograd through the fused op (C++ op here; the Triton op in test_triton.py)."""
import itertools

import pytest
import torch

import xception_fast
from xception_fast.ops import sepconv_bn_reference
from exactness import assert_exact, make_sepconv_inputs

OPTIONS = list(itertools.product([False, True], repeat=3))
NAMES = ("x", "dw_weight", "pw_weight", "bias", "residual")


def grads(fn, inputs, relu_input, relu_output, seed=1):
    leaves = {k: v.detach().clone().requires_grad_() for k, v in inputs.items() if v is not None}
    out = fn(leaves["x"], leaves["dw_weight"], leaves["pw_weight"], leaves.get("bias"), relu_input, relu_output,
             leaves.get("residual"))
    weight = torch.randn(out.shape, generator=torch.Generator().manual_seed(seed)).to(out)
    (out * weight).sum().backward()
    return {k: v.grad for k, v in leaves.items()}


def fused_op(device):
    def fn(x, dw, pw, b, relu_input, relu_output, residual):
        return xception_fast.sepconv_bn(x, dw, pw, b, relu_input=relu_input, relu_output=relu_output,
                                        residual=residual, backend=device)
    return fn


@pytest.mark.parametrize("relu_input, relu_output, residual", OPTIONS)
def test_gradcheck_float64(relu_input, relu_output, residual):
    inputs = make_sepconv_inputs(2, 3, 4, 4, 5, dtype=torch.float64, residual=residual, seed=2)
    # keep values away from the ReLU kinks, where finite differences are not derivatives
    inputs["x"] = inputs["x"] + 0.05 * torch.sign(inputs["x"])
    args = [v.requires_grad_() if v is not None else None for v in inputs.values()]

    def fn(x, dw, pw, b, r):
        return torch.ops.xception_fast.sepconv_bn(x, dw, pw, b, relu_input, relu_output, r)

    assert torch.autograd.gradcheck(fn, args, eps=1e-6, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
@pytest.mark.parametrize("relu_input, relu_output, residual", OPTIONS)
def test_gradients_match_eager(device, relu_input, relu_output, residual):
    dtypes = [torch.float32, torch.bfloat16] + ([torch.float16] if device == "cuda" else [])
    for dtype in dtypes:
        inputs = make_sepconv_inputs(3, 24, 16, 7, 6, dtype=dtype, device=device, layout="channels_last",
                                     residual=residual, seed=3)
        reference = grads(sepconv_bn_reference, {k: None if v is None else v.cpu().double()
                                                 for k, v in inputs.items()}, relu_input, relu_output)
        eager = grads(sepconv_bn_reference, inputs, relu_input, relu_output)
        fused = grads(fused_op(device), inputs, relu_input, relu_output)
        assert fused.keys() == eager.keys()
        for name in fused:
            assert_exact(fused[name], eager[name], reference[name], f"grad of {name} ({dtype})")


def test_float32_weights_get_float32_gradients():
    inputs = make_sepconv_inputs(2, 8, 8, 5, 5, dtype=torch.bfloat16, seed=4)
    inputs["pw_weight"] = inputs["pw_weight"].float()
    g = grads(fused_op("cpu"), inputs, True, True)
    assert g["pw_weight"].dtype == torch.float32 and g["x"].dtype == torch.bfloat16


def test_only_inputs_are_saved_for_backward():
    """The depthwise output is recomputed in backward, never kept (the activation-memory saving)."""
    inputs = make_sepconv_inputs(2, 16, 32, 9, 9, residual=True, seed=5)
    leaves = {k: v.requires_grad_() for k, v in inputs.items()}
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        xception_fast.sepconv_bn(leaves["x"], leaves["dw_weight"], leaves["pw_weight"], leaves["bias"],
                                 relu_input=True, relu_output=True, residual=leaves["residual"])
    assert sorted(tuple(t.shape) for t in saved) == sorted(
        tuple(leaves[k].shape) for k in ("x", "dw_weight", "pw_weight", "bias"))
