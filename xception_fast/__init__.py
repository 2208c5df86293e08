"""xception_fast: every depthwise-separable unit of a model fused into one kernel.

The reference model, the timm interop and the contract import with the package; the op, which
needs its kernels, loads them on first use (xception_fast._extension).
"""
from .contract import fold_bn, sepconv_reference
from .model import Xception
from .timm_compat import convert_timm_state_dict, convert_to_timm_state_dict

__all__ = ["Xception", "convert_timm_state_dict", "convert_to_timm_state_dict", "sepconv", "sepconv_bn",
           "sepconv_reference", "pack_weights", "fold_bn", "fuse", "FuseReport", "UnitReport",
           "FusedSeparableConv2d", "FusedConv2dBN", "FusedBlock"]

_LAZY = {
    "sepconv": "ops", "sepconv_bn": "ops", "pack_weights": "ops",
    "fuse": "fusion", "FuseReport": "fusion", "UnitReport": "fusion", "FusedSeparableConv2d": "fusion",
    "FusedConv2dBN": "fusion", "FusedBlock": "fusion",
}


def __getattr__(name):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module 'xception_fast' has no attribute {name!r}")
