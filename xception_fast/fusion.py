"""Swapping the fused op into a model: ``fuse(model)``.

A separable unit is the chain ``[ReLU ->] depthwise 3x3 Conv2d -> 1x1 Conv2d -> BatchNorm2d
[-> ReLU] [-> + residual]``, found by structure: each module's forward is traced with torch.fx
(Sequentials and conv-pair containers inlined, every other child a leaf) and its dataflow graph is
searched for the chain. The unit is replaced in place, keeping every parameter, buffer and
state_dict key where it was:

- the depthwise conv's slot gets a :class:`FusedSeparableConvBN`, which holds the depthwise weight
  under the same name and runs the whole unit;
- the pointwise conv and the BatchNorm stay in their slots as :class:`FusedAwayConv2d` /
  :class:`FusedAwayBatchNorm2d`: the same module state (so ``state_dict``, ``load_state_dict``,
  ``.to()`` and optimizers see what they saw), whose forward passes its input through;
- the ReLUs taken into the kernel become ``nn.Identity``;
- where the unit's output feeds only a residual add in its block's forward, the add is taken into
  the kernel's epilogue: the block's forward is replaced by the rewritten fx graph (the block
  object, its class and its children stay).
"""
import dataclasses
import operator

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn

from .ops import BACKENDS, fold_bn, sepconv_bn

__all__ = ["FusedSeparableConvBN", "FusedAwayConv2d", "FusedAwayBatchNorm2d", "FuseReport", "fuse"]


class _FusedAway:
    """A module whose work was taken into the FusedSeparableConvBN before it."""

    def forward(self, x):
        return x


class FusedAwayConv2d(_FusedAway, nn.Conv2d):
    """The pointwise conv of a fused unit: holds its weight and state_dict keys, passes through."""


class FusedAwayBatchNorm2d(_FusedAway, nn.BatchNorm2d):
    """The BatchNorm of a fused unit: holds its parameters, running statistics and state_dict keys,
    passes through."""


def _fused_away(module, cls):
    away = cls.__new__(cls)
    away.__dict__.update(module.__dict__)
    return away


class FusedSeparableConvBN(nn.Module):
    """One separable unit, ``act_out(BN(PW(DW(act_in(x))))) + residual``, in one fused kernel.

    Built by :func:`fuse` from the unit's modules. Eval mode folds BatchNorm into the pointwise
    weights in float32 and caches the fold until a parameter or buffer changes (optimizer step,
    ``load_state_dict``, ``.to()``). Train mode runs the fused depthwise + pointwise kernel, then
    BatchNorm on its output with batch statistics, exactly as the eager unit (running statistics
    included).
    """

    def __init__(self, dw_conv, pw_conv, bn, relu_input=False, relu_output=False, backend="auto"):
        super().__init__()
        if backend not in BACKENDS:
            raise ValueError(f"FusedSeparableConvBN: backend must be one of {BACKENDS}, got {backend!r}")
        self.weight = dw_conv.weight  # the depthwise weight, under the depthwise conv's key
        # The pointwise conv and BatchNorm are registered in their own slots; a tuple keeps them
        # from being registered here a second time.
        self._unit = (pw_conv, bn)
        self.in_channels, self.out_channels = dw_conv.in_channels, pw_conv.out_channels
        self.relu_input, self.relu_output, self.backend = relu_input, relu_output, backend
        self._fold_key = None
        self._fold = None

    @property
    def pw_conv(self):
        return self._unit[0]

    @property
    def bn(self):
        return self._unit[1]

    def extra_repr(self):
        return (f"{self.in_channels}, {self.out_channels}, relu_input={self.relu_input}, "
                f"relu_output={self.relu_output}, backend={self.backend!r}")

    def _uses_batch_statistics(self):
        bn = self.bn
        return bn.training or bn.running_mean is None

    def _fold_sources(self):
        pw, bn = self.pw_conv, self.bn
        return (pw.weight, pw.bias, bn.weight, bn.bias, bn.running_mean, bn.running_var)

    def folded(self):
        """The float32 (weight, bias) of the pointwise conv with eval-mode BatchNorm folded in;
        differentiable when autograd needs it, else cached until a source tensor changes."""
        pw, bn = self.pw_conv, self.bn
        sources = self._fold_sources()
        if torch.compiler.is_compiling() or (
                torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in sources)):
            return fold_bn(pw.weight, bn.weight, bn.bias, bn.running_mean, bn.running_var, bn.eps, pw.bias)
        key = tuple(None if t is None else (t._version, t.data_ptr(), t.dtype, t.device) for t in sources)
        if key != self._fold_key:
            self._fold = fold_bn(pw.weight, bn.weight, bn.bias, bn.running_mean, bn.running_var, bn.eps, pw.bias)
            self._fold_key = key
        return self._fold

    def forward(self, x, residual=None):
        if torch.is_autocast_enabled(x.device.type):
            # The eager convs it replaces would run in the autocast dtype.
            dtype = torch.get_autocast_dtype(x.device.type)
            x = x.to(dtype)
            residual = None if residual is None else residual.to(dtype)
        dw_weight = self.weight
        if dw_weight.dtype != x.dtype and dw_weight.dtype != torch.float32:
            dw_weight = dw_weight.to(x.dtype)
        if not self._uses_batch_statistics():
            weight, bias = self.folded()
            return sepconv_bn(x, dw_weight, weight, bias, relu_input=self.relu_input, relu_output=self.relu_output,
                              residual=residual, backend=self.backend)
        pw_weight, pw_bias = self.pw_conv.weight, self.pw_conv.bias
        if pw_weight.dtype != x.dtype and pw_weight.dtype != torch.float32:
            pw_weight = pw_weight.to(x.dtype)
        z = sepconv_bn(x, dw_weight, pw_weight, None if pw_bias is None else pw_bias.to(pw_weight.dtype),
                       relu_input=self.relu_input, backend=self.backend)
        y = nn.BatchNorm2d.forward(self.bn, z)
        if self.relu_output:
            y = F.relu(y)
        return y if residual is None else y + residual


