"""The GPU kernels' packed weights: one layout that the CUDA kernel and the Triton kernel both read.

    [header, taps, dw_bias, pw, pw_bias]

- header: int64 CPU tensor (csrc/sepconv.h, HeaderField): GPU_FORMAT, C, Cout, k, the product's
  dtype (x's), then C_pad and Cout_pad;
- taps: float32 [k * k, C_pad], tap (kh, kw) at row kh * k + kw, zero past C;
- dw_bias: float32 [C_pad] (zeros when the unit has none);
- pw: [Cout_pad, C_pad] in x's dtype (the MMA operand's; float32 for float32 x, rounded to TF32 by
  the kernels where cuDNN's flag allows), zero-padded;
- pw_bias: float32 [Cout_pad] (zeros when the unit has none).

C is padded to a multiple of 64 and Cout to a multiple of 256, the largest tiles either kernel
takes, so that neither needs masks or ragged tails when it reads weights. Made with torch
operations only, so it runs (and traces under torch.compile) without the compiled library.
"""
import torch

__all__ = ["GPU_FORMAT", "C_MULTIPLE", "COUT_MULTIPLE", "pack_gpu", "check_packed_gpu"]

GPU_FORMAT = 0x5847  # csrc/sepconv.h kGpuFormat
C_MULTIPLE = 64
COUT_MULTIPLE = 256
HEADER_LENGTH = 8  # the six shared fields, C_pad, Cout_pad
_DTYPE_CODES = {torch.float32: 6, torch.float16: 5, torch.bfloat16: 15}  # c10::ScalarType


def _round_up(n, m):
    return (n + m - 1) // m * m


def pack_gpu(dw_weight, dw_bias, pw_weight, pw_bias, dtype):
    """The unit's weights in the GPU kernels' layout for x of ``dtype``."""
    if dtype not in _DTYPE_CODES:
        raise ValueError(f"pack_gpu: dtype must be float32, float16 or bfloat16, got {dtype}")
    c, _, k, _ = dw_weight.shape
    cout = pw_weight.shape[0]
    c_pad, cout_pad = _round_up(c, C_MULTIPLE), _round_up(cout, COUT_MULTIPLE)
    f32 = torch.float32
    device = dw_weight.device
    with torch.no_grad():
        taps = torch.zeros(k * k, c_pad, dtype=f32, device=device)
        taps[:, :c] = dw_weight.detach().reshape(c, k * k).t()
        dw_b = torch.zeros(c_pad, dtype=f32, device=device)
        if dw_bias is not None:
            dw_b[:c] = dw_bias.detach()
        pw = torch.zeros(cout_pad, c_pad, dtype=dtype, device=device)
        pw[:cout, :c] = pw_weight.detach().reshape(cout, c)
        pw_b = torch.zeros(cout_pad, dtype=f32, device=device)
        if pw_bias is not None:
            pw_b[:cout] = pw_bias.detach()
    header = torch.tensor([GPU_FORMAT, c, cout, k, _DTYPE_CODES[dtype], 0, c_pad, cout_pad], dtype=torch.int64)
    return [header, taps, dw_b, pw, pw_b]


def check_packed_gpu(packed, x, c, cout, k):
    """Raise, naming what does not match, unless ``packed`` is pack_gpu's output for this unit and
    x's dtype; return (C_pad, Cout_pad). The CUDA kernel makes the same checks in C++."""
    if not (isinstance(packed, (list, tuple)) and len(packed) == 5 and all(isinstance(t, torch.Tensor) for t in packed)
            and packed[0].dtype == torch.int64 and packed[0].device.type == "cpu" and packed[0].numel() >= 6):
        raise ValueError("sepconv: packed must be the list that this backend's pack function returned (its first "
                         "tensor is a header); got something else")
    header = packed[0].tolist()
    if header[0] != GPU_FORMAT:
        raise ValueError("sepconv: packed weights were made for another backend's kernel")
    if header[1:4] != [c, cout, k]:
        raise ValueError(f"sepconv: packed weights were made for C = {header[1]}, Cout = {header[2]}, k = {header[3]}, "
                         f"not for this unit (C = {c}, Cout = {cout}, k = {k})")
    if header[4] != _DTYPE_CODES.get(x.dtype):
        raise ValueError("sepconv: packed weights were made for another dtype than x's "
                         f"({x.dtype}): pack them again")
    c_pad, cout_pad = header[6], header[7]
    taps, dw_b, pw, pw_b = packed[1:]
    ok = (taps.shape == (k * k, c_pad) and dw_b.shape == (c_pad,) and pw.shape == (cout_pad, c_pad)
          and pw_b.shape == (cout_pad,) and pw.dtype == x.dtype
          and all(t.dtype == torch.float32 for t in (taps, dw_b, pw_b))
          and all(t.device == x.device and t.is_contiguous() for t in (taps, dw_b, pw, pw_b)))
    if not ok:
        raise ValueError("sepconv: packed weights do not hold this unit's tensors in the GPU layout")
    return c_pad, cout_pad
