"""Device peaks and the roofline arithmetic of a separable unit and of a whole model.

The one table of known peaks is ``KNOWN_PEAKS``. Any device not in it (every CPU, any other GPU)
gets its peaks measured once per session — a large matrix product per dtype (on a CPU the faster
of a matmul and a 1x1 convolution) and a large copy — and every result says which kind of peak it
was judged against.
"""
import functools
import time

import torch
from torch import nn

from xception_fast.model import SeparableConv2d

# Dense matrix rate (FLOP/s) per math mode and copy bandwidth (B/s).
KNOWN_PEAKS = {
    "H200": {
        "flops": {"bf16": 790e12, "fp16": 790e12, "tf32": 395e12, "fp32": 60e12},
        "bandwidth": 4.3e12,
        "source": "as measured on an H200 (dense bf16/fp16 matmul, TF32, non-tensor-core fp32; copy bandwidth)",
    },
}

DTYPE_NAMES = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}


def math_mode(device, dtype):
    """The arithmetic the convolutions run in: fp32 convs on CUDA use TF32 when cuDNN may."""
    name = DTYPE_NAMES[dtype]
    if name == "fp32" and device.type == "cuda" and torch.backends.cudnn.allow_tf32:
        return "tf32"
    return name


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _best_seconds(fn, device, repeats):
    fn()
    _sync(device)
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        _sync(device)
        best = min(best, time.perf_counter() - start)
    return best


def _measure_matmul(device, dtype, tf32=False):
    """Best matmul rate, growing the size until one product takes >= 50 ms (or n = 8192)."""
    previous = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = tf32
    try:
        n = 512
        while True:
            a = torch.randn(n, n, device=device, dtype=dtype)
            b = torch.randn(n, n, device=device, dtype=dtype)
            seconds = _best_seconds(lambda: torch.mm(a, b), device, repeats=10)
            if seconds >= 0.05 or n >= 8192:
                return 2 * n ** 3 / seconds
            n *= 2
    finally:
        torch.backends.cuda.matmul.allow_tf32 = previous


def _measure_pointwise_conv(device, dtype):
    """Rate of a large channels-last 1x1 convolution (M x K x N = 4096 x 1024 x 1024), the product
    the fused units and eager's pointwise convs run."""
    x = torch.randn(1, 1024, 64, 64, device=device, dtype=dtype).contiguous(memory_format=torch.channels_last)
    w = torch.randn(1024, 1024, 1, 1, device=device, dtype=dtype).contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        seconds = _best_seconds(lambda: torch.nn.functional.conv2d(x, w), device, repeats=10)
    return 2 * 64 * 64 * 1024 * 1024 / seconds


def _measure_copy(device):
    """Best copy bandwidth (bytes read + bytes written) over 256 MiB buffers (1 GiB on a GPU)."""
    numel = (1 << 28 if device.type == "cuda" else 1 << 26)
    src = torch.empty(numel, device=device, dtype=torch.float32).fill_(1.0)
    dst = torch.empty_like(src)
    seconds = _best_seconds(lambda: dst.copy_(src), device, repeats=10)
    return 2 * src.numel() * src.element_size() / seconds


def measure_peaks(device):
    flops = {"fp32": _measure_matmul(device, torch.float32), "bf16": _measure_matmul(device, torch.bfloat16)}
    if device.type == "cuda":
        flops["tf32"] = _measure_matmul(device, torch.float32, tf32=True)
        flops["fp16"] = _measure_matmul(device, torch.float16)
        source = "measured at session start (best large matmul per dtype, large copy)"
    else:
        # A CPU's matmul and its convolutions run in different libraries (MKL or OpenBLAS, and
        # oneDNN), and which is faster depends on the CPU: a peak below what the units' own product
        # reaches would put them over 100 % of the roofline.
        for name, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
            flops[name] = max(flops[name], _measure_pointwise_conv(device, dtype))
        # A product of two bf16 values is exact in fp32, so bf16 arithmetic runs at least at the
        # fp32 rate on any CPU: on one without bf16 instructions the libraries emulate it slower,
        # and the CPU kernel multiplies it in fp32 (its tiled product), which a bf16 peak of the
        # libraries' alone would put over 100 % of the roofline.
        flops["bf16"] = max(flops["bf16"], flops["fp32"])
        source = ("measured at session start (per dtype the faster of a large matmul and a large 1x1 convolution, "
                  "bf16 at least fp32's; large copy)")
    return {"flops": flops, "bandwidth": _measure_copy(device), "source": source}