@dataclasses.dataclass
class FuseReport:
    """What :func:`fuse` did: the fused units (by the name of their depthwise conv) and which of
    them took a residual add into the kernel."""

    names: list
    with_residual: list

    @property
    def count(self):
        return len(self.names)

    def __str__(self):
        return f"fused {self.count} separable units ({len(self.with_residual)} with their residual add)"


# ----------------------------------------------------------------------------------------------
# Finding the units

def _is_depthwise_3x3(m):
    return (type(m) is nn.Conv2d and m.kernel_size == (3, 3) and m.stride == (1, 1) and m.padding == (1, 1)
            and m.dilation == (1, 1) and m.padding_mode == "zeros" and m.groups == m.in_channels == m.out_channels
            and m.bias is None)


def _is_pointwise(m, channels):
    return (type(m) is nn.Conv2d and m.kernel_size == (1, 1) and m.stride == (1, 1) and m.padding == (0, 0)
            and m.groups == 1 and m.in_channels == channels)


def _is_conv_pair(m):
    children = list(m.children())
    return len(children) == 2 and all(type(c) is nn.Conv2d for c in children) and children[0].groups > 1


class _UnitTracer(fx.Tracer):
    """Traces one module's own forward: Sequentials and conv-pair containers are inlined, every
    other child is a leaf (its own forward is searched when fuse() visits it)."""

    def __init__(self, root=None):
        # root may be None: torch.fx rebuilds a pickled GraphModule with its tracer class, no arguments.
        super().__init__()
        self.root_module = root

    def is_leaf_module(self, m, qualname):
        return not (m is self.root_module or isinstance(m, nn.Sequential) or _is_conv_pair(m))


@dataclasses.dataclass
class _Unit:
    relu_in: fx.Node
    dw: fx.Node
    pw: fx.Node
    bn: fx.Node
    relu_out: fx.Node
    add: fx.Node
    residual: fx.Node


def _single_user(node):
    users = list(node.users)
    return users[0] if len(users) == 1 else None


def _module_node(node, modules, predicate):
    return node is not None and node.op == "call_module" and predicate(modules[node.target])


