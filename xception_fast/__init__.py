"""xception_fast: every depthwise-separable unit of a model fused into one kernel.

Importing the package defines the ops (torch.ops.xception_fast.sepconv, its fake, autograd and
autocast rule; torch.ops.xception_fast.max_pool_add) and needs no compiler; its C++ kernels are compiled or loaded on the first call that
needs them (xception_fast._extension), the Triton kernel on the first call with backend="triton".
"""
from .contract import fold_bn, sepconv_reference
from .model import Xception
from .ops import max_pool_add, pack_weights, sepconv, sepconv_bn
from .timm_compat import convert_timm_state_dict, convert_to_timm_state_dict

__all__ = ["Xception", "convert_timm_state_dict", "convert_to_timm_state_dict", "sepconv", "sepconv_bn",
           "sepconv_reference", "pack_weights", "max_pool_add", "fold_bn", "fuse", "FuseReport", "UnitReport",
           "FusedSeparableConv2d", "FusedConv2dBN", "FusedMaxPool2d", "FusedBlock"]

_LAZY = {
    "fuse": "fusion", "FuseReport": "fusion", "UnitReport": "fusion", "FusedSeparableConv2d": "fusion",
    "FusedConv2dBN": "fusion", "FusedMaxPool2d": "fusion", "FusedBlock": "fusion",
}


def __getattr__(name):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module 'xception_fast' has no attribute {name!r}")
