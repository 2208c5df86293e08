"""CI's check of a plain (non-editable) install: run from outside the checkout, the package comes
from site-packages, compiles the kernels it carries on first use, and computes the unit exactly as
its reference does."""
import os
import sys

import torch

import xception_fast

here = os.path.dirname(os.path.abspath(xception_fast.__file__))
if "site-packages" not in here:
    sys.exit(f"installed_smoke: xception_fast was imported from {here}, not from an installed copy")
if os.getcwd().startswith(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))):
    sys.exit("installed_smoke: run it from outside the checkout")

g = torch.Generator().manual_seed(0)
x = torch.randn(2, 16, 9, 7, generator=g).contiguous(memory_format=torch.channels_last)
dw, dw_bias = torch.randn(16, 1, 5, 5, generator=g) / 5, torch.randn(16, generator=g)
pw, pw_bias = torch.randn(24, 16, 1, 1, generator=g) / 4, torch.randn(24, generator=g)
options = dict(stride=2, padding=2, dilation=1, act_in="relu", act_mid="relu6", act_out="identity")
y = xception_fast.sepconv(x, dw, pw, pw_bias, dw_bias=dw_bias, **options)
f64 = [t.double() for t in (x, dw, dw_bias, pw, pw_bias)]
reference = xception_fast.sepconv_reference(f64[0], f64[1], f64[2], f64[3], f64[4], None, *options.values())
error = (y.double() - reference).abs().max().item()
print(f"installed_smoke ({os.environ.get('XCEPTION_FAST_SMOKE_RUN', '')} run): xception_fast from {here}, "
      f"output {tuple(y.shape)}, max abs error {error:.2e}")
if y.shape != reference.shape or error > 1e-4:
    sys.exit("installed_smoke: the installed op does not compute the unit")