def _find_units(graph, modules):
    order = {node: i for i, node in enumerate(graph.nodes)}
    units = []
    for dw in graph.nodes:
        if not _module_node(dw, modules, _is_depthwise_3x3) or len(dw.args) != 1 or dw.kwargs:
            continue
        pw = _single_user(dw)
        channels = modules[dw.target].out_channels
        if not _module_node(pw, modules, lambda m: _is_pointwise(m, channels)) or pw.args != (dw,):
            continue
        bn = _single_user(pw)
        out_channels = modules[pw.target].out_channels
        if not _module_node(bn, modules, lambda m: type(m) is nn.BatchNorm2d and m.num_features == out_channels):
            continue
        if bn.args != (pw,):
            continue
        source = dw.args[0]
        relu_in = source if (_module_node(source, modules, lambda m: type(m) is nn.ReLU)
                             and _single_user(source) is dw) else None
        relu_out = _single_user(bn)
        if not (_module_node(relu_out, modules, lambda m: type(m) is nn.ReLU) and relu_out.args == (bn,)):
            relu_out = None
        last = relu_out or bn
        add, residual = _single_user(last), None
        if (add is not None and add.op == "call_function" and add.target in (operator.add, torch.add)
                and len(add.args) == 2 and not add.kwargs):
            other = add.args[1] if add.args[0] is last else add.args[0]
            # The residual must exist before the fused call, which takes the depthwise conv's place.
            if isinstance(other, fx.Node) and other is not last and order[other] < order[dw]:
                residual = other
        units.append(_Unit(relu_in, dw, pw, bn, relu_out, add if residual is not None else None, residual))
    return units


def _set_submodule(root, qualname, module):
    parent, _, name = qualname.rpartition(".")
    setattr(root.get_submodule(parent) if parent else root, name, module)


def _fuse_units(root, units, backend, prefix):
    modules = dict(root.named_modules())
    for u in units:
        dw, pw, bn = (modules[n.target] for n in (u.dw, u.pw, u.bn))
        pw_away, bn_away = _fused_away(pw, FusedAwayConv2d), _fused_away(bn, FusedAwayBatchNorm2d)
        fused = FusedSeparableConvBN(dw, pw_away, bn_away, relu_input=u.relu_in is not None,
                                     relu_output=u.relu_out is not None, backend=backend)
        _set_submodule(root, u.dw.target, fused)
        _set_submodule(root, u.pw.target, pw_away)
        _set_submodule(root, u.bn.target, bn_away)
        for relu in (u.relu_in, u.relu_out):
            if relu is not None:
                _set_submodule(root, relu.target, nn.Identity())
    return [prefix + u.dw.target for u in units]


def _take_residuals_into_kernel(root, graph, units):
    """Rewrite root's forward so that each unit's residual add happens in the kernel's epilogue."""
    for u in units:
        u.dw.kwargs = {"residual": u.residual}
        u.add.replace_all_uses_with(u.relu_out or u.bn)
        graph.erase_node(u.add)
    graph.lint()
    rewritten = fx.GraphModule(root, graph, class_name=type(root).__name__)
    # The block keeps its class, children and state_dict; only its forward becomes the rewritten graph,
    # whose submodules are the block's own.
    root.forward = rewritten.forward


def fuse(model, backend="auto"):
    """Replace every separable unit of ``model`` by a :class:`FusedSeparableConvBN`, in place.

    Works on :class:`xception_fast.Xception` (all 34 units; the middle flow's residual adds and the
    leading ReLUs taken into the kernel), on timm's ``legacy_xception`` and on any model with the
    chain; every other module is left as it was. Returns ``(model, report)``.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"fuse: model must be an nn.Module, got {type(model).__name__}")
    if backend not in BACKENDS:
        raise ValueError(f"fuse: backend must be one of {BACKENDS}, got {backend!r}")
    names, with_residual = [], []
    for qualname, module in list(model.named_modules()):
        if isinstance(module, (FusedSeparableConvBN, _FusedAway)) or _is_conv_pair(module):
            continue
        try:
            graph = _UnitTracer(module).trace(module)
        except Exception:  # noqa: BLE001 - a forward fx cannot trace is searched through its children instead
            continue
        modules = dict(module.named_modules())
        units = _find_units(graph, modules)
        if not units:
            continue
        prefix = f"{qualname}." if qualname else ""
        names += _fuse_units(module, units, backend, prefix)
        residual_units = [u for u in units if u.residual is not None]
        if residual_units and module is not model:
            _take_residuals_into_kernel(module, graph, residual_units)
            with_residual += [prefix + u.dw.target for u in residual_units]
    return model, FuseReport(names, with_residual)