def device_peaks(device, device_name):
    for key, peaks in KNOWN_PEAKS.items():
        if device.type == "cuda" and key in device_name:
            return peaks
    return measure_peaks(device)


# ----------------------------------------------------------------------------------------------
# Roofline arithmetic

def unit_flop(pixels, channels, out_channels, k=3):
    """FLOP of one separable unit over ``pixels`` = N·Ho·Wo output pixels, as (depthwise k x k: k²
    multiply-adds per output element, pointwise GEMM)."""
    return 2 * pixels * k * k * channels, 2 * pixels * channels * out_channels


def unit_cost(pixels, channels, out_channels, elt, residual=False, k=3, input_pixels=None):
    """FLOP and minimum bytes of one fused separable unit over ``pixels`` = N·Ho·Wo output pixels
    (``input_pixels`` = N·H·W, the same without a stride): the depthwise k x k and the pointwise
    GEMM (unit_flop); the input read once, the output written once (and the residual read once),
    the weights and biases read once."""
    input_pixels = pixels if input_pixels is None else input_pixels
    flop = sum(unit_flop(pixels, channels, out_channels, k))
    elements = (input_pixels * channels + pixels * out_channels + k * k * channels + channels * out_channels
                + channels + out_channels)
    if residual:
        elements += pixels * out_channels
    return flop, elt * elements


@functools.lru_cache(maxsize=None)
def model_layers(name, batch, elt, training=False):
    """Model ``name`` (harness.MODELS) as the (FLOP, minimum bytes) of each of its layers: every
    convolution and linear layer as its input + output + weights, except that in our Xception each
    separable unit counts as one fused unit (BatchNorm folded); pooling, adds, activations and
    BatchNorms count as free. Its floor is the sum of the layers' floors.

    A training step counts three times each layer's forward FLOP (forward, gradient of the input,
    gradient of the weights) except for the first layer, whose input needs no gradient; its bytes
    are left out (None): its floor is the compute floor alone.
    """
    from .harness import MODELS

    spec = MODELS[name]
    with torch.device("meta"):
        model = spec.build().eval()
    layers = []

    def count(module, inputs, output):
        x = inputs[0]
        if isinstance(module, SeparableConv2d):
            flop, nbytes = unit_cost(output.numel() // output.shape[1], x.shape[1], output.shape[1], elt)
        elif isinstance(module, nn.Conv2d):
            flop = 2 * output.numel() * module.weight[0].numel()
            nbytes = elt * (x.numel() + output.numel() + module.weight.numel())
        else:
            flop = 2 * output.numel() * module.in_features
            nbytes = elt * (x.numel() + output.numel() + module.weight.numel() + module.bias.numel())
        if training:
            flop, nbytes = (3 if layers else 2) * flop, None
        layers.append((flop, nbytes))

    inside_units = {id(m) for unit in model.modules() if isinstance(unit, SeparableConv2d) for m in unit.children()}
    for module in model.modules():
        if isinstance(module, (SeparableConv2d, nn.Conv2d, nn.Linear)) and id(module) not in inside_units:
            module.register_forward_hook(count)
    model(torch.empty(batch, 3, spec.size, spec.size, device="meta"))
    return tuple(layers)


def roofline(layers, seconds, peak_flops, peak_bandwidth):
    """For work made of ``layers`` [(FLOP, minimum bytes or None)] that took ``seconds``: the
    totals, the achieved TFLOP/s and GB/s, and the fraction of the roofline — the floor (per
    layer the slower of its FLOP at peak and its minimum bytes at peak bandwidth, summed) over
    the measured time."""
    flop = sum(f for f, _ in layers)
    nbytes = None if any(b is None for _, b in layers) else sum(b for _, b in layers)
    floor = sum(f / peak_flops if b is None else max(f / peak_flops, b / peak_bandwidth) for f, b in layers)
    return {
        "flop": flop,
        "min_bytes": nbytes,
        "tflops": flop / seconds / 1e12,
        "gbps": None if nbytes is None else nbytes / seconds / 1e9,
        "roofline_fraction": floor / seconds,
    }
