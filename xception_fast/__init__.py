"""xception_fast: Xception with every depthwise-separable conv + BatchNorm unit fused into one kernel.

The reference model and the timm interop import with the package; the op (``sepconv_bn``), which
needs the compiled extension, loads on first access.
"""
from .model import Xception
from .timm_compat import convert_timm_state_dict, convert_to_timm_state_dict

__all__ = ["Xception", "convert_timm_state_dict", "convert_to_timm_state_dict", "sepconv_bn",
           "sepconv_bn_reference", "fold_bn"]

_LAZY = {
    "sepconv_bn": "ops", "sepconv_bn_reference": "ops", "fold_bn": "ops",
}


def __getattr__(name):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module 'xception_fast' has no attribute {name!r}")
_LAZY.update({name: "fusion" for name in ("fuse", "FusedSeparableConvBN", "FusedAwayConv2d", "FusedAwayBatchNorm2d",
                                       "FuseReport")})
__all__ += ["fuse", "FusedSeparableConvBN", "FusedAwayConv2d", "FusedAwayBatchNorm2d", "FuseReport"]
