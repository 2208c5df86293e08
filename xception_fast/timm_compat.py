"""State-dict conversion between timm's ``legacy_xception`` and :class:`xception_fast.Xception`.

Both models hold the same tensors; only the names differ. One table of module-prefix pairs
drives both directions.
"""
from collections import OrderedDict

__all__ = ["convert_timm_state_dict", "convert_to_timm_state_dict"]


def _separable_unit_pairs(timm_block: str, ours_block: str, units: int, starts_with_relu: bool):
    # timm's Block.rep is [ReLU, SepConv, BN] * units (minus the first ReLU when the block does
    # not start with one), then a MaxPool; ours names the units sepconvN / bnN.
    offset = 1 if starts_with_relu else 0
    pairs = []
    for i in range(units):
        sep, bn = f"{timm_block}.rep.{3 * i + offset}", f"{timm_block}.rep.{3 * i + offset + 1}"
        pairs += [
            (f"{sep}.conv1", f"{ours_block}.sepconv{i + 1}.dconv"),
            (f"{sep}.pointwise", f"{ours_block}.sepconv{i + 1}.pconv"),
            (bn, f"{ours_block}.bn{i + 1}"),
        ]
    return pairs


def _prefix_pairs():
    pairs = [
        ("conv1", "entry_conv1.0"), ("bn1", "entry_conv1.1"),
        ("conv2", "entry_conv2.0"), ("bn2", "entry_conv2.1"),
    ]
    downsampling = {1: "entry_block1", 2: "entry_block2", 3: "entry_block3", 12: "exit_block"}
    for timm_index, ours in downsampling.items():
        pairs += [(f"block{timm_index}.skip", f"{ours}.project.0"), (f"block{timm_index}.skipbn", f"{ours}.project.1")]
        pairs += _separable_unit_pairs(f"block{timm_index}", ours, 2, starts_with_relu=timm_index != 1)
    for i in range(8):
        pairs += _separable_unit_pairs(f"block{i + 4}", f"middle_flow.{i}", 3, starts_with_relu=True)
    pairs += [
        ("conv3.conv1", "exit_conv1.0.dconv"), ("conv3.pointwise", "exit_conv1.0.pconv"), ("bn3", "exit_conv1.1"),
        ("conv4.conv1", "exit_conv2.0.dconv"), ("conv4.pointwise", "exit_conv2.0.pconv"), ("bn4", "exit_conv2.1"),
        ("fc", "fc"),
    ]
    return pairs


_TIMM_TO_OURS = dict(_prefix_pairs())
_OURS_TO_TIMM = {ours: timm for timm, ours in _TIMM_TO_OURS.items()}


def _rename(state_dict, prefix_map, direction):
    out = OrderedDict()
    for key, value in state_dict.items():
        module, _, leaf = key.rpartition(".")
        if module not in prefix_map:
            raise KeyError(f"state_dict: key {key!r} has no counterpart ({direction})")
        out[f"{prefix_map[module]}.{leaf}"] = value
    return out


def convert_timm_state_dict(state_dict):
    """Map a timm ``legacy_xception`` state_dict onto :class:`xception_fast.Xception`.

    The tensors are shared, not copied. Raises ``KeyError`` naming any key that is not part of
    timm's legacy_xception.
    """
    return _rename(state_dict, _TIMM_TO_OURS, "timm -> xception_fast")


def convert_to_timm_state_dict(state_dict):
    """The reverse of :func:`convert_timm_state_dict`."""
    return _rename(state_dict, _OURS_TO_TIMM, "xception_fast -> timm")
