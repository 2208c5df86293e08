"""The project's exactness rule, and the inputs every test builds, shared by every test.

The reference is the computation in float64 on the CPU. A fused result's max abs error against it
must be at most twice the error of eager PyTorch in the same dtype on the same device, plus a tiny
floor: one unit in the last place of the result's dtype at the reference's scale.
"""
import dataclasses

import torch

from xception_fast.contract import depthwise_reference, output_size, sepconv_reference


def max_abs_error(result, reference64):
    if result.numel() == 0:
        return 0.0
    return (result.detach().to(device="cpu", dtype=torch.float64) - reference64).abs().max().item()


def floor_for(dtype, reference64):
    scale = reference64.abs().max().item() if reference64.numel() else 0.0
    return torch.finfo(dtype).eps * max(scale, 1e-30)


def assert_exact(fused, eager, reference64, what="", precision=None, eager_reference64=None):
    """fused and eager: the same computation in the same dtype on the same device. ``precision``:
    the dtype it computed in, for the floor, where that is not the result's (autocast's bf16 where
    the result comes back in float32, as gradients of float32 leaves do). ``eager_reference64``:
    eager's own float64 reference, where the two differ (gradients through a kink, each model's
    reference on the side the model's rounding took)."""
    assert fused.shape == reference64.shape, f"{what}: shape {tuple(fused.shape)} != {tuple(reference64.shape)}"
    fused_err = max_abs_error(fused, reference64)
    eager_err = max_abs_error(eager, reference64 if eager_reference64 is None else eager_reference64)
    bound = 2 * eager_err + floor_for(precision or fused.dtype, reference64)
    assert fused_err <= bound, (f"{what}: fused max abs error {fused_err:.3e} > 2 x eager's {eager_err:.3e} "
                                f"+ floor ({bound:.3e})")
    return fused_err, eager_err


def random_bn_(bn, generator=None):
    """Random affine parameters and running statistics (never the default 0/1, which hide mistakes)."""
    with torch.no_grad():
        c = bn.num_features
        if bn.weight is not None:
            bn.weight.copy_(torch.rand(c, generator=generator) * 1.5 + 0.25)
            bn.bias.copy_(torch.randn(c, generator=generator) * 0.5)
        bn.running_mean.copy_(torch.randn(c, generator=generator) * 0.5)
        bn.running_var.copy_(torch.rand(c, generator=generator) * 2.0 + 0.25)
        bn.num_batches_tracked.fill_(int(torch.randint(1, 1000, (1,), generator=generator)))
    return bn


def randomize_model_(model, seed=0):
    """Random weights (kept at the model's own scale) and random BatchNorm state for every module."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                random_bn_(m, g)
            elif isinstance(m, (torch.nn.Conv2d, torch.nn.Linear)):
                fan_in = m.weight[0].numel()
                m.weight.copy_(torch.randn(m.weight.shape, generator=g) * (2.0 / fan_in) ** 0.5)
                if m.bias is not None:
                    m.bias.copy_(torch.randn(m.bias.shape, generator=g) * 0.1)
    return model


@dataclasses.dataclass(frozen=True)
class Unit:
    """The non-tensor arguments of one unit."""
    stride: int = 1
    padding: int = None  # None: dilation * (k - 1) // 2
    dilation: int = 1
    act_in: str = "relu"
    act_mid: str = "identity"
    act_out: str = "identity"

    def resolved(self, k):
        padding = self.dilation * (k - 1) // 2 if self.padding is None else self.padding
        return dataclasses.replace(self, padding=padding)

    def args(self):
        return (self.stride, self.padding, self.dilation, self.act_in, self.act_mid, self.act_out)


def make_inputs(n, c, cout, h, w, *, k=3, unit=Unit(), dtype=torch.float32, device="cpu", layout="nchw",
                dw_bias=False, pw_bias=True, residual=False, seed=0):
    """Random tensors of one unit: x in the given layout ("nchw", "channels_last" or "strided", a
    non-contiguous slice), weights at a scale that keeps the output O(1), the residual of the
    output's (strided) shape. Returns (tensors, unit with its padding resolved)."""
    unit = unit.resolved(k)
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, c, h, w + (3 if layout == "strided" else 0), generator=g)
    if layout == "strided":
        x = x[..., 1:w + 1]
    elif layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    ho, wo = (output_size(s, k, unit.stride, unit.padding, unit.dilation) for s in (h, w))
    tensors = {
        "x": x,
        "dw_weight": torch.randn(c, 1, k, k, generator=g) / k,
        "dw_bias": torch.randn(c, generator=g) * 0.3 if dw_bias else None,
        "pw_weight": torch.randn(cout, c, 1, 1, generator=g) / c ** 0.5,
        "pw_bias": torch.randn(cout, generator=g) if pw_bias else None,
        "residual": torch.randn(n, cout, ho, wo, generator=g) if residual else None,
    }
    if residual and layout == "channels_last":
        tensors["residual"] = tensors["residual"].contiguous(memory_format=torch.channels_last)
    return {key: None if v is None else v.to(device=device, dtype=dtype) for key, v in tensors.items()}, unit


TENSOR_NAMES = ("x", "dw_weight", "dw_bias", "pw_weight", "pw_bias", "residual")


def op_args(tensors, unit, packed=None):
    """The op's positional arguments (contract.SCHEMA order)."""
    return tuple(tensors[name] for name in TENSOR_NAMES) + unit.args() + (packed,)


def eager(tensors, unit):
    """The unit in eager PyTorch, in the tensors' dtype on their device."""
    return sepconv_reference(*(tensors[name] for name in TENSOR_NAMES), *unit.args())


def eager_depthwise(tensors, unit):
    """The unit's depthwise result in eager PyTorch (what sepconv_keeping_depthwise keeps)."""
    return depthwise_reference(tensors["x"], tensors["dw_weight"], tensors["dw_bias"], *unit.args()[:5])


def as_float64(tensors):
    return {k: None if v is None else v.detach().to("cpu", torch.float64) for k, v in tensors.items()}


def reference64(tensors, unit):
    """The float64 CPU reference of the unit."""
    return eager(as_float64(tensors), unit)
