"""GPU only: the CUDA and Triton kernels on the problem sizes of the models, TF32, the two kernels
against each other, and offsets past 2**31 elements."""
import pytest
import torch

from backends import CUDA, TRITON
from exactness import Unit, assert_exact, eager, make_inputs, op_args, reference64

pytestmark = pytest.mark.gpu

GPU_BACKENDS = [CUDA, TRITON]

# (N, C, Cout, H, k, unit, residual): Xception's middle flow, entry and exit flow; MobileNetV2's
# stride-2 unit; EfficientNet-lite0's 5x5 units; a dilated unit as DeepLab's output stride 16 runs it.
MODEL_SIZED = [
    (8, 728, 728, 19, 3, Unit(act_in="relu"), False),
    (8, 728, 728, 19, 3, Unit(act_in="relu"), True),
    (2, 64, 128, 147, 3, Unit(act_in="identity", act_out="relu"), False),
    (4, 1536, 2048, 10, 3, Unit(act_in="identity", act_out="relu"), False),
    (8, 96, 24, 112, 3, Unit(stride=2, act_in="identity", act_mid="relu6"), False),
    (8, 240, 40, 28, 5, Unit(act_in="identity", act_mid="relu6"), True),
    (8, 672, 192, 14, 5, Unit(stride=2, act_in="identity", act_mid="relu6"), False),
    (4, 728, 728, 19, 3, Unit(dilation=2, act_in="relu", act_mid="relu"), False),
]


@pytest.mark.parametrize("backend", GPU_BACKENDS, ids=str)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32], ids=str)
@pytest.mark.parametrize("n, c, cout, h, k, unit, residual", MODEL_SIZED)
def test_model_sized(backend, dtype, n, c, cout, h, k, unit, residual):
    torch.backends.cudnn.allow_tf32 = True  # PyTorch's default: float32 runs on TF32 tensor cores, both sides
    tensors, unit = make_inputs(n, c, cout, h, h, k=k, unit=unit, dtype=dtype, device="cuda", layout="channels_last",
                                dw_bias=unit.act_mid != "identity", residual=residual)
    fused = backend.op()(*op_args(tensors, unit))
    assert_exact(fused, eager(tensors, unit), reference64(tensors, unit), f"{backend} {dtype} {n}x{c}->{cout}@{h}")


@pytest.mark.parametrize("backend", GPU_BACKENDS, ids=str)
def test_tf32_follows_the_cudnn_flag(backend):
    tensors, unit = make_inputs(4, 256, 256, 19, 19, device="cuda", layout="channels_last")
    ref = reference64(tensors, unit)
    errors = {}
    for allow in (False, True):
        torch.backends.cudnn.allow_tf32 = allow
        fused = backend.op()(*op_args(tensors, unit))
        errors[allow] = assert_exact(fused, eager(tensors, unit), ref, f"allow_tf32={allow}")[0]
    # TF32 keeps 10 mantissa bits against float32's 23: its error is orders of magnitude larger.
    assert errors[True] > 8 * errors[False], errors


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=str)
def test_triton_and_cuda_agree(dtype):
    tensors, unit = make_inputs(8, 728, 728, 19, 19, k=5, unit=Unit(stride=2, act_mid="relu6"), dtype=dtype,
                                device="cuda", dw_bias=True, residual=True)
    triton_out = TRITON.op()(*op_args(tensors, unit))
    cuda_out = CUDA.op()(*op_args(tensors, unit))
    ref = reference64(tensors, unit)
    assert_exact(triton_out, cuda_out, ref, "triton against cuda")
    assert_exact(cuda_out, triton_out, ref, "cuda against triton")


@pytest.mark.parametrize("backend", GPU_BACKENDS, ids=str)
def test_offsets_past_two_to_the_31(backend):
    # x and the output have more than 2**31 elements; the last image is checked against the
    # reference, so 32-bit offsets that wrap would show there.
    n, c, cout, hw = 2049, 64, 64, 128
    assert n * c * hw * hw > 2 ** 31
    small, unit = make_inputs(1, c, cout, hw, hw, dtype=torch.bfloat16, device="cuda", layout="channels_last",
                              residual=True, seed=3)
    big = dict(small, x=small["x"].expand(n, -1, -1, -1).contiguous(memory_format=torch.channels_last),
               residual=small["residual"].expand(n, -1, -1, -1).contiguous(memory_format=torch.channels_last))
    y = backend.op()(*op_args(big, unit))
    del big
    last = y[-1:].clone()
    del y
    assert_exact(last, eager(small, unit), reference64(small, unit))
