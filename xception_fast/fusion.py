"""Swapping the fused op into a model: ``fuse(model)``.

What is fused
-------------
A *separable unit* is a depthwise conv and the pointwise conv it feeds, with what may sit around
them::

    [act ->] DW k x k -> [BN] [-> act] -> PW 1x1 -> [BN] [-> act] [-> + residual]

where BN is ``nn.BatchNorm2d`` (or timm's ``BatchNormAct2d``, whose BatchNorm is folded and whose
activation is taken), act is ReLU / ReLU6 / Hardswish, and modules that are identities in eval
(``nn.Identity``, Dropout, stochastic depth) may sit anywhere in the chain. Every other convolution
followed by a BatchNorm (stems, MobileNetV2's expansion convs, shortcuts) gets that BatchNorm folded
into its weights in eval, and a max-pool whose result only an add takes (Xception's down-sampling
blocks end in ``maxpool(x) + shortcut``) gets that add in its own pass.

How it is found
---------------
By dataflow, not by module names: a module's forward is traced with torch.fx, every child that holds
a convolution inlined (so a unit split over containers, such as timm's aligned Xception, whose
leading ReLU, separable conv and residual add sit in three different modules, is seen whole), every
other child a leaf. A unit belongs to the *lowest* module whose forward runs all of it (its owner);
the owner's forward is rewritten, in an fx graph, to call the unit in one node. A unit is fused only
where that is exact: see ``_match`` for each refusal, and ``FuseReport`` for what the report says.

What the fused model is made of
-------------------------------
Every module stays in its slot, with its class, parameters, buffers and state_dict keys; only three
things change:

- the depthwise conv of a fused unit becomes a :class:`FusedSeparableConv2d` (its class is swapped in
  place: the same object, the same parameters). Called alone it is the conv it was; called by its
  owner with the rest of its unit's modules it runs the unit in one kernel.
- a conv with a folded BatchNorm becomes a :class:`FusedConv2dBN` in the same way, and a max-pool
  that takes its add a :class:`FusedMaxPool2d` (called alone, the pool it was).
- the owner's class becomes a subclass of its own, ``Fused<Class>`` (:class:`FusedBlock`), whose
  forward runs the rewritten graph (``fused_code`` shows it). The pointwise convs, BatchNorms and
  activations stay real registered children of their modules and are passed to the fused call, so
  ``state_dict``, ``load_state_dict`` of an unfused checkpoint, ``.to()``, optimizers, deepcopy and
  pickling see the model they saw.
"""
import collections
import dataclasses
import itertools
import linecache
import operator
import weakref
from typing import List, Optional

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn
from torch._prims_common import suggest_memory_format
from torch.nn.modules.batchnorm import _BatchNorm

from . import ops
from .contract import BACKENDS, KERNEL_SIZES, STRIDES, check_args, empty_output, fold_bn
from .contract import output_size as conv_extent
from .registration import call_below_autograd_and_autocast

__all__ = ["FusedSeparableConv2d", "FusedConv2dBN", "FusedMaxPool2d", "FusedBlock", "FuseReport", "UnitReport",
           "fuse"]

_OP_ACTIVATIONS = {nn.ReLU: "relu", nn.ReLU6: "relu6", nn.Hardswish: "hardswish"}
_HALF = (torch.float16, torch.bfloat16)
_POOL_DTYPES = (torch.float32, torch.float64) + _HALF


# ----------------------------------------------------------------------------------------------
# What the modules in a chain are

def _optional_class(module, name):
    try:
        return getattr(__import__(module, fromlist=[name]), name)
    except (ImportError, AttributeError):
        return None


# Classes from timm and torchvision, when they are installed: fuse() never needs them itself.
_CONV2D_SAME = _optional_class("timm.layers.conv2d_same", "Conv2dSame")
_BN_ACT = _optional_class("timm.layers.norm_act", "BatchNormAct2d")
_DROP_PATH = tuple(c for c in (_optional_class("timm.layers.drop", "DropPath"),
                               _optional_class("torchvision.ops.stochastic_depth", "StochasticDepth")) if c)


# Whether oneDNN's convolution takes bfloat16 on this CPU: it needs AVX-512 (BW, VL, DQ) or
# AVX-NE-CONVERT, and refuses bf16 elsewhere (AVX2 CPUs), where eager's convolution runs ATen's own.
_ONEDNN_BF16 = torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported()

# Whether this CPU multiplies bfloat16 in instructions of its own (AVX512-BF16; every CPU with AMX
# has it too), as oneDNN's bf16 convolutions then do. Without them oneDNN's bf16 convolution widens
# its operands to fp32 inside its kernel and runs several times slower than its fp32 one (README,
# "Folded convs in bf16"), and ATen's (AVX2 CPUs) slower still: a folded conv with enough arithmetic
# then runs in fp32 on its operands rounded to bf16 (FusedConv2dBN._widens_bf16).
_CPU_MULTIPLIES_BF16 = getattr(torch.cpu, "_is_avx512_bf16_supported", lambda: True)()

# The least multiply-adds per element read and written (x's and the result's, per output pixel) for
# which a folded bf16 conv runs in fp32 on a CPU without bf16 instructions: widening x and rounding
# the result are a pass over memory each, which only a conv with this much arithmetic per element
# makes up for (a few-channel conv is memory-bound either way).
_WIDEN_MIN_MACS_PER_ELEMENT = 16

# The op's activations as oneDNN's convolution post-ops (mkldnn::_convolution_pointwise's attr).
_ONEDNN_ACTIVATIONS = {"identity": ("none", []), "relu": ("relu", []), "relu6": ("hardtanh", [0.0, 6.0]),
                       "hardswish": ("hardswish", [])}


def _act_name(m):
    """The op's name for activation module m, or None if the op has no such activation."""
    name = _OP_ACTIVATIONS.get(type(m))
    if name is None and type(m) is nn.Hardtanh and m.min_val == 0.0 and m.max_val == 6.0:
        name = "relu6"
    return name


def _is_bn_act(m):
    return _BN_ACT is not None and type(m) is _BN_ACT


def _is_plain_bn(m):
    # Exact classes: a subclass may compute something else in its forward.
    return type(m) in (nn.BatchNorm2d, nn.SyncBatchNorm)


def _drop_probability(m):
    """p of a module that is the identity in eval and random in train (Dropout, stochastic depth),
    or None for any other module."""
    if isinstance(m, nn.modules.dropout._DropoutNd):
        return m.p
    if _DROP_PATH and isinstance(m, _DROP_PATH):
        return getattr(m, "drop_prob", getattr(m, "p", None))
    return None


def _is_identity_now(m):
    """Whether m passes its input through in its current mode."""
    if type(m) is nn.Identity:
        return True
    p = _drop_probability(m)
    return p is not None and (not m.training or p == 0)


def _bn_act_problem(m):
    """Why timm's BatchNormAct2d m cannot be taken into the op (None if it can)."""
    if not (type(m.drop) is nn.Identity or _drop_probability(m.drop) is not None):
        return f"its drop layer {type(m.drop).__name__} is not an eval-mode identity"
    if type(m.act) is not nn.Identity and _act_name(m.act) is None:
        return f"its activation {type(m.act).__name__} is not one of the op's (relu, relu6, hardswish)"
    return None


def _module_tensor(m, name):
    """m's parameter or buffer ``name``, read from the module's own tables: nn.Module.__getattr__
    costs several times as much, on every call of every fused conv, which at batch 1 is a large part
    of a small model's time. Anything else (a parametrization's property) through getattr."""
    params = m._parameters
    if name in params:
        return params[name]
    buffers = m._buffers
    if name in buffers:
        return buffers[name]
    return getattr(m, name, None)


def _bn_foldable(bn):
    """Whether BatchNorm bn normalises with its running statistics now (the rule of its forward)."""
    return (not bn.training and _module_tensor(bn, "running_mean") is not None
            and _module_tensor(bn, "running_var") is not None)


def _bn_sources(bn):
    # BatchNorm's own train-mode update of its running statistics happens inside its kernel and
    # leaves their _version as it was; num_batches_tracked, incremented by an in-place add in the
    # module's forward, is what changes with each update.
    return tuple(_module_tensor(bn, name) for name in ("weight", "bias", "running_mean", "running_var",
                                                          "num_batches_tracked"))


def _needs_grad(tensors):
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


def _versions(tensors):
    """What names the contents of ``tensors`` now (each one's version, address, dtype and device), as the
    key under which a fold or pack of them is kept for the next call; or None where it may not be
    kept: while compiling (the fold is then part of the graph, and guards on versions would
    recompile), where autograd needs it (it must be differentiable), and for inference tensors
    (they have no version). One pass, as it runs on every call."""
    if torch.compiler.is_compiling():
        return None
    grad = torch.is_grad_enabled()
    key = []
    for t in tensors:
        if t is None:
            key.append(None)
        elif (grad and t.requires_grad) or t.is_inference():
            return None
        else:
            key.append((t._version, t.data_ptr(), t.dtype, t.device))
    return tuple(key)


