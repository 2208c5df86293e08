"""The project's exactness rule, shared by every test.

The reference is the computation in float64 on the CPU. A fused result's max abs error against it
must be at most twice the error of eager PyTorch in the same dtype on the same device, plus a tiny
floor: one unit in the last place of the result's dtype at the reference's scale.
"""
import torch


def max_abs_error(result, reference64):
    if result.numel() == 0:
        return 0.0
    return (result.detach().to(device="cpu", dtype=torch.float64) - reference64).abs().max().item()


def floor_for(dtype, reference64):
    scale = reference64.abs().max().item() if reference64.numel() else 0.0
    return torch.finfo(dtype).eps * max(scale, 1e-30)


def assert_exact(fused, eager, reference64, what=""):
    """fused and eager: the same computation in the same dtype on the same device."""
    assert fused.shape == reference64.shape, f"{what}: shape {tuple(fused.shape)} != {tuple(reference64.shape)}"
    fused_err = max_abs_error(fused, reference64)
    eager_err = max_abs_error(eager, reference64)
    bound = 2 * eager_err + floor_for(fused.dtype, reference64)
    assert fused_err <= bound, (f"{what}: fused max abs error {fused_err:.3e} > 2 x eager's {eager_err:.3e} "
                                f"+ floor ({bound:.3e})")
    return fused_err, eager_err


def random_bn_(bn, generator=None):
    """Random affine parameters and running statistics (never the default 0/1, which hide mistakes)."""
    with torch.no_grad():
        c = bn.num_features
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


def make_sepconv_inputs(n, c, cout, h, w, *, dtype=torch.float32, device="cpu", layout="nchw", bias=True,
                        residual=False, seed=0):
    """Random inputs of the fused op: x in the given layout ("nchw", "channels_last" or "strided",
    a non-contiguous slice), weights at a scale that keeps the output O(1)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, c, h, w + (3 if layout == "strided" else 0), generator=g)
    if layout == "strided":
        x = x[..., 1:w + 1]
    elif layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    inputs = {
        "x": x,
        "dw_weight": torch.randn(c, 1, 3, 3, generator=g) / 3,
        "pw_weight": torch.randn(cout, c, 1, 1, generator=g) / c ** 0.5,
        "bias": torch.randn(cout, generator=g) if bias else None,
        "residual": torch.randn(n, cout, h, w, generator=g) if residual else None,
    }
    return {k: None if v is None else v.to(device=device, dtype=dtype) for k, v in inputs.items()}


def reference64(inputs, relu_input, relu_output):
    """The float64 CPU reference of the fused op for ``make_sepconv_inputs`` inputs."""
    from xception_fast.ops import sepconv_bn_reference

    args = {k: None if v is None else v.detach().to("cpu", torch.float64) for k, v in inputs.items()}
    return sepconv_bn_reference(args["x"], args["dw_weight"], args["pw_weight"], args["bias"], relu_input,
                                relu_output, args["residual"])
