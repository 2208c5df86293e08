"""Autograd through the fused unit (xception_fast.registration), on every backend: gradcheck in
float64 over the options, gradients against eager's under the exactness rule, and what the
forward keeps for the backward (on a CPU the depthwise result, unless it is to be recomputed)."""
import pytest
import torch

from backends import ALL, CPU, KERNELS
from exactness import TENSOR_NAMES, Unit, assert_exact, eager, make_inputs, op_args

# The options gradcheck walks: every activation in each slot, stride, dilation, kernel size.
GRADCHECK_UNITS = [
    (3, Unit(act_in="relu")),
    (3, Unit(act_in="identity", act_mid="relu6", act_out="relu")),
    (3, Unit(act_in="hardswish", act_mid="hardswish", act_out="hardswish")),
    (5, Unit(stride=2, act_in="relu6", act_mid="relu", act_out="relu6")),
    (3, Unit(dilation=2, act_mid="relu", act_out="identity")),
    (1, Unit(stride=2, act_in="identity")),
]


@pytest.mark.parametrize("k, unit", GRADCHECK_UNITS, ids=[f"k{k}-{u}" for k, u in GRADCHECK_UNITS])
@pytest.mark.parametrize("residual", [False, True])
@pytest.mark.parametrize("keeps_depthwise", [False, True], ids=["recomputed", "kept"])
def test_gradcheck_float64(k, unit, residual, keeps_depthwise):
    tensors, unit = make_inputs(2, 3, 4, 5, 6, k=k, unit=unit, dtype=torch.float64, dw_bias=True,
                                residual=residual, seed=2)
    # x away from ReLU's kink, where a finite difference is not a derivative (the intermediate
    # values are continuous random variables: one within eps of a kink is a measure-zero event).
    tensors["x"] = tensors["x"] + 0.05 * torch.sign(tensors["x"])
    leaves = {name: t.requires_grad_() for name, t in tensors.items() if t is not None}

    def fn(*flat):
        named = dict(zip(leaves, flat))
        args = op_args({n: named.get(n) for n in TENSOR_NAMES}, unit)
        if keeps_depthwise:
            return torch.ops.xception_fast.sepconv_keeping_depthwise(*args)[0]
        return CPU.op()(*args)

    assert torch.autograd.gradcheck(fn, tuple(leaves.values()), eps=1e-6, atol=1e-5, rtol=1e-4)


def grads(fn, tensors, unit, seed=1):
    leaves = {k: v.detach().clone().requires_grad_() for k, v in tensors.items() if v is not None}
    out = fn({k: leaves.get(k) for k in TENSOR_NAMES}, unit)
    # The gradient at the output in the output's memory format, as a layer after it would give it.
    weight = torch.empty_like(out).copy_(torch.randn(out.shape, generator=torch.Generator().manual_seed(seed)))
    (out * weight).sum().backward()
    return {k: v.grad for k, v in leaves.items()}


def fused(backend, recompute_depthwise=False):
    import xception_fast

    def fn(t, unit):
        return xception_fast.sepconv(t["x"], t["dw_weight"], t["pw_weight"], t["pw_bias"], dw_bias=t["dw_bias"],
                                     stride=unit.stride, padding=unit.padding, dilation=unit.dilation,
                                     act_in=unit.act_in, act_mid=unit.act_mid, act_out=unit.act_out,
                                     residual=t["residual"], backend=backend.name,
                                     recompute_depthwise=recompute_depthwise)
    return fn


GRADIENT_UNITS = [
    (3, Unit(act_in="relu")),
    (3, Unit(act_in="relu", act_out="relu")),
    (5, Unit(stride=2, act_mid="relu6", act_out="relu6")),
    (3, Unit(dilation=2, act_in="hardswish", act_mid="relu")),
    (3, Unit(act_in="identity", act_mid="hardswish")),
]


# Both memory formats: on a CPU the pointwise conv's weight gradient is a GEMM over channels-last rows and
# eager's convolution backward otherwise (registration.pointwise_backward).
LAYOUTS = ["channels_last", "nchw"]


@pytest.mark.parametrize("backend", ALL, ids=str)
@pytest.mark.parametrize("k, unit", GRADIENT_UNITS, ids=[f"k{k}-{u}" for k, u in GRADIENT_UNITS])
@pytest.mark.parametrize("residual", [False, True])
@pytest.mark.parametrize("layout", LAYOUTS)
def test_gradients_match_eager(backend, k, unit, residual, layout):
    assert_gradients_match_eager(backend, k, unit, residual, layout, recompute_depthwise=False)


@pytest.mark.parametrize("k, unit", GRADIENT_UNITS, ids=[f"k{k}-{u}" for k, u in GRADIENT_UNITS])
@pytest.mark.parametrize("residual", [False, True])
@pytest.mark.parametrize("layout", LAYOUTS)
def test_cpu_gradients_recomputing_the_depthwise_result_match_eager(k, unit, residual, layout):
    assert_gradients_match_eager(CPU, k, unit, residual, layout, recompute_depthwise=True)


def assert_gradients_match_eager(backend, k, unit, residual, layout, recompute_depthwise):
    for dtype in (d for d in backend.dtypes if d != torch.float64):
        tensors, unit_ = make_inputs(3, 24, 16, 7, 6, k=k, unit=unit, dtype=dtype, device=backend.device,
                                     layout=layout, dw_bias=True, residual=residual, seed=3)
        reference = grads(eager, {k_: None if v is None else v.cpu().double() for k_, v in tensors.items()}, unit_)
        eager_grads = grads(eager, tensors, unit_)
        got = grads(fused(backend, recompute_depthwise), tensors, unit_)
        assert got.keys() == eager_grads.keys()
        for name in got:
            assert_exact(got[name], eager_grads[name], reference[name], f"grad of {name} ({dtype}, {unit_})")


@pytest.mark.parametrize("backend", KERNELS, ids=str)
def test_float32_weights_get_float32_gradients(backend):
    tensors, unit = make_inputs(2, 8, 8, 5, 5, dtype=torch.bfloat16, device=backend.device, dw_bias=True, seed=4)
    for name in ("dw_weight", "dw_bias", "pw_weight", "pw_bias"):
        tensors[name] = tensors[name].float()
    g = grads(fused(backend), tensors, Unit(act_in="relu", act_out="relu").resolved(3))
    assert g["pw_weight"].dtype == g["dw_bias"].dtype == torch.float32 and g["x"].dtype == torch.bfloat16


@pytest.mark.parametrize("recompute_depthwise", [True, False], ids=["recomputed", "kept"])
def test_what_the_forward_saves_for_backward(recompute_depthwise):
    """Recomputed: the inputs only, the depthwise result never kept (the activation-memory saving).
    Kept: the inputs and the depthwise result, as eager's pointwise conv saves its input."""
    tensors, unit = make_inputs(2, 16, 32, 9, 9, dw_bias=True, residual=True, seed=5,
                                unit=Unit(act_mid="relu", act_out="relu"))
    leaves = {k: v.requires_grad_() for k, v in tensors.items()}
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        fused(CPU, recompute_depthwise)(leaves, unit)
    expected = [tuple(leaves[k].shape) for k in ("x", "dw_weight", "dw_bias", "pw_weight", "pw_bias")]
    if not recompute_depthwise:
        expected.append((2, 16, 9, 9))
    assert sorted(tuple(t.shape) for t in saved) == sorted(expected)