def _unit_weights(owner, dtype, backend, output_size, dw_weight, dw_bias, dw_bn, pw_weight, pw_bias, pw_bn, eps):
    """(dw_weight, dw_bias, pw_weight, pw_bias, packed) for a unit's op (FusedSeparableConv2d._sources
    gives the arguments after output_size): its BatchNorms folded and, where the fold may be kept
    (``_versions``; ``owner``, the unit's conv, holds it), the weights packed for ``backend`` and
    x of ``dtype``, cached per weight version."""
    def fold(weight, bias, bn, bn_eps):
        return (weight, bias) if not bn else fold_bn(weight, bn[0], bn[1], bn[2], bn[3], bn_eps, bias)

    def make(pack):
        dw_w, dw_b = fold(dw_weight, dw_bias, dw_bn, eps[0])
        pw_w, pw_b = fold(pw_weight, pw_bias, pw_bn, eps[1])
        packed = None
        if pack and backend != "reference":
            with torch.no_grad():
                packed = ops.pack_weights(backend, dtype, dw_w, dw_b, pw_w, pw_b, output_size)
        return dw_w, dw_b, pw_w, pw_b, packed

    sources = (dw_weight, dw_bias, *dw_bn, pw_weight, pw_bias, *pw_bn)
    versions = None if owner is None else _versions(sources)
    if versions is None:
        return make(pack=False)
    # The kernels refuse packed weights made for another dtype or fp32 precision setting; the key
    # holds what the pack depends on, so that a change repacks instead of failing.
    settings = (tuple(eps), dtype, backend, torch.is_inference_mode_enabled(),
                _fp32_precision() if backend == "cpu" and dtype == torch.float32 else None, output_size)
    return owner._cached(sources, versions + settings, lambda: make(pack=True))


# The fused convs by a number, which a traced op can carry (an op takes no module).
_OWNERS = weakref.WeakValueDictionary()
_NEXT_OWNER = itertools.count()


def _register_owner(conv):
    conv._owner_slot = next(_NEXT_OWNER)
    _OWNERS[conv._owner_slot] = conv


@torch.library.custom_op("xception_fast::unit_with_cached_weights", mutates_args=(), device_types="cpu")
def _unit_with_cached_weights(x: torch.Tensor, dw_weight: torch.Tensor, dw_bias: Optional[torch.Tensor],
                              dw_bn: List[Optional[torch.Tensor]], pw_weight: torch.Tensor,
                              pw_bias: Optional[torch.Tensor], pw_bn: List[Optional[torch.Tensor]], eps: List[float],
                              residual: Optional[torch.Tensor], stride: int, padding: int, dilation: int, act_in: str,
                              act_mid: str, act_out: str, owner: int) -> torch.Tensor:
    """A fused unit on the CPU as torch.compile runs it: the unit's own weights and BatchNorm
    tensors (as FusedSeparableConv2d._sources lists them, the BatchNorms unfolded) in, the fold
    and the pack looked up in the cache of the conv registered as ``owner``, made again when a
    weight's version changed. Inference only: it has no autograd."""
    # The C++ op checks the arguments; the checks in Python (contract.check_args) would cost several
    # times the lookup on every call.
    k = dw_weight.shape[-1]
    shape = (x.shape[0], pw_weight.shape[0]) + tuple(conv_extent(n, k, stride, padding, dilation) for n in x.shape[2:])
    dw_w, dw_b, pw_w, pw_b, packed = _unit_weights(_OWNERS.get(owner), x.dtype, "cpu", shape, dw_weight,
                                                   dw_bias, dw_bn, pw_weight, pw_bias, pw_bn, eps)
    # No gradient and x already cast: straight to the C++ kernel, as ops.run_backend calls it.
    return call_below_autograd_and_autocast(torch.ops.xception_fast.sepconv, (
        x, dw_w, dw_b, pw_w, pw_b, residual, stride, padding, dilation, act_in, act_mid, act_out, packed))


@_unit_with_cached_weights.register_fake
def _unit_with_cached_weights_fake(x, dw_weight, dw_bias, dw_bn, pw_weight, pw_bias, pw_bn, eps, residual, stride,
                                   padding, dilation, act_in, act_mid, act_out, owner):
    return empty_output(x, check_args(x, dw_weight, dw_bias, pw_weight, pw_bias, residual, stride, padding, dilation,
                                      act_in, act_mid, act_out))


# The op's activations as modules: the conv's activation where it runs after the convolution.
_ACTIVATION_MODULES = {"identity": None, "relu": nn.ReLU(), "relu6": nn.ReLU6(), "hardswish": nn.Hardswish()}


@torch.library.custom_op("xception_fast::conv_bn_with_cached_weights", mutates_args=(), device_types="cpu")
def _conv_bn_with_cached_weights(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
                                 bn: List[Optional[torch.Tensor]], eps: float, stride: List[int], padding: List[int],
                                 dilation: List[int], act: str, owner: int) -> torch.Tensor:
    """A conv with its BatchNorm folded (a FusedConv2dBN, ``owner``) on the CPU as torch.compile runs
    it: the conv's weight and bias and the BatchNorm's tensors (_bn_sources) in, x in the dtype the
    conv multiplies in; the fold, and the weight in oneDNN's layout, looked up in the owner's cache
    when the graph runs, made again when a weight's version changed. stride, padding and dilation
    are the owner's, for the fake. Inference only: it has no autograd."""
    conv = _OWNERS.get(owner)
    if conv is None:
        raise RuntimeError(f"conv_bn_with_cached_weights: owner {owner} names no fused conv (the module is gone)")
    y = conv._folded(x, (weight, bias, *bn), eps, x.dtype, _ACTIVATION_MODULES[act])
    return y.contiguous(memory_format=suggest_memory_format(x))  # the fake's format, whatever the conv gave


@_conv_bn_with_cached_weights.register_fake
def _conv_bn_with_cached_weights_fake(x, weight, bias, bn, eps, stride, padding, dilation, act, owner):
    shape = [x.shape[0], weight.shape[0]] + [conv_extent(n, k, s, p, d) for n, k, s, p, d in
                                             zip(x.shape[2:], weight.shape[2:], stride, padding, dilation)]
    return empty_output(x, shape)


def _compute_dtype(x):
    """The dtype the convs of eager PyTorch would multiply x in: the autocast dtype under autocast."""
    device = x.device.type
    if x.dtype != torch.float64 and torch.is_autocast_enabled(device):
        return torch.get_autocast_dtype(device)
    return x.dtype


def _fp32_precision():
    conv = getattr(torch.backends.mkldnn, "conv", None)
    return getattr(conv, "fp32_precision", None)


def _same_pads(shape, kernel_size, stride, dilation):
    """F.pad's pads of TensorFlow's "same" padding for a conv of an input of ``shape``, as timm's
    Conv2dSame pads (asymmetric where the total is odd): integer arithmetic only, so that it also
    runs on symbolic sizes."""
    pads = []
    for size, k, s, d in zip(reversed(shape[-2:]), reversed(kernel_size), reversed(stride), reversed(dilation)):
        total = max((-(-size // s) - 1) * s + (k - 1) * d + 1 - size, 0)
        pads += [total // 2, total - total // 2]
    return pads


def _pad_same(x, kernel_size, stride, dilation):
    return F.pad(x, _same_pads(x.shape, kernel_size, stride, dilation))


# ----------------------------------------------------------------------------------------------
# The fused convs

class _FusedConv:
    """What both fused conv classes share. They are made by swapping the class of the user's own
    conv object (``nn.Conv2d`` or timm's ``Conv2dSame``), so that every reference to it, its hooks
    and its parameters stay; ``_conv_class`` remembers what it was, for the conv alone."""

    _conv_class = nn.Conv2d

    def _adopt(self, conv_class, backend):
        self._conv_class = conv_class
        self.backend = backend
        self._fused_cache = None
        _register_owner(self)

    def conv_alone(self, x):
        """The conv as it was before fuse()."""
        return self._conv_class.forward(self, x)

    def _conv_with(self, x, weight, bias):
        """This conv's computation (its padding, padding mode and "same" rule) with other weights."""
        if self._conv_class is not nn.Conv2d:  # timm's Conv2dSame: pad, then an unpadded conv
            return F.conv2d(_pad_same(x, self.kernel_size, self.stride, self.dilation), weight, bias, self.stride,
                            0, self.dilation, self.groups)
        return self._conv_forward(x, weight, bias)

    def _in_onednn(self, x, dtype, tensors):
        """Whether this conv of x in dtype, with ``tensors`` (its weight and bias), runs as oneDNN's
        convolution with its bias and activation as post-ops: on a CPU with oneDNN, for bfloat16
        where oneDNN has it (``_ONEDNN_BF16``), and for float32 with channels-last x (where eager's
        convolution is oneDNN's too, without the activation's pass over its result); never where autograd needs the result, as oneDNN's
        op has no derivative (its gradients would silently be none)."""
        float32 = dtype == torch.float32 and x.is_contiguous(memory_format=torch.channels_last)
        return (x.device.type == "cpu" and ((dtype == torch.bfloat16 and _ONEDNN_BF16) or float32)
                and torch.backends.mkldnn.is_available() and torch.backends.mkldnn.enabled
                and self.padding_mode == "zeros" and not isinstance(self.padding, str)
                and not _needs_grad((x,) + tuple(tensors)))

    def _onednn_input_size(self, x):
        """The size of the input oneDNN's convolution takes for x (padded for timm's "same" rule)."""
        if self._conv_class is nn.Conv2d:
            return tuple(x.shape)
        pads = _same_pads(x.shape, self.kernel_size, self.stride, self.dilation)
        return tuple(x.shape[:2]) + (x.shape[2] + pads[2] + pads[3], x.shape[3] + pads[0] + pads[1])

    def _onednn_padding(self):
        """The padding oneDNN's convolution is given: the conv's own, or none for timm's "same"
        rule, whose input is padded before it (_onednn_input_size)."""
        return list(self.padding) if self._conv_class is nn.Conv2d else [0, 0]

    def _onednn_weight(self, weight, input_size):
        """weight in oneDNN's own layout for inputs of input_size: a plain one is reordered inside
        every call, which at batch 1 costs as much as the convolution of a small 1x1 conv."""
        return torch.ops.mkldnn._reorder_convolution_weight(weight, self._onednn_padding(), list(self.stride),
                                                           list(self.dilation), self.groups, list(input_size))

    def _conv_in_onednn(self, x, weight, bias, act, onednn_weight=None):
        """This conv as oneDNN's convolution with ``bias`` and, where the op has it, the activation
        module ``act`` in its epilogue (``onednn_weight``: the weight in oneDNN's layout for this
        input, if given). Returns (result, the activation still to apply or None), or None where
        ``_in_onednn`` does not allow it."""
        if not self._in_onednn(x, weight.dtype, (weight, bias)):
            return None
        name = "identity" if act is None else _act_name(act)
        attr, scalars = _ONEDNN_ACTIVATIONS[name or "identity"]
        if self._conv_class is not nn.Conv2d:
            x = _pad_same(x, self.kernel_size, self.stride, self.dilation)
        y = torch.ops.mkldnn._convolution_pointwise(x, weight if onednn_weight is None else onednn_weight, bias,
                                                    self._onednn_padding(), list(self.stride), list(self.dilation),
                                                    self.groups, attr, scalars, None)
        return y, None if name else act

    def _conv_with_float32_bias(self, x, weight, bias, act, onednn_weight=None):
        """This conv with half-precision weights plus a float32 bias, the sum rounded once to the
        conv's half-precision result (where eager's BatchNorm rounds its output; a half-precision
        conv bias would be rounded before the add). On a CPU with oneDNN that is one convolution
        with the bias, and the activation, in its epilogue (``_conv_in_onednn``); elsewhere an add
        into the conv's result. Returns (result, the activation still to apply or None)."""
        in_onednn = weight.dtype == torch.bfloat16 and self._conv_in_onednn(x, weight, bias, act, onednn_weight)
        if in_onednn:
            return in_onednn
        # In place: the float32 sum is rounded once, into the conv's half-precision result.
        return self._conv_with(x, weight, None).add_(bias.reshape(-1, 1, 1)), act

    def _forget(self):
        # Whenever this module runs a BatchNorm of its unit as a module (train mode), the BatchNorm
        # may update its running statistics: the next fold starts afresh, whatever the key says.
        if not torch.compiler.is_compiling():
            self._fused_cache = None

    def _cached(self, sources, key, make):
        # key: _versions(sources) and the settings the value depends on. One entry: a weight
        # version, dtype and setting at a time. A model that alternates between dtypes refolds on
        # each switch, which costs a fold per switch, never a wrong result. The entry holds the
        # source tensors: while it lives, their memory cannot be handed to new tensors, so a key's
        # addresses and versions name these tensors and no others.
        cache = self._fused_cache
        if cache is not None and cache[0] == key:
            return cache[1]
        value = make()
        self._fused_cache = (key, value, sources)
        return value

    def __getstate__(self):
        # The cache is derived data tied to tensor addresses: a copy or a pickle rebuilds it.
        state = super().__getstate__()
        state["_fused_cache"] = None
        return state

    def __setstate__(self, state):
        super().__setstate__(state)
        _register_owner(self)  # a copy or an unpickled module has a cache of its own


class FusedConv2dBN(_FusedConv, nn.Conv2d):
    """A convolution whose BatchNorm (the next module in its block) is folded into its weights in eval.

    ``conv(x)``: the conv alone, as before fuse(). ``conv(x, bn=bn)``, as the fused block calls it:
    ``bn(conv(x))``. With bn in eval mode that is one conv with weights and bias folded in float32
    (``fold_bn``), cached until a weight, a running statistic, the dtype or the autocast state
    changes; with bn using batch statistics (train mode) it is the two modules, one after the other,
    so that the running statistics are updated by bn itself.

    The fold is for float32 weights (float32 models, and autocast, which rounds the folded weights
    once as it rounds eager's); a model converted to half precision runs the two modules. Under
    autocast the folded bias is added in float32 to the conv's half-precision result, so that the
    result is rounded once after the bias, where eager's BatchNorm rounds its output (a half-precision
    conv bias would be rounded before the add).
    """

    def forward(self, x, bn=None, act=None):
        if bn is None:
            return self.conv_alone(x)
        bn_act = _is_bn_act(bn)
        sources = (_module_tensor(self, "weight"), _module_tensor(self, "bias")) + _bn_sources(bn)
        if sources[0].dtype != torch.float32 or not _bn_foldable(bn) or (
                bn_act and not _is_identity_now(bn.drop)):
            # Weights stored in half precision would be rounded a second time once folded (eager
            # rounds them once, when they are made): the fold would save a pass at the cost of
            # exactness, so such a conv runs as its two modules. Float64 ones too: the fold is
            # float32 by contract (contract.fold_bn), coarser than the model.
            self._forget()  # bn may update its running statistics
            y = bn(self.conv_alone(x))
            return y if act is None else act(y)
        if bn_act:
            # timm's BatchNormAct2d: its activation is the one after the BatchNorm (its drop is an
            # identity here, checked above).
            act = None if type(bn.act) is nn.Identity else bn.act
        dtype = _compute_dtype(x)
        if (torch.compiler.is_compiling() and x.device.type == "cpu" and self._conv_class is nn.Conv2d
                and not isinstance(self.padding, str) and x.is_contiguous(memory_format=torch.channels_last)
                and not _needs_grad((x,) + sources)):
            # Traced, the fold would run in the graph on every call, and oneDNN would lay the folded
            # weight out inside every convolution: this op looks the fold up in this module's cache
            # when the graph runs, as the units' op does. x is cast here as the conv would cast it.
            name = "identity" if act is None else _act_name(act)
            y = torch.ops.xception_fast.conv_bn_with_cached_weights(
                x.to(dtype), sources[0], sources[1], list(sources[2:]), bn.eps, list(self.stride),
                list(self.padding), list(self.dilation), name or "identity", self._owner_slot)
            return y if name else act(y)
        return self._folded(x, sources, bn.eps, dtype, act)

    def _widens_bf16(self, x, dtype, sources):
        """Whether this conv of x in ``dtype`` runs in fp32 on x and the folded weight rounded to
        bf16, then rounds its result to bf16: for bf16 on a CPU without bf16 instructions
        (_CPU_MULTIPLIES_BF16), as oneDNN's fp32 convolution (_in_onednn), where the conv has
        enough arithmetic per element it moves (_WIDEN_MIN_MACS_PER_ELEMENT). A product of two
        bf16 values is exact in fp32, so that is the arithmetic of a bf16 conv with fp32 sums, the
        one eager's runs on such a CPU too, and the result is rounded once after the bias and the
        activation, as the bf16 convolution's post-ops round it."""
        if dtype != torch.bfloat16 or _CPU_MULTIPLIES_BF16 or not self._in_onednn(x, torch.float32, sources):
            return False
        (kh, kw), (sh, sw) = self.kernel_size, self.stride
        macs = self.out_channels * self.in_channels // self.groups * kh * kw
        return macs >= _WIDEN_MIN_MACS_PER_ELEMENT * (self.in_channels * sh * sw + self.out_channels)

    def _folded(self, x, sources, eps, dtype, act):
        """act(bn(conv(x))) with the BatchNorm folded in float32, for x in dtype, the fold (and the
        weight in oneDNN's layout) cached per weight version where it may be. ``sources``: the
        conv's weight and bias, then the BatchNorm's _bn_sources; ``act``: a module or None."""
        versions = _versions(sources)
        widened = self._widens_bf16(x, dtype, sources)
        # Kept with the fold, the weight in oneDNN's layout for this input size (a reorder has no
        # gradient, and traced it would run on every call: only for a cached fold). oneDNN lays out
        # a float32 weight for the precision its setting allows, which the key therefore holds.
        input_size = (self._onednn_input_size(x)
                      if versions is not None and (widened or self._in_onednn(x, dtype, ())) else None)
        precision = (_fp32_precision() if input_size is not None and (dtype == torch.float32 or widened)
                     else None)

        def make():
            weight, bias = fold_bn(sources[0], *sources[2:6], eps, sources[1])
            weight = weight.to(dtype if dtype in _HALF else x.dtype)
            if widened:
                weight = weight.float()  # rounded to bf16 as eager's weight is, then widened exactly
            bias = bias if dtype in _HALF else bias.to(x.dtype)
            return weight, bias, None if input_size is None else self._onednn_weight(weight, input_size)

        if versions is not None:
            weight, bias, onednn_weight = self._cached(
                sources, versions + (eps, dtype, torch.is_inference_mode_enabled(), input_size, precision, widened),
                make)
        else:
            weight, bias, onednn_weight = make()
        if widened:
            # x rounded to bf16 as the bf16 conv would round it (under autocast it may come in fp32).
            y, act = self._conv_in_onednn(x.to(dtype).float(), weight, bias, act, onednn_weight)
            y = y.to(dtype)
        elif dtype in _HALF:
            # Under autocast x may come in float32; the conv would cast it as eager's does.
            y, act = self._conv_with_float32_bias(x.to(dtype), weight, bias, act, onednn_weight)
        else:
            # float32: oneDNN's convolution where the cached fold holds its weight for this input.
            in_onednn = onednn_weight is not None and self._conv_in_onednn(x, weight, bias, act, onednn_weight)
            if in_onednn:
                y, act = in_onednn
            elif _needs_grad((x, weight, bias)):
                # The folded bias's gradient is eager's BatchNorm bias gradient, a sum over the
                # pixels: ATen's CPU convolution backward sums it coarser than autograd's sum for a
                # broadcast add (torch.sum's), so the bias is added apart where a gradient is made.
                y = self._conv_with(x, weight, None) + bias.reshape(-1, 1, 1)
            else:
                y = self._conv_with(x, weight, bias)
        return y if act is None else act(y)

    def extra_repr(self):
        return super().extra_repr() + ", BatchNorm folded in eval"


class FusedSeparableConv2d(_FusedConv, nn.Conv2d):
    """The depthwise conv of a fused separable unit, which runs the whole unit in one kernel.

    ``conv(x)``: the depthwise conv alone, as before fuse(). ``conv(x, act_in=, mid=, pw=, out=,
    residual=)``, as its fused block calls it, with the unit's own modules: ``act_in`` before the
    depthwise conv, ``mid`` the modules between it and the pointwise conv ``pw`` (BatchNorm,
    activation, eval-mode identities), ``out`` those after ``pw``, and the residual added last.
    The result is the one the modules give run one after another; what runs depends on their modes:

    - everything in eval (BatchNorms on running statistics, Dropout and stochastic depth off): one
      call of the op, with both BatchNorms folded (float32) and the weights packed for the backend,
      cached per weight version, dtype, backend and precision setting;
    - a BatchNorm after the pointwise conv that needs batch statistics (train mode), or active
      stochastic depth before the residual add: the op runs the unit up to that module, and the
      rest (BatchNorm, activation, stochastic depth, the add) runs as eager modules. Xception's
      units (no BatchNorm between the convs) are fused in training too. On a CPU the op keeps the
      depthwise result for the backward, as eager's convs do, unless ``recompute_depthwise`` is
      set (fuse()'s argument); on a GPU the backward always recomputes it. Recomputed, neither it
      nor the input activation's output is stored: less memory, a depthwise conv more per unit.
    - a BatchNorm between the convs that needs batch statistics, or active Dropout there: the
      normalisation needs the whole depthwise result first, so the unit runs as its eager modules,
      one after the other (memory as eager).

    A model converted to half precision keeps its BatchNorm after the pointwise conv out of the
    fold (it runs as a module after the op): folded into half-precision weights it would round
    them twice. Under autocast the weights are float32 and everything folds.
    """

    def _adopt_unit(self, conv_class, backend, padding, recompute_depthwise):
        self._adopt(conv_class, backend)
        self.recompute_depthwise = recompute_depthwise
        # None: timm's TensorFlow "same" padding, made by padding x before the op.
        self._op_padding = padding

    def forward(self, x, act_in=None, mid=(), pw=None, out=(), residual=None):
        if pw is None:
            return self.conv_alone(x)
        if x.dtype == torch.float64:
            return self._eager(x, act_in, mid, pw, out, residual)
        # The chain up to the pointwise conv goes into the op only if every module in it can.
        # The modules are checked as they are now, not as fuse() found them: one replaced since
        # (a wrapper, another activation) sends the unit to its eager steps.
        dw_bn, act_mid = None, "identity"
        act_in_name = "identity" if act_in is None else _act_name(act_in)
        for m in mid:
            kind = _kind(m)
            if kind == "bn":
                if dw_bn is not None or not _bn_foldable(m) or (_is_bn_act(m) and _bn_act_problem(m)) or (
                        _is_bn_act(m) and not _is_identity_now(m.drop)):
                    return self._eager(x, act_in, mid, pw, out, residual)
                dw_bn = m
                if _is_bn_act(m) and type(m.act) is not nn.Identity:
                    act_mid = _act_name(m.act)
            elif kind in ("drop", "identity"):
                if not _is_identity_now(m):
                    return self._eager(x, act_in, mid, pw, out, residual)
            elif kind == "act" and act_mid == "identity":
                act_mid = _act_name(m)
            else:
                return self._eager(x, act_in, mid, pw, out, residual)
        if act_in_name is None or _kind(pw) is not None or not isinstance(pw, nn.Conv2d):
            return self._eager(x, act_in, mid, pw, out, residual)
        # After it, the op takes as much as can go into its epilogue now. A BatchNorm folds into
        # float32 pointwise weights only: the kernels multiply in half precision, so folded weights
        # stored in half precision would be rounded a second time (the CPU and GPU kernels keep the
        # depthwise taps in float32, so the BatchNorm between the convs folds for any weight dtype).
        pw_bn, act_out, taken = None, "identity", 0
        pw_foldable = pw.weight.dtype == torch.float32
        for m in out:
            if _is_identity_now(m):
                pass
            elif _kind(m) == "bn":
                if pw_bn is not None or act_out != "identity" or not _bn_foldable(m) or not pw_foldable or (
                        _is_bn_act(m) and (_bn_act_problem(m) or not _is_identity_now(m.drop))):
                    break
                pw_bn = m
                if _is_bn_act(m) and type(m.act) is not nn.Identity:
                    act_out = _act_name(m.act)
            elif _act_name(m) is not None and act_out == "identity":
                act_out = _act_name(m)
            else:
                break
            taken += 1
        dtype = _compute_dtype(x)
        residual_in = residual is not None and taken == len(out) and self._residual_fits(x, pw, residual, dtype)
        y = self._op(x, dw_bn, pw, pw_bn, act_in_name, act_mid, act_out, residual if residual_in else None, dtype)
        if taken < len(out):
            self._forget()
        for m in out[taken:]:
            y = m(y)
        return y + residual if residual is not None and not residual_in else y

    def _eager(self, x, act_in, mid, pw, out, residual):
        """The unit's modules one after another, exactly as the unfused block runs them."""
        self._forget()
        y = self.conv_alone(act_in(x) if act_in is not None else x)
        for m in mid:
            y = m(y)
        y = pw(y)
        for m in out:
            y = m(y)
        return y if residual is None else y + residual

    def _output_shape(self, x, pw):
        k, s, d = self.kernel_size[0], self.stride[0], self.dilation[0]
        if self._op_padding is None:  # "same": ceil(size / stride)
            return [x.shape[0], pw.out_channels] + [-(-n // s) for n in x.shape[-2:]]
        p = self._op_padding
        return [x.shape[0], pw.out_channels] + [(n + 2 * p - d * (k - 1) - 1) // s + 1 for n in x.shape[-2:]]

    def _residual_fits(self, x, pw, residual, dtype):
        # The kernel adds a residual of the output's shape and dtype. Eager's add would broadcast
        # another shape or promote another dtype: that add stays eager.
        return (isinstance(residual, torch.Tensor) and list(residual.shape) == self._output_shape(x, pw)
                and residual.dtype == dtype and residual.device == x.device)

    def _weights(self, x, dw_bn, pw, pw_bn, dtype, backend):
        """(dw_weight, dw_bias, pw_weight, pw_bias, packed) of the op, BatchNorms folded."""
        # The CPU kernel lays oneDNN's weights out for the output's shape (other shapes would pay a
        # reorder per call).
        output_size = tuple(self._output_shape(x, pw)) if backend == "cpu" else None
        return _unit_weights(self, dtype, backend, output_size, *self._sources(dw_bn, pw, pw_bn))

    def _sources(self, dw_bn, pw, pw_bn):
        """What the op's weights are made of: (dw_weight, dw_bias, dw_bn, pw_weight, pw_bias, pw_bn,
        eps), each BatchNorm as its _bn_sources (() for none) and eps their two epsilons."""
        eps = [0.0 if bn is None else bn.eps for bn in (dw_bn, pw_bn)]
        return (_module_tensor(self, "weight"), _module_tensor(self, "bias"),
                () if dw_bn is None else _bn_sources(dw_bn), _module_tensor(pw, "weight"), _module_tensor(pw, "bias"),
                () if pw_bn is None else _bn_sources(pw_bn), eps)

    def _op(self, x, dw_bn, pw, pw_bn, act_in, act_mid, act_out, residual, dtype):
        backend = ops.resolve_backend(self.backend, x.device)
        padding = self._op_padding
        if padding is None:
            # Zero padding commutes with the op's activations (each maps 0 to 0), so padding before
            # act_in is what Conv2dSame after the activation computes.
            x, padding = _pad_same(x, self.kernel_size, self.stride, self.dilation), 0
        options = (self.stride[0], padding, self.dilation[0], act_in, act_mid, act_out)
        if backend == "cpu" and torch.compiler.is_compiling():
            dw_weight, dw_bias, dw_bn_sources, pw_weight, pw_bias, pw_bn_sources, eps = self._sources(dw_bn, pw, pw_bn)
            if not _needs_grad((x, residual, dw_weight, dw_bias, pw_weight, pw_bias) + dw_bn_sources + pw_bn_sources):
                # Traced, the cache's test of weight versions would be a guard per weight, so the
                # fold and the pack would be redone in the graph on every call: this op looks the
                # cache up when the graph runs. x is cast here as the op's autocast rule casts it.
                return torch.ops.xception_fast.unit_with_cached_weights(
                    x.to(dtype), dw_weight, dw_bias, list(dw_bn_sources), pw_weight, pw_bias, list(pw_bn_sources), eps,
                    residual, *options, self._owner_slot)
        dw_weight, dw_bias, pw_weight, pw_bias, packed = self._weights(x, dw_bn, pw, pw_bn, dtype, backend)
        if backend == "reference":
            return ops.sepconv(x, dw_weight, pw_weight, pw_bias, dw_bias=dw_bias, stride=options[0], padding=padding,
                               dilation=options[2], act_in=act_in, act_mid=act_mid, act_out=act_out,
                               residual=residual, backend=backend)
        # The backend's op itself (ops.sepconv's checks of a user's arguments would cost as much as
        # a small unit's kernel); x is not cast under autocast: the op's autocast rule casts x and
        # the residual itself.
        return ops.run_backend(backend, (x, dw_weight, dw_bias, pw_weight, pw_bias, residual, *options, packed),
                               self.recompute_depthwise)

    def extra_repr(self):
        return super().extra_repr() + (f", heads a fused separable unit (backend={self.backend!r}, "
                                       f"recompute_depthwise={self.recompute_depthwise})")


class FusedMaxPool2d(nn.MaxPool2d):
    """A max-pool whose result its block adds to another tensor (the end of Xception's
    down-sampling blocks: ``maxpool(x) + shortcut``), with that add taken in.

    ``pool(x)``: the pool alone, as before fuse(). ``pool(x, residual=r)``, as the fused block calls
    it: ``pool(x) + r``, in one pass over x (``torch.ops.xception_fast.max_pool_add``) for
    channels-last CPU tensors of one dtype and the pooled shape, the same float values as eager's
    two ops; any other case runs eager's pool and add: a GPU; NCHW, where the op's pass is no faster
    than eager's pool; a broadcast or a promoting add; and a gradient to make, since the op keeps no
    indices and its backward finds the maxima again with eager's pool, which costs more than the
    pass saves.
    """

    def _adopt(self, backend):
        self.backend = backend

    def forward(self, x, residual=None):
        pooled = None if residual is None else self._one_pass(x, residual)
        if pooled is not None:
            return pooled
        y = super().forward(x)
        return y if residual is None else y + residual

    def _one_pass(self, x, residual):
        """The pool and the add in the op, or None where it does not take them."""
        k, s, p = (self.kernel_size, self.stride, self.padding)
        if isinstance(k, tuple) or isinstance(s, tuple) or isinstance(p, tuple):
            return None
        if (self.backend not in ("auto", "cpu") or not isinstance(residual, torch.Tensor) or x.device.type != "cpu"
                or x.dim() != 4 or x.dtype not in _POOL_DTYPES or residual.dtype != x.dtype
                or residual.device != x.device or suggest_memory_format(x) != torch.channels_last
                or _needs_grad((x, residual))):
            return None
        if list(residual.shape) != list(x.shape[:2]) + [conv_extent(n, k, s, p, 1) for n in x.shape[2:]]:
            return None
        return torch.ops.xception_fast.max_pool_add(x, residual, k, s, p)

    def extra_repr(self):
        return super().extra_repr() + f", adds its block's residual in the same pass (backend={self.backend!r})"


# ----------------------------------------------------------------------------------------------
# The fused blocks

_FUSED_CLASSES = {}


def _fused_class(base):
    """``Fused<base>``: base with its forward replaced by the instance's rewritten graph. Made once
    per class; pickled by naming base (see FusedBlock.__reduce_ex__), so it needs no import path."""
    cls = _FUSED_CLASSES.get(base)
    if cls is None:
        cls = type(f"Fused{base.__name__}", (FusedBlock, base),
                   {"__module__": __name__, "__qualname__": f"Fused{base.__name__}", "_fused_base": base})
        _FUSED_CLASSES[base] = cls
    return cls


def _rebuild_fused_block(base):
    cls = _fused_class(base)
    return cls.__new__(cls)


class FusedBlock(nn.Module):
    """A module whose forward was rewritten by fuse(): its fused units are each one call.

    The class of a fused block is ``Fused<Class>``, a subclass of its own class (isinstance, its
    attributes and its other methods stay). Its forward runs the fx graph of the original forward
    with the units replaced (``fused_code`` shows the code). The original forward was traced in train
    mode and in eval mode; where the two differ (a forward that branches on ``self.training``) the
    block keeps both graphs and runs the one of its current mode.

    The graph was traced once: Python-level decisions of the original forward (flags such as
    ``has_skip``, ``grad_checkpointing``) are fixed at their values at fuse() time.
    """

    _fused_base = nn.Module

    def forward(self, *args, **kwargs):
        return self._fused_forwards[self.training](self, *args, **kwargs)

    @property
    def fused_code(self):
        """The Python code of the fused forward (of eval mode, then of train mode where it differs)."""
        eval_graph, train_graph = self._fused_graphs
        code = eval_graph.python_code(root_module="self").src
        if train_graph is not eval_graph:
            code = "# eval mode\n" + code + "\n# train mode\n" + train_graph.python_code(root_module="self").src
        return code

    def _compile_fused(self):
        compiled = {}
        forwards = []
        for graph in self._fused_graphs:
            if id(graph) not in compiled:
                compiled[id(graph)] = _compile_forward(graph, type(self).__name__)
            forwards.append(compiled[id(graph)])
        # Indexed by self.training: (eval, train).
        self._fused_forwards = tuple(forwards)

    def __getstate__(self):
        state = super().__getstate__()
        state.pop("_fused_forwards", None)  # compiled code: rebuilt from the graphs
        return state

    def __setstate__(self, state):
        super().__setstate__(state)
        self._compile_fused()

    def __reduce_ex__(self, protocol):
        # The class is made at run time; a pickle (and deepcopy) names the user's class instead.
        return _rebuild_fused_block, (self._fused_base,), self.__getstate__()


def _compile_forward(graph, name):
    code = graph.python_code(root_module="self")
    filename = f"<fused forward of {name} {id(graph):x}>"
    linecache.cache[filename] = (len(code.src), None, code.src.splitlines(True), filename)
    namespace = dict(code.globals)
    exec(compile(code.src, filename, "exec"), namespace)  # noqa: S102 - fx's own generated code
    return namespace["forward"]


# ----------------------------------------------------------------------------------------------
# Tracing

class _Tracer(fx.Tracer):
    """Traces one module's forward. A child is inlined when it holds a convolution (a unit may be
    split across containers), and is a leaf otherwise, as are convs, BatchNorms and fused blocks. A
    child whose forward fx cannot trace becomes a leaf too (its own forward is traced on its own).

    Records per node the modules whose forwards it ran inside (``meta["fuse_owners"]``), and how
    many times each module was called."""

    def __init__(self, has_conv=None):
        # No required arguments: torch.fx may rebuild a tracer of this class with none.
        super().__init__()
        self._has_conv = has_conv or {}
        self._inlined = []
        self._forced_leaves = set()
        self.calls = collections.Counter()
        self.untraceable = {}  # qualname -> why fx could not inline it

    def is_leaf_module(self, m, qualname):
        if m is self.root:
            return False
        if isinstance(m, (nn.Conv2d, _BatchNorm, FusedBlock)) or id(m) in self._forced_leaves:
            return True
        return not self._has_conv.get(id(m), False)

    def create_node(self, *args, **kwargs):
        node = super().create_node(*args, **kwargs)
        node.meta["fuse_owners"] = tuple(self._inlined)
        return node

    def getattr(self, attr, attr_val, parameter_proxy_cache):
        # No proxy cache: a failed inline below erases its nodes, and a cached proxy of one of them
        # would outlive it.
        return super().getattr(attr, attr_val, {})

    def call_module(self, m, forward, args, kwargs):
        name = self.path_of_module(m)
        self.calls[name] += 1
        if self.is_leaf_module(m, name):
            return super().call_module(m, forward, args, kwargs)
        length = len(self.graph.nodes)
        saved = (collections.OrderedDict(self.module_stack), dict(getattr(self, "num_calls", {})),
                 collections.Counter(self.calls), dict(self.untraceable))
        self._inlined.append(name)
        try:
            return super().call_module(m, forward, args, kwargs)
        except Exception as error:  # noqa: BLE001 - any failure makes m a leaf, traced on its own
            failure = f"{type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}"
        finally:
            self._inlined.pop()
        for node in reversed(list(self.graph.nodes)[length:]):
            self.graph.erase_node(node)
        self.module_stack.clear()
        self.module_stack.update(saved[0])
        if hasattr(self, "num_calls"):
            self.num_calls.clear()
            self.num_calls.update(saved[1])
        self.calls, self.untraceable = saved[2], saved[3]
        self.untraceable[name] = failure
        self._forced_leaves.add(id(m))
        return super().call_module(m, forward, args, kwargs)


def _conv_holders(model):
    """id(module) -> whether it is or holds an nn.Conv2d."""
    has_conv = {}

    def visit(m):
        if id(m) in has_conv:
            return has_conv[id(m)]
        has_conv[id(m)] = False  # a module that holds itself
        found = isinstance(m, nn.Conv2d)
        for child in m.children():
            found = visit(child) or found
        has_conv[id(m)] = found
        return found

    visit(model)
    return has_conv


def _trace(module, has_conv):
    tracer = _Tracer(has_conv)
    graph = tracer.trace(module)
    return tracer, graph


# ----------------------------------------------------------------------------------------------
# Matching

@dataclasses.dataclass
class _Unit:
    dw: fx.Node
    act_in: fx.Node = None
    mid: list = dataclasses.field(default_factory=list)
    pw: fx.Node = None
    out: list = dataclasses.field(default_factory=list)
    add: fx.Node = None
    residual: fx.Node = None

    def nodes(self):
        return [n for n in [self.act_in, self.dw, *self.mid, self.pw, *self.out, self.add] if n is not None]


@dataclasses.dataclass
class _Fold:
    conv: fx.Node
    bn: fx.Node
    act: fx.Node = None  # an activation module after the BatchNorm, applied by FusedConv2dBN

    def nodes(self):
        return [self.conv, self.bn] + ([self.act] if self.act is not None else [])


@dataclasses.dataclass
class _PoolAdd:
    pool: fx.Node
    add: fx.Node

    def nodes(self):
        return [self.pool, self.add]


def _describe(node, modules):
    """A node as the report names it: a module by name and class, a function by name, the module
    it ran inside where it is part of an inlined forward."""
    if node.op == "call_module":
        return f"{node.target} ({type(modules[node.target]).__name__})"
    if node.op == "output":
        return "the forward's return"
    owners = node.meta.get("fuse_owners", ())
    what = getattr(node.target, "__name__", str(node.target))
    if node.op == "call_method":
        what = f".{node.target}()"
    if owners:
        return f"{owners[-1]} ({type(modules[owners[-1]]).__name__})"
    return f"{what}"


def _is_depthwise(m):
    return isinstance(m, nn.Conv2d) and m.groups > 1 and m.groups == m.in_channels


def _conv_kind(m):
    """'plain' for nn.Conv2d, 'same' for timm's Conv2dSame, None for other Conv2d classes (their
    forward may compute something else)."""
    if type(m) is nn.Conv2d:
        return "plain"
    if _CONV2D_SAME is not None and type(m) is _CONV2D_SAME:
        return "same"
    return None


def _dw_padding(m):
    """The depthwise conv's symmetric zero padding as the op takes it (None: Conv2dSame's), or the
    reason there is none."""
    k, d = m.kernel_size[0], m.dilation[0]
    if _conv_kind(m) == "same":
        return None, None
    if m.padding == "valid":
        return 0, None
    if m.padding == "same":
        return d * (k - 1) // 2, None
    if m.padding[0] != m.padding[1]:
        return None, f"asymmetric padding {tuple(m.padding)}"
    return m.padding[0], None


def _dw_problem(m):
    """Why depthwise conv m cannot head a unit of the op (None if it can)."""
    if _conv_kind(m) is None:
        return f"it is a {type(m).__name__}, a Conv2d subclass with its own forward"
    if m.out_channels != m.in_channels:
        return f"channel multiplier {m.out_channels // m.in_channels} (the op's depthwise conv has 1)"
    if m.kernel_size[0] != m.kernel_size[1] or m.kernel_size[0] not in KERNEL_SIZES:
        return f"kernel {m.kernel_size[0]}x{m.kernel_size[1]} (the op takes square kernels of {KERNEL_SIZES})"
    if m.stride[0] != m.stride[1] or m.stride[0] not in STRIDES:
        return f"stride {tuple(m.stride)} (the op takes 1 or 2, the same along both axes)"
    if m.dilation[0] != m.dilation[1]:
        return f"dilation {tuple(m.dilation)} differs between the axes"
    if m.padding_mode != "zeros":
        return f"padding_mode {m.padding_mode!r} (the op pads with zeros)"
    return _dw_padding(m)[1]


def _pw_problem(m, channels):
    if not isinstance(m, nn.Conv2d):
        return "not a conv"
    if _conv_kind(m) is None:
        return f"a {type(m).__name__}, a Conv2d subclass with its own forward"
    padding = 0 if m.padding in ("valid", "same") else max(m.padding)
    if m.kernel_size != (1, 1) or m.stride != (1, 1) or padding != 0 or m.groups != 1:
        return (f"a {m.kernel_size[0]}x{m.kernel_size[1]} conv (stride {m.stride[0]}, groups {m.groups}), "
                "not a pointwise conv")
    if m.in_channels != channels:
        return f"a pointwise conv of {m.in_channels} input channels, not {channels}"
    return None


def _kind(m):
    """What module m is in a chain: 'bn', 'act', 'drop' (identity in eval), 'identity', or None."""
    if _is_plain_bn(m) or _is_bn_act(m):
        return "bn"
    if _act_name(m) is not None:
        return "act"
    if type(m) is nn.Identity:
        return "identity"
    if _drop_probability(m) is not None:
        return "drop"
    return None


def _single_module_user(node, modules):
    """The one user of node if it is a module called on node alone; else (None, why not)."""
    users = list(node.users)
    if len(users) == 1 and users[0].op == "call_module" and users[0].args == (node,) and not users[0].kwargs:
        return users[0], None
    if not users:
        return None, f"the result of {_describe(node, modules)} is unused"
    described = sorted({_describe(u, modules) for u in users})
    depth = len(node.meta.get("fuse_owners", ()))
    inside = {u.meta.get("fuse_owners", ())[depth:depth + 1] for u in users}
    if len(described) == 1 and (len(users) == 1 or () not in inside):
        # One module (a squeeze-excitation, inlined or not) or one function takes it.
        return None, f"{described[0]} sits between the depthwise and the pointwise conv"
    return None, (f"the result of {_describe(node, modules)} is used {len(users)} times "
                  f"({', '.join(described)}): it must exist on its own")


def _is_add(node):
    if node.kwargs or len(node.args) != 2:
        return False
    if node.op == "call_function":
        return node.target in (operator.add, torch.add)
    return node.op == "call_method" and node.target == "add"


def _other_operand(add, node):
    """The argument of the two-argument add node that is not ``node``."""
    return add.args[1] if add.args[0] is node else add.args[0]


def _mutates_input(node, modules):
    """Whether node may write into one of its inputs."""
    if node.op == "call_module":
        m = modules[node.target]
        # A BatchNorm's (timm's BatchNormAct2d's) in-place activation writes into its own output.
        return bool(getattr(m, "inplace", False)) and not isinstance(m, (_BatchNorm, nn.Conv2d))
    if node.op in ("call_function", "call_method"):
        name = node.target if isinstance(node.target, str) else getattr(node.target, "__name__", "")
        return (name.endswith("_") and not name.endswith("__")) or name in ("iadd", "isub", "imul", "itruediv")
    return False


def _is_random(node, modules):
    if node.op == "call_module":
        return _drop_probability(modules[node.target]) is not None
    name = node.target if isinstance(node.target, str) else getattr(node.target, "__name__", "")
    return any(word in name for word in ("dropout", "rand", "bernoulli", "drop_path"))


def _arg_nodes(args):
    """The nodes among a node's arguments, also inside lists, tuples and dicts."""
    found = []
    fx.node.map_arg(args, found.append)
    return found


def _interleaved_problem(nodes, inputs, order, modules):
    """Why the nodes of a unit cannot become one call at the position of their last node.

    Moving them there is exact unless a node that ran between them in the original order writes into
    one of the unit's inputs (the unit would read the written value), or draws random numbers while
    the unit does too (the draws would change order)."""
    members = set(nodes)
    first, last = min(order[n] for n in nodes), max(order[n] for n in nodes)
    random_unit = any(n.op == "call_module" and _drop_probability(modules[n.target]) is not None for n in nodes)
    for node in list(nodes[0].graph.nodes)[first + 1:last]:
        if node in members:
            continue
        if _mutates_input(node, modules) and any(a in inputs for a in _arg_nodes(node.args)):
            return f"{_describe(node, modules)} writes in place into the unit's input between its convs"
        if random_unit and _is_random(node, modules):
            return f"{_describe(node, modules)} draws random numbers between the unit's Dropouts"
    return None


def _match(graph, modules, calls, only=None):
    """Find the separable units and the conv + BatchNorm folds in a traced graph.

    Returns (units, folds, pools, refusals): pools are the max-pools whose result goes only into an
    add (FusedMaxPool2d); refusals maps each depthwise conv's name that heads no unit to the reason.
    ``only``: the names of the depthwise convs, folded convs and pools to consider (the others are
    left as they are, and not reported).
    """
    order = {node: i for i, node in enumerate(graph.nodes)}
    units, refusals = {}, {}

    def called_once(node):
        return calls[node.target] == 1

    for dw in graph.nodes:
        if dw.op != "call_module" or not _is_depthwise(modules[dw.target]):
            continue
        if isinstance(modules[dw.target], _FusedConv) or (only is not None and dw.target not in only):
            continue
        m = modules[dw.target]
        why = _dw_problem(m)
        if why is None and not called_once(dw):
            # One module, two places: fusing one call site (as torch.fx's own fuser does, pytorch
            # #197539) would change what the other computes.
            why = f"the conv is called {calls[dw.target]} times in one forward"
        if why is None and (len(dw.args) != 1 or dw.kwargs or not isinstance(dw.args[0], fx.Node)):
            why = "it is called with more than its input"
        if why is not None:
            refusals[dw.target] = why
            continue
        unit, why = _walk(dw, m.in_channels, modules, calls)
        if why is None:
            units[dw.target] = unit
        else:
            refusals[dw.target] = why

    # The activation between two units goes to the one after it (into the op's prologue, where
    # training keeps it unstored too); the unit before ends its epilogue before it.
    act_ins = {}
    for name, unit in units.items():
        act = _act_in(unit.dw, modules, calls)
        if act is not None:
            act_ins[act] = name
    for name, unit in units.items():
        unit.act_in = next((a for a, owner in act_ins.items() if owner == name), None)
        _extend_out(unit, modules, calls, set(act_ins))

    for name, unit in list(units.items()):
        inputs = {unit.act_in.args[0] if unit.act_in is not None else unit.dw.args[0], unit.residual}
        why = _interleaved_problem(unit.nodes(), inputs, order, modules)
        if why is not None and unit.add is not None:
            unit.add = unit.residual = None  # without its add, the unit may end before that node
            why = _interleaved_problem(unit.nodes(), inputs, order, modules)
        if why is not None and unit.act_in is not None:
            unit.act_in = None
            why = _interleaved_problem(unit.nodes(), {unit.dw.args[0]}, order, modules)
        if why is not None:
            refusals[name] = why
            del units[name]

    taken = {n for unit in units.values() for n in unit.nodes()}
    folds = {}
    for conv in graph.nodes:
        if conv.op != "call_module" or conv in taken or not isinstance(modules[conv.target], nn.Conv2d):
            continue
        m = modules[conv.target]
        if _conv_kind(m) is None or isinstance(m, _FusedConv) or (only is not None and conv.target not in only):
            continue
        if not called_once(conv) or len(conv.args) != 1 or conv.kwargs:
            continue
        bn, _ = _single_module_user(conv, modules)
        if bn is None or bn in taken or _kind(modules[bn.target]) != "bn" or not called_once(bn):
            continue
        # Any activation: FusedConv2dBN calls the BatchNorm's own act module after the folded conv.
        if modules[bn.target].num_features != m.out_channels:
            continue
        # An activation that takes the BatchNorm's result alone goes into the fold too, where the
        # conv can apply it in its epilogue.
        act, _ = _single_module_user(bn, modules)
        if act is None or act in taken or _act_name(modules[act.target]) is None or not called_once(act) or (
                _is_bn_act(modules[bn.target])):
            act = None
        chain = [conv, bn] + ([act] if act is not None else [])
        if _interleaved_problem(chain, {conv.args[0]}, order, modules) is None:
            folds[conv.target] = _Fold(conv, bn, act)
        elif act is not None and _interleaved_problem([conv, bn], {conv.args[0]}, order, modules) is None:
            folds[conv.target] = _Fold(conv, bn)
    return units, folds, _match_pools(graph, modules, calls, only, taken, order), refusals


def _match_pools(graph, modules, calls, only, taken, order):
    """The max-pools (nn.MaxPool2d, no dilation, floor mode, no indices) whose result only an add
    takes, and not a unit's add, by name."""
    pools = {}
    for pool in graph.nodes:
        if pool.op != "call_module" or type(modules[pool.target]) is not nn.MaxPool2d:
            continue
        m = modules[pool.target]
        if only is not None and pool.target not in only:
            continue
        if (m.dilation not in (1, (1, 1)) or m.ceil_mode or m.return_indices or calls[pool.target] != 1
                or len(pool.args) != 1 or pool.kwargs or not isinstance(pool.args[0], fx.Node)):
            continue
        users = list(pool.users)
        if len(users) != 1 or not _is_add(users[0]) or users[0] in taken:
            continue
        add = users[0]
        residual = _other_operand(add, pool)
        if not isinstance(residual, fx.Node) or residual is pool:
            continue
        if _interleaved_problem([pool, add], {pool.args[0], residual}, order, modules) is None:
            pools[pool.target] = _PoolAdd(pool, add)
    return pools


def _walk(dw, channels, modules, calls):
    """From depthwise conv node dw to its pointwise conv: (unit, None) or (None, why not)."""
    unit = _Unit(dw)
    node = dw
    bn = act = False
    while True:
        user, why = _single_module_user(node, modules)
        if user is None:
            return None, why
        m = modules[user.target]
        if isinstance(m, nn.Conv2d):
            why = _pw_problem(m, channels)
            if why is not None:
                return None, f"it is followed by {user.target}, {why}"
            if calls[user.target] != 1:
                return None, f"the pointwise conv {user.target} is called {calls[user.target]} times in one forward"
            unit.pw = user
            return unit, None
        kind = _kind(m)
        if kind is None:
            return None, f"{_describe(user, modules)} sits between the depthwise and the pointwise conv"
        if calls[user.target] != 1:
            return None, f"{user.target} is called {calls[user.target]} times in one forward"
        if kind == "bn":
            if bn or act:
                return None, ("two BatchNorms between the convs" if bn else
                              "an activation before the BatchNorm between the convs")
            if m.num_features != channels:
                return None, f"{user.target} normalises {m.num_features} channels, not {channels}"
            if _is_bn_act(m):
                why = _bn_act_problem(m)
                if why is not None:
                    return None, f"{user.target}: {why}"
                act = type(m.act) is not nn.Identity
            bn = True
        elif kind == "act":
            if act:
                return None, "two activations between the convs"
            act = True
        unit.mid.append(user)  # nn.Identity too: its node is erased with the unit's (it is not passed)
        node = user


def _act_in(dw, modules, calls):
    """The activation node before dw that the op can apply in its prologue, or None."""
    act = dw.args[0]
    if act.op != "call_module" or _act_name(modules[act.target]) is None or calls[act.target] != 1:
        return None
    if list(act.users) != [dw] or len(act.args) != 1 or act.kwargs or not isinstance(act.args[0], fx.Node):
        return None
    if getattr(modules[act.target], "inplace", False):
        source = act.args[0]
        # An in-place activation also changes its input for whoever else reads it (in this forward,
        # or the caller, for a placeholder): taken into the kernel, it would not.
        if source.op == "placeholder" or len(source.users) != 1:
            return None
    return act


def _extend_out(unit, modules, calls, act_ins):
    """The modules after the pointwise conv that the op's epilogue can take, then the residual add."""
    node = unit.pw
    bn = act = False
    channels = modules[unit.pw.target].out_channels
    while True:
        users = list(node.users)
        if len(users) != 1:
            return
        user = users[0]
        if user.op == "call_module" and user.args == (node,) and not user.kwargs and user not in act_ins:
            m = modules[user.target]
            kind = _kind(m)
            fits = calls[user.target] == 1 and (
                kind in ("identity", "drop")
                or (kind == "bn" and not bn and not act and m.num_features == channels
                    and (not _is_bn_act(m) or _bn_act_problem(m) is None))
                or (kind == "act" and not act))
            if fits:
                if kind == "bn":
                    bn = True
                    act = _is_bn_act(m) and type(m.act) is not nn.Identity
                act = act or kind == "act"
                unit.out.append(user)
                node = user
                continue
            return
        if _is_add(user):
            other = _other_operand(user, node)
            if isinstance(other, fx.Node) and other is not node:
                unit.add, unit.residual = user, other
        return


# ----------------------------------------------------------------------------------------------
# The report

@dataclasses.dataclass
class UnitReport:
    """One depthwise conv: the unit it heads and whether fuse() fused it.

    ``name``: the depthwise conv's qualified name. ``fused``: whether it runs in the op.
    ``detail``: when fused, the unit's form (``relu > dw3x3 +bn > relu6 > pw 96->24 +bn > +residual``);
    otherwise why it was left as it was. ``block``: the module whose forward runs the fused unit.
    """

    name: str
    fused: bool
    detail: str
    block: str = ""
    residual: bool = False


@dataclasses.dataclass
class FuseReport:
    """What :func:`fuse` did, per depthwise conv of the model, and the convs with BatchNorm folded.

    ``names``: the fused units (by their depthwise conv's name); ``count`` how many;
    ``with_residual``: those that took their residual add into the kernel; ``refused``: (name,
    reason) of every depthwise conv left as it was; ``folded``: the other convs whose BatchNorm is
    folded in eval; ``pooled``: the max-pools whose residual add is taken into their pass
    (:class:`FusedMaxPool2d`). ``print(report)`` gives ``summary``, then a line per depthwise conv,
    then the pools.
    """

    units: list
    folded: list
    pooled: list = dataclasses.field(default_factory=list)

    @property
    def names(self):
        return [u.name for u in self.units if u.fused]

    @property
    def with_residual(self):
        return [u.name for u in self.units if u.fused and u.residual]

    @property
    def count(self):
        return len(self.names)

    @property
    def refused(self):
        return [(u.name, u.detail) for u in self.units if not u.fused]

    @property
    def summary(self):
        """The first line of ``str(report)``: the counts, for a log line."""
        return (f"fused {self.count} separable unit{'s' if self.count != 1 else ''} of {len(self.units)} "
                f"depthwise conv{'s' if len(self.units) != 1 else ''} "
                f"({len(self.with_residual)} with their residual add); BatchNorm folded into "
                f"{len(self.folded)} other conv{'s' if len(self.folded) != 1 else ''}"
                + (f"; residual add taken into {len(self.pooled)} max-pool{'s' if len(self.pooled) != 1 else ''}"
                   if self.pooled else ""))

    def __str__(self):
        width = max((len(u.name) for u in self.units), default=0)
        lines = [self.summary]
        for fused, title in ((True, "fused:"), (False, "left as they were:")):
            chosen = [u for u in self.units if u.fused == fused]
            if chosen:
                lines.append(f"  {title}")
                lines += [f"    {u.name:<{width}}  {u.detail}" for u in chosen]
        if self.pooled:
            lines.append("  max-pool + residual add in one pass (channels-last CPU tensors):")
            lines += [f"    {name}" for name in self.pooled]
        return "\n".join(lines)


def _unit_form(unit, modules):
    """The unit as the report shows it: ``relu > dw3x3 s2 +bn > relu6 > pw 96->24 +bn > +residual``."""
    def section(conv_text, nodes):
        # A conv, "+bn" for its BatchNorm, then its activation.
        acts = []
        for node in nodes:
            m = modules[node.target]
            if _kind(m) == "bn":
                conv_text += " +bn"
                if _is_bn_act(m) and type(m.act) is not nn.Identity:
                    acts.append(_act_name(m.act))
            elif _kind(m) == "act":
                acts.append(_act_name(m))
        return [conv_text] + acts

    dw, pw = modules[unit.dw.target], modules[unit.pw.target]
    k = dw.kernel_size[0]
    dw_text = f"dw{k}x{k}" + (f" s{dw.stride[0]}" if dw.stride[0] > 1 else "") + (
        f" d{dw.dilation[0]}" if dw.dilation[0] > 1 else "") + (" tf-same" if _conv_kind(dw) == "same" else "")
    parts = [] if unit.act_in is None else [_act_name(modules[unit.act_in.target])]
    parts += section(dw_text, unit.mid) + section(f"pw {pw.in_channels}->{pw.out_channels}", unit.out)
    if unit.add is not None:
        parts.append("+residual")
    return " > ".join(parts)


# ----------------------------------------------------------------------------------------------
# Rewriting

def _join(prefix, name):
    return f"{prefix}.{name}" if prefix and name else prefix or name


def _rewrite(graph, units, folds, pools, modules):
    """Replace each unit and fold in graph by one call of its fused conv, and each pool and its add
    by one call of the pool, at its last node."""
    for unit in units:
        last = unit.nodes()[-1]
        x = unit.act_in.args[0] if unit.act_in is not None else unit.dw.args[0]
        with graph.inserting_before(last):
            def attr(node):
                return graph.get_attr(node.target)

            kwargs = {}
            if unit.act_in is not None:
                kwargs["act_in"] = attr(unit.act_in)
            # nn.Identity is the identity in every mode: it needs no passing.
            kwargs["mid"] = tuple(attr(n) for n in unit.mid if type(modules[n.target]) is not nn.Identity)
            kwargs["pw"] = attr(unit.pw)
            kwargs["out"] = tuple(attr(n) for n in unit.out if type(modules[n.target]) is not nn.Identity)
            if unit.residual is not None:
                kwargs["residual"] = unit.residual
            call = graph.call_module(unit.dw.target, (x,), kwargs)
        last.replace_all_uses_with(call)
        for node in reversed(unit.nodes()):
            graph.erase_node(node)
    for fold in folds:
        last = fold.act if fold.act is not None else fold.bn
        with graph.inserting_before(last):
            kwargs = {"bn": graph.get_attr(fold.bn.target)}
            if fold.act is not None:
                kwargs["act"] = graph.get_attr(fold.act.target)
            call = graph.call_module(fold.conv.target, fold.conv.args, kwargs)
        last.replace_all_uses_with(call)
        for node in reversed(fold.nodes()):
            graph.erase_node(node)
    for pool_add in pools:
        pool, add = pool_add.pool, pool_add.add
        # From the add's arguments as they are now: the residual may have been a unit's or a fold's
        # result, replaced above by its call.
        residual = _other_operand(add, pool)
        with graph.inserting_before(add):
            call = graph.call_module(pool.target, pool.args, {"residual": residual})
        add.replace_all_uses_with(call)
        for node in reversed(pool_add.nodes()):
            graph.erase_node(node)
    for node in graph.nodes:
        node.meta = {}
    graph.lint()


def _set_training(module, modes):
    for m in module.modules():
        m.training = modes if isinstance(modes, bool) else modes[m]


def _owner(unit_nodes):
    """The deepest inlined module whose forward ran all the nodes ('' for the traced module)."""
    paths = [n.meta.get("fuse_owners", ()) for n in unit_nodes]
    common = []
    for level in zip(*paths):
        if any(p != level[0] for p in level):
            break
        common.append(level[0])
    return common[-1] if common else "", {p for path in paths for p in path[len(common):]}


def _analyse(model, has_conv):
    """Phase 1: trace the model from the top (and, where fx cannot, its parts), match, and give
    each unit and fold the module that owns it.

    Returns (claims, refusals, untraced): claims maps an owner's name to the names of the depthwise
    convs and folded convs it rewrites; refusals and untraced map conv names to reasons."""
    claims = collections.defaultdict(set)
    paths = {}  # claim name -> (owner, inlined modules it passes through)
    refusals, untraceable = {}, {}

    def visit(prefix, module):
        if not has_conv.get(id(module)) or isinstance(module, (nn.Conv2d, _BatchNorm, FusedBlock)):
            return
        try:
            tracer, graph = _trace(module, has_conv)
        except Exception as error:  # noqa: BLE001 - then its parts are traced
            untraceable[prefix] = f"{type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}"
            for name, child in module.named_children():
                visit(_join(prefix, name), child)
            return
        modules = dict(module.named_modules())
        units, folds, pools, why = _match(graph, modules, tracer.calls)
        for name, reason in why.items():
            refusals[_join(prefix, name)] = reason
        for name, claim in list(units.items()) + list(folds.items()) + list(pools.items()):
            owner, through = _owner(claim.nodes())
            paths[_join(prefix, name)] = (_join(prefix, owner), {_join(prefix, p) for p in through})
        for name, failure in tracer.untraceable.items():
            untraceable[_join(prefix, name)] = failure
            visit(_join(prefix, name), module.get_submodule(name))

    visit("", model)
    # A unit owned by a block may pass through a child that owns other units: that child's forward is
    # bypassed by the block's rewritten one, so the block takes over the child's claims.
    owner_of = {name: owner for name, (owner, _) in paths.items()}
    changed = True
    while changed:
        changed = False
        owners = set(owner_of.values())
        for name, (_, through) in paths.items():
            for child in through & owners:
                for other, owner in owner_of.items():
                    if owner == child:
                        owner_of[other] = owner_of[name]
                        changed = True
    for name, owner in owner_of.items():
        claims[owner].add(name)
    return claims, refusals, untraceable


def _fuse_owner(model, owner_name, names, backend, recompute_depthwise):
    """Phase 2: rewrite one owner's forward. Returns (fused units, folds, pools, refusals) by absolute
    name."""
    owner = model.get_submodule(owner_name) if owner_name else model
    has_conv = _conv_holders(owner)
    relative = {n[len(owner_name) + 1:] if owner_name else n for n in names}
    modes = {m: m.training for m in owner.modules()}
    traced = []
    try:
        for mode in (False, True):
            _set_training(owner, mode)
            tracer, graph = _trace(owner, has_conv)
            traced.append((tracer, graph, graph.python_code(root_module="self").src))
    except Exception as error:  # noqa: BLE001
        return {}, {}, [], {n: f"{owner_name or 'the model'}'s forward could not be traced again: {error}"
                            for n in names}
    finally:
        _set_training(owner, modes)
    modules = dict(owner.named_modules())
    if traced[0][2] == traced[1][2]:
        traced = traced[:1]
    # Where the graphs of the two modes differ, each is rewritten with its own matches: a fused conv
    # that one graph calls alone is the conv it was, so the graphs need not agree on a unit.
    matches = [_match(graph, modules, tracer.calls, only=relative) for tracer, graph, _ in traced]
    units, folds, pools, refusals = matches[0]
    if len(matches) == 2:
        train_units, train_folds, train_pools, train_refusals = matches[1]
        units = {**train_units, **units}
        folds = {**train_folds, **folds}
        pools = {**train_pools, **pools}
        refusals = {n: r for n, r in {**train_refusals, **refusals}.items() if n not in units and n not in folds}
        for _, graph_folds, _, _ in matches:
            for name in set(graph_folds) & set(units):
                del graph_folds[name]  # a conv heads a unit or has a fold, in both graphs
        folds = {n: f for n, f in folds.items() if n not in units}
    for name in relative - set(units) - set(folds) - set(refusals):
        if _is_depthwise(modules[name]):
            refusals[name] = f"it was not found again in the trace of {owner_name or 'the model'} alone"
    if not units and not folds and not pools:
        return {}, {}, [], {_join(owner_name, n): r for n, r in refusals.items()}
    forms = {name: (_unit_form(unit, modules), unit.add is not None) for name, unit in units.items()}
    graphs = []
    for (_, graph, _), (u, f, p, _) in zip(traced, matches):
        _rewrite(graph, list(u.values()), list(f.values()), list(p.values()), modules)
        graphs.append(graph)
    for name, unit in units.items():
        conv = modules[name]
        padding = _dw_padding(conv)[0]
        conv_class = type(conv)
        conv.__class__ = FusedSeparableConv2d
        conv._adopt_unit(conv_class, backend, padding, recompute_depthwise)
    for name in folds:
        conv = modules[name]
        conv_class = type(conv)
        conv.__class__ = FusedConv2dBN
        conv._adopt(conv_class, backend)
    for name in pools:
        pool = modules[name]
        pool.__class__ = FusedMaxPool2d
        pool._adopt(backend)
    if not isinstance(owner, FusedBlock):
        owner.__class__ = _fused_class(type(owner))
    owner._fused_graphs = (graphs[0], graphs[-1])
    owner._compile_fused()
    return ({_join(owner_name, n): form for n, form in forms.items()}, [_join(owner_name, n) for n in folds],
            [_join(owner_name, n) for n in pools], {_join(owner_name, n): r for n, r in refusals.items()})


def fuse(model, backend="auto", recompute_depthwise=False):
    """Fuse every depthwise-separable unit of ``model`` into the op, in place; fold BatchNorm into
    every other conv followed by one. Returns ``(model, report)`` (:class:`FuseReport`).

    ``recompute_depthwise``: in training, recompute each fused unit's depthwise result in the
    backward rather than keep it from the forward (the CPU op keeps it otherwise; a GPU backward
    always recomputes it): the activation memory of those intermediates saved, at the cost of a
    depthwise conv per unit in the backward. Each fused conv's ``recompute_depthwise`` attribute
    can be changed later.

    A unit is fused only where the fused model computes what the model did, in both train and eval
    mode; any other unit stays as it was and the report says why. See the module's docstring for
    what is matched and what the fused model is made of.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"fuse: model must be an nn.Module, got {type(model).__name__}")
    if backend not in BACKENDS:
        raise ValueError(f"fuse: backend must be one of {BACKENDS}, got {backend!r}")
    if not isinstance(recompute_depthwise, bool):
        raise TypeError(f"fuse: recompute_depthwise must be a bool, got {type(recompute_depthwise).__name__}")
    has_conv = _conv_holders(model)
    claims, refusals, untraceable = _analyse(model, has_conv)
    fused, folded, pooled = {}, [], []
    # Deepest owners first: a fused block is a leaf of its parent's trace, so the parent calls its
    # fused forward.
    for owner in sorted(claims, key=lambda n: (-(n.count(".") + 1 if n else 0), n)):
        forms, folds, pools, why = _fuse_owner(model, owner, claims[owner], backend, recompute_depthwise)
        fused.update(forms)
        folded += folds
        pooled += pools
        refusals.update(why)
    blocks = {name: owner for owner, names in claims.items() for name in names}
    units = []
    for name, m in model.named_modules():
        if not _is_depthwise(m):
            continue
        if name in fused:
            form, residual = fused[name]
            units.append(UnitReport(name, True, form, blocks.get(name, ""), residual))
        elif isinstance(m, FusedSeparableConv2d):
            units.append(UnitReport(name, True, "fused by an earlier fuse()", ""))
        else:
            why = refusals.get(name) or _untraced_reason(name, untraceable)
            if name in folded:
                why += "; its BatchNorm is folded into it"
            units.append(UnitReport(name, False, why))
    pooled = set(pooled)
    return model, FuseReport(units, sorted(folded), [name for name, _ in model.named_modules() if name in pooled])


def _untraced_reason(name, untraceable):
    for prefix, failure in sorted(untraceable.items(), key=lambda item: -len(item[0])):
        if prefix and name.startswith(prefix + "."):
            return f"inside {prefix}, whose forward torch.fx cannot trace ({failure})"
    return "no traced forward calls it as a module"
