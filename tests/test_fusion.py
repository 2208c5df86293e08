"""fuse(model): what it matches and refuses, train mode, the report, and the fused modules' honesty.

Every check of a result is against eager in the same dtype with a float64 reference (the 2x rule,
tests/exactness.py), on random weights and random BatchNorm statistics. The model families are
tests/test_zoo.py. The C++ kernel runs the units (backend="cpu") unless a test says otherwise.
"""
import copy
import io

import pytest
import torch
from torch import nn

import xception_fast
from xception_fast import FusedBlock, FusedConv2dBN, FusedSeparableConv2d, Xception
import xception_fast.fusion as fusion
from exactness import assert_exact, floor_for, max_abs_error, randomize_model_

timm = pytest.importorskip("timm")
from timm.models._efficientnet_blocks import DepthwiseSeparableConv, InvertedResidual, SqueezeExcite  # noqa: E402


# The whole models' classifiers: the rule compares the largest logit error of each side, and over the
# ten logits of one image that maximum is one draw of a wide distribution (two computations of equal
# precision differ by more than twice in a few draws in a hundred); over a hundred logits it is not.
CLASSES = 100


def fuse(model, backend="cpu"):
    return xception_fast.fuse(copy.deepcopy(model), backend=backend)


def logits(model, x):
    with torch.no_grad():
        return model(x)


def reference(model, x):
    return logits(copy.deepcopy(model).double(), x.double())


def check_exact(fused, eager, x, what=""):
    return assert_exact(logits(fused, x), logits(eager, x), reference(eager, x), what)


def randn(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module")
def ours():
    return randomize_model_(Xception(num_classes=CLASSES), seed=3).eval()


@pytest.fixture(scope="module")
def mobilenet():
    return randomize_model_(timm.create_model("mobilenetv2_100", pretrained=False, num_classes=CLASSES), seed=4).eval()


# ----------------------------------------------------------------------------------------------
# Our Xception and timm's legacy one (the chain the first fuse() knew)

def test_fuses_all_34_units_of_our_xception(ours):
    fused, report = fuse(ours)
    assert report.count == 34 and report.refused == []
    assert sorted(report.with_residual) == [f"middle_flow.{i}.sepconv3.dconv" for i in range(8)]
    forms = {u.name: u.detail for u in report.units}
    # Every ReLU of the separable part is in a kernel: in the prologue of the unit after it, or where
    # a ReLU ends its Sequential (exit_conv1, exit_conv2) in the epilogue of the unit before it.
    without_relu_input = {"entry_block1.sepconv1.dconv", "exit_conv1.0.dconv", "exit_conv2.0.dconv"}
    assert {n for n, f in forms.items() if not f.startswith("relu >")} == without_relu_input
    assert forms["exit_conv1.0.dconv"] == "dw3x3 > pw 1024->1536 +bn > relu"
    assert forms["middle_flow.0.sepconv3.dconv"] == "relu > dw3x3 > pw 728->728 +bn > +residual"
    assert all(f"self.relu{i}(" not in fused.middle_flow[0].fused_code for i in (1, 2, 3)), "passed, never called"
    # The stems' and the shortcuts' BatchNorms are folded.
    assert report.folded == ["entry_block1.project.0", "entry_block2.project.0", "entry_block3.project.0",
                             "entry_conv1.0", "entry_conv2.0", "exit_block.project.0"]
    code = fused.middle_flow[0].fused_code
    again = xception_fast.fuse(fused)[1]
    assert {u.detail for u in again.units} == {"fused by an earlier fuse()"}, "fusing twice finds nothing new"
    assert fused.middle_flow[0].fused_code == code


def test_fuses_all_34_units_of_timm_legacy_xception():
    model = randomize_model_(timm.create_model("legacy_xception", pretrained=False, num_classes=CLASSES), seed=5).eval()
    fused, report = fuse(model)
    assert report.count == 34
    assert sorted(report.with_residual) == sorted(f"block{i}.rep.7.conv1" for i in range(4, 12))
    assert "conv3.conv1" in report.names and "conv4.conv1" in report.names
    check_exact(fused, model, randn(2, 3, 77, 90, seed=6), "legacy_xception")


@pytest.mark.parametrize("size, batch", [((71, 71), 3), ((83, 120), 2)])
def test_our_xception_eval_is_exact(ours, size, batch):
    fused, _ = fuse(ours)
    x = randn(batch, 3, *size, seed=5)
    check_exact(fused, ours, x, f"Xception {size} batch {batch}")
    assert torch.equal(logits(fused, x).argmax(1), reference(ours, x).argmax(1))


def test_channels_last_and_autocast(ours):
    fused, _ = fuse(ours)
    x = randn(2, 3, 75, 80, seed=7)
    ref = reference(ours, x)
    cl_model = copy.deepcopy(fused).to(memory_format=torch.channels_last)
    eager_cl = copy.deepcopy(ours).to(memory_format=torch.channels_last)
    x_cl = x.contiguous(memory_format=torch.channels_last)
    assert_exact(logits(cl_model, x_cl), logits(eager_cl, x_cl), ref, "channels_last")
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got, eager = logits(fused, x_cl), logits(ours, x_cl)
    assert got.dtype == eager.dtype
    assert_exact(got.float(), eager.float(), ref, "autocast bf16")
    # and back: what was packed for bf16 under autocast is not reused for fp32
    assert_exact(logits(fused, x), logits(ours, x), ref, "fp32 after autocast")


def test_to_dtype_refolds(ours):
    fused, _ = fuse(ours)
    x = randn(1, 3, 71, 71, seed=8)
    logits(fused, x)
    fused_bf16, eager_bf16 = copy.deepcopy(fused).bfloat16(), copy.deepcopy(ours).bfloat16()
    assert_exact(logits(fused_bf16, x.bfloat16()).float(), logits(eager_bf16, x.bfloat16()).float(),
                 reference(ours, x), "bf16")


def test_reference_backend_is_the_eager_composition(ours):
    fused, _ = fuse(ours, backend="reference")
    check_exact(fused, ours, randn(1, 3, 71, 71, seed=9))


def test_fused_xception_in_one_line(ours):
    model = Xception(num_classes=CLASSES, fused=True).eval()
    assert sum(isinstance(m, FusedSeparableConv2d) for m in model.modules()) == 34
    model.load_state_dict(ours.state_dict())
    check_exact(model, ours, randn(1, 3, 71, 71, seed=10))


def test_bad_arguments():
    with pytest.raises(TypeError, match="model must be an nn.Module"):
        xception_fast.fuse("xception")
    with pytest.raises(ValueError, match="backend must be one of"):
        xception_fast.fuse(Xception(), backend="fastest")
    with pytest.raises(TypeError, match="recompute_depthwise must be a bool"):
        xception_fast.fuse(Xception(), recompute_depthwise="yes")


# ----------------------------------------------------------------------------------------------
# The chains the matcher recognises beyond Xception's

class SeparableSequential(nn.Sequential):
    """segmentation_models_pytorch's DeepLabV3+ SeparableConv2d: the depthwise and pointwise convs in
    a Sequential, the BatchNorm and ReLU after it in the enclosing one."""

    def __init__(self, c, cout, dilation=1):
        super().__init__(nn.Conv2d(c, c, 3, padding=dilation, dilation=dilation, groups=c, bias=False),
                         nn.Conv2d(c, cout, 1, bias=False))


class Hardswish7(nn.Module):
    """A 7x7 depthwise conv with its own bias, Hardswish and Dropout between the convs, Hardswish after."""

    def __init__(self, c=8, cout=12):
        super().__init__()
        self.dw = nn.Conv2d(c, c, 7, stride=2, padding=3, groups=c)
        self.bn1 = nn.BatchNorm2d(c)
        self.act1 = nn.Hardswish()
        self.drop = nn.Dropout(0.3)
        self.pw = nn.Conv2d(c, cout, 1)
        self.bn2 = nn.BatchNorm2d(cout)
        self.act2 = nn.Hardswish()

    def forward(self, x):
        return self.act2(self.bn2(self.pw(self.drop(self.act1(self.bn1(self.dw(x)))))))


def test_deeplab_separable_sequential_and_other_activations():
    model = randomize_model_(nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1),
        nn.Sequential(SeparableSequential(8, 16, dilation=2), nn.BatchNorm2d(16), nn.ReLU()),
        Hardswish7(16, 12)), seed=11).eval()
    fused, report = fuse(model)
    forms = {u.name: u.detail for u in report.units}
    # The ReLU between the two units goes into the prologue of the second.
    assert forms == {"1.0.0": "dw3x3 d2 > pw 8->16 +bn",
                     "2.dw": "relu > dw7x7 s2 +bn > hardswish > pw 16->12 +bn > hardswish"}
    check_exact(fused, model, randn(2, 3, 17, 22, seed=12))


def test_conv2d_same_is_fused_exactly():
    """timm's Conv2dSame pads asymmetrically where the total is odd (even input sizes at stride 2): a
    fusion with symmetric padding would shift the result by a pixel."""
    block = DepthwiseSeparableConv(8, 16, stride=2, pad_type="same")
    assert type(block.conv_dw).__name__ == "Conv2dSame"
    model = randomize_model_(nn.Sequential(nn.Conv2d(3, 8, 1), block), seed=13).eval()
    fused, report = fuse(model)
    assert report.names == ["1.conv_dw"] and "tf-same" in report.units[0].detail
    for size in ((16, 22), (15, 21), (16, 21)):
        check_exact(fused, model, randn(2, 3, *size, seed=14), f"Conv2dSame {size}")
    # alone, the fused depthwise conv is the Conv2dSame it was
    x = randn(1, 8, 10, 12, seed=15)
    assert torch.equal(fused[1].conv_dw(x), model[1].conv_dw(x))


# ----------------------------------------------------------------------------------------------
# Refusals: each model computes something a fused unit would not; fuse() must leave the unit

class Net(nn.Module):
    """A stem conv, then the block under test."""

    def __init__(self, block):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.block = block

    def forward(self, x):
        return self.block(self.stem(x))


class Unit(nn.Module):
    def __init__(self, c=8, cout=8, **dw):
        super().__init__()
        self.dw = nn.Conv2d(c, c, 3, padding=1, groups=c, bias=False, **dw)
        self.bn1 = nn.BatchNorm2d(c)
        self.act = nn.ReLU6()
        self.pw = nn.Conv2d(c, cout, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)

    def forward(self, x):
        return self.bn2(self.pw(self.act(self.bn1(self.dw(x)))))


class IntermediateUsedTwice(Unit):
    def forward(self, x):
        d = self.act(self.bn1(self.dw(x)))
        return self.bn2(self.pw(d)) + d.mean(1, keepdim=True)


class ConvCalledTwice(Unit):
    """The depthwise conv runs twice with other modules after it each time (pytorch#197539)."""

    def __init__(self):
        super().__init__()
        self.bn3 = nn.BatchNorm2d(8)
        self.pw2 = nn.Conv2d(8, 8, 1)

    def forward(self, x):
        a = self.bn2(self.pw(self.act(self.bn1(self.dw(x)))))
        return a + self.pw2(self.bn3(self.dw(a)))


class WritesBetween(Unit):
    """Between the depthwise conv and the rest of its unit, the unit's input is written in place: one
    fused call, at the unit's end, would read the written input."""

    def forward(self, x):
        d = self.dw(x)
        x.relu_()
        return self.bn2(self.pw(self.act(self.bn1(d)))) + x


class DataDependent(Unit):
    def forward(self, x):
        if x.sum() > 0:  # torch.fx cannot trace a branch on a value
            x = -x
        return super().forward(x)


REFUSALS = {
    "squeeze-excitation between the convs": (
        lambda: DepthwiseSeparableConv(8, 8, se_layer=SqueezeExcite),
        "block.conv_dw", "se (SqueezeExcite) sits between the depthwise and the pointwise conv"),
    "an intermediate used twice": (
        IntermediateUsedTwice, "block.dw", "the result of act (ReLU6) is used 2 times"),
    "a conv module called twice": (ConvCalledTwice, "block.dw", "the conv is called 2 times in one forward"),
    "padding_mode reflect": (lambda: Unit(padding_mode="reflect"), "block.dw", "padding_mode 'reflect'"),
    "an activation the op does not have": (
        lambda: DepthwiseSeparableConv(8, 8, act_layer=nn.SiLU), "block.conv_dw",
        "its activation SiLU is not one of the op's"),
    "an in-place write into its input between the convs": (
        WritesBetween, "block.dw", "writes in place into the unit's input between its convs"),
    "a forward fx cannot trace": (DataDependent, "block.dw", "inside block, whose forward torch.fx cannot trace"),
}


@pytest.mark.parametrize("case", REFUSALS)
def test_refused_unit_is_left_as_it_was(case):
    make, name, reason = REFUSALS[case]
    model = randomize_model_(Net(make()), seed=16).eval()
    fused, report = fuse(model)
    assert report.names == [] and [n for n, _ in report.refused] == [name], str(report)
    assert reason in report.refused[0][1], str(report)
    assert not isinstance(fused.get_submodule(name), FusedSeparableConv2d)
    for size in ((10, 13), (9, 9)):
        x = randn(2, 3, *size, seed=17)
        check_exact(fused, model, x, case)
        fused.train(), model.train()
        torch.manual_seed(0)
        got = fused(x)
        torch.manual_seed(0)
        assert_exact(got, model(x), copy.deepcopy(model).double()(x.double()), f"{case}, train mode")
        fused.eval(), model.eval()


class InPlaceInput(nn.Module):
    """The unit's leading ReLU is in place on the block's input, which the caller reads again: taken
    into the kernel, it would no longer change the caller's tensor."""

    def __init__(self):
        super().__init__()
        self.relu = nn.ReLU(inplace=True)
        self.unit = Unit()

    def forward(self, x):
        return self.unit.bn2(self.unit.pw(self.unit.act(self.unit.bn1(self.unit.dw(self.relu(x))))))


class ReadsInputAgain(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.block = InPlaceInput()

    def forward(self, x):
        x = self.stem(x)
        return self.block(x) + x


def test_in_place_activation_of_a_shared_input_is_not_taken():
    model = randomize_model_(ReadsInputAgain(), seed=18).eval()
    fused, report = fuse(model)
    assert report.names == ["block.unit.dw"] and not report.units[0].detail.startswith("relu")
    check_exact(fused, model, randn(2, 3, 11, 9, seed=19))


def test_stochastic_depth_in_train_mode_keeps_the_add_outside_the_kernel():
    """BatchNorms in eval (the op runs the unit) but DropPath in train: the add must follow the random
    drop, as eager's does; in eval the add is in the kernel."""
    model = randomize_model_(timm.create_model("mobilenetv2_100", pretrained=False, num_classes=CLASSES,
                                               drop_path_rate=0.3), seed=20).eval()
    fused, report = fuse(model)
    assert len(report.with_residual) == 10
    x = randn(4, 3, 35, 41, seed=21)
    check_exact(fused, model, x, "eval")
    for m in (fused, model):
        m.train()
        for bn in m.modules():
            if isinstance(bn, nn.BatchNorm2d):
                bn.eval()
    outputs = []
    for m, inp in ((fused, x), (model, x), (copy.deepcopy(model).double(), x.double())):
        torch.manual_seed(1)  # the same draws: bernoulli_ draws a float64 mask as it draws a float32 one
        outputs.append(logits(m, inp))
    assert_exact(*outputs, "train-mode DropPath")
    torch.manual_seed(2)
    assert not torch.allclose(logits(model, x), outputs[1]), "the DropPaths do draw"


class ModeDependent(Unit):
    def forward(self, x):
        y = super().forward(x)
        if self.training:  # fixed by a trace: the fused block keeps a graph per mode
            y = y * 0.5
        return y + x


def test_forward_that_branches_on_training_keeps_a_graph_per_mode():
    model = randomize_model_(Net(ModeDependent()), seed=22).eval()
    fused, report = fuse(model)
    assert report.with_residual == ["block.dw"]
    assert "# train mode" in fused.block.fused_code
    x = randn(2, 3, 9, 12, seed=23)
    check_exact(fused, model, x, "eval")
    fused.train(), model.train()
    assert_exact(fused(x), model(x), copy.deepcopy(model).double()(x.double()), "train")


# ----------------------------------------------------------------------------------------------
# Train mode

def flat(model, kind):
    """All of a model's gradients, parameters or floating buffers as one vector: per tensor, over
    hundreds of them at rounding level, the rule would hold the fused model to whichever eager tensor
    rounded luckiest."""
    if kind == "buffers":
        tensors = [(n, b) for n, b in model.named_buffers() if b.is_floating_point()]
    else:
        tensors = list(model.named_parameters())
    pick = (lambda p: p.grad) if kind == "gradients" else (lambda p: p)
    return torch.cat([pick(t).detach().reshape(-1) for _, t in sorted(tensors, key=lambda item: item[0])])


def train_step(model, x, target):
    loss = nn.functional.cross_entropy(model(x), target)
    loss.backward()
    torch.optim.SGD(model.parameters(), lr=0.01).step()
    return loss.detach()


class _KinkInputs:
    """Records, during one forward, the input of each kink by the module's name: the ``nn.ReLU`` and
    ``nn.MaxPool2d`` modules called (fused ones too), and the ReLUs a fused conv takes into the op as
    its ``act_in``."""

    def __init__(self, model):
        self.inputs, names = {}, {m: n for n, m in model.named_modules()}
        kinks = [m for m in model.modules() if type(m) in (nn.ReLU, nn.MaxPool2d, fusion.FusedMaxPool2d)]
        self.hooks = [m.register_forward_pre_hook(lambda m, args: self._record(names[m], args[0])) for m in kinks]
        self.hooks += [m.register_forward_pre_hook(
            lambda m, args, kwargs: self._record(names[kwargs["act_in"]], args[0])
            if type(kwargs.get("act_in")) is nn.ReLU else None, with_kwargs=True)
            for m in model.modules() if isinstance(m, FusedSeparableConv2d)]

    def _record(self, name, x):
        # A fused conv that runs its eager steps calls its act_in too: the same input, seen twice.
        assert name not in self.inputs or torch.equal(self.inputs[name], x), f"{name} called twice"
        self.inputs[name] = x.detach().clone()

    def __enter__(self):
        return self.inputs

    def __exit__(self, *exc):
        for hook in self.hooks:
            hook.remove()


class _PinnedReLU(nn.Module):
    """A ReLU that passes where it is told to."""

    def __init__(self, passes):
        super().__init__()
        self.passes = passes

    def forward(self, x):
        return x * self.passes.to(x.dtype)


class _PinnedMaxPool2d(nn.Module):
    """A max pool that takes the elements it is told to (flat indices into each plane, as
    ``max_pool2d(return_indices=True)`` gives them)."""

    def __init__(self, indices):
        super().__init__()
        self.indices = indices

    def forward(self, x):
        return x.flatten(2).gather(2, self.indices.flatten(2)).view(self.indices.shape)


def _max_pool_indices(pool, x):
    return nn.functional.max_pool2d(x, pool.kernel_size, pool.stride, pool.padding, pool.dilation, pool.ceil_mode,
                                    return_indices=True)[1]


def _pinned_reference(model64, inputs, reference_inputs, site_errors, who):
    """``model64`` with every kink on ``who``'s side: each ReLU passing where ``who``'s did, each max
    pool taking the elements ``who``'s took. Where ``who`` took another side than the float64
    reference, the reference must lie within the rule's tolerance of the kink (2x eager's error at
    that input plus the floor): a rounding's coin toss, which moves the forward by less than the
    tolerance and a gradient entry by its whole value, not a wrong result."""
    assert set(inputs) == set(reference_inputs), (
        f"{who}: kinks whose input was not seen: {sorted(set(reference_inputs) - set(inputs))}")
    pinned = copy.deepcopy(model64)
    modules = dict(model64.named_modules())
    for name, x in inputs.items():
        ref = reference_inputs[name]
        tolerance = 2 * site_errors[name] + floor_for(x.dtype, ref)
        if type(modules[name]) is nn.ReLU:
            side, ref_side = x > 0, ref > 0
            distance = ref.abs()
            pinned.set_submodule(name, _PinnedReLU(side))
        else:
            side, ref_side = _max_pool_indices(modules[name], x), _max_pool_indices(modules[name], ref)
            planes = ref.flatten(2)
            distance = planes.gather(2, ref_side.flatten(2)) - planes.gather(2, side.flatten(2))
            pinned.set_submodule(name, _PinnedMaxPool2d(side))
        across = (side != ref_side) & (distance.view(side.shape) > tolerance)
        assert not across.any(), (f"{who}: {name} on another side of its kink than the reference, "
                                  f"{distance.view(side.shape)[across].max().item():.3e} from it "
                                  f"(tolerance {tolerance:.3e})")
    return pinned


def check_train_step(eager, fused, x, target):
    """One SGD step: loss, gradients, parameters and buffers. Each model's gradients are held to the
    float64 step on its own side of every kink (:func:`_pinned_reference`)."""
    model64 = copy.deepcopy(eager).double()
    probe = copy.deepcopy(model64)  # its forward in train mode moves its running statistics
    with torch.no_grad(), _KinkInputs(probe) as reference_inputs:
        probe(x.double())
    references, losses = {}, {}
    for who, model in (("eager", eager), ("fused", fused)):
        with _KinkInputs(model) as inputs:
            losses[who] = train_step(model, x, target)
        if who == "eager":
            site_errors = {n: max_abs_error(t, reference_inputs[n]) for n, t in inputs.items()}
        references[who] = _pinned_reference(model64, inputs, reference_inputs, site_errors, who)
    ref_losses = {who: train_step(model, x.double(), target) for who, model in references.items()}
    assert_exact(losses["fused"], losses["eager"], ref_losses["fused"], "loss", eager_reference64=ref_losses["eager"])
    for kind in ("gradients", "parameters", "buffers"):
        assert_exact(flat(fused, kind), flat(eager, kind), flat(references["fused"], kind), kind,
                     eager_reference64=flat(references["eager"], kind))
    counts = {n: b for n, b in fused.named_buffers() if not b.is_floating_point()}
    assert all(torch.equal(b, dict(references["fused"].named_buffers())[n]) for n, b in counts.items())


def saved_for_backward(model, x):
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        model(x)
    return saved


def test_train_step_matches_eager_xception():
    """No BatchNorm between the convs: the op runs ReLU, depthwise and pointwise; the BatchNorm after
    runs on batch statistics. The backward takes the depthwise result the forward kept (one tensor
    more saved per unit), or recomputes it."""
    eager = randomize_model_(Xception(num_classes=5), seed=24).train()
    x, target = randn(3, 3, 71, 71, seed=25), torch.tensor([0, 3, 4])
    saved = {}
    for recompute_depthwise in (False, True):
        fused, _ = xception_fast.fuse(copy.deepcopy(eager), backend="cpu", recompute_depthwise=recompute_depthwise)
        saved[recompute_depthwise] = len(saved_for_backward(copy.deepcopy(fused), x))  # (a step of its own)
        check_train_step(copy.deepcopy(eager), fused, x, target)
    assert saved[False] == saved[True] + 34, saved


def test_train_step_matches_eager_mobilenet(mobilenet):
    """A BatchNorm between the convs needs the whole depthwise result: the unit runs as its eager
    modules, so training is eager's, to the bit."""
    eager = copy.deepcopy(mobilenet).train()
    fused, _ = fuse(eager)
    x, target = randn(4, 3, 41, 35, seed=26), torch.tensor([1, 0, 9, 3])
    check_train_step(eager, fused, x, target)
    assert torch.equal(flat(fused, "buffers"), flat(eager, "buffers"))
    assert torch.equal(flat(fused, "parameters"), flat(eager, "parameters"))


def test_fine_tuning_with_frozen_batchnorms():
    """Train mode, BatchNorms in eval: the op runs with the folds made in the graph, differentiable.

    timm's own blocks with no activation: where a ReLU6 clips, one pre-activation that rounding puts
    on the other side of 0 or 6 moves a whole gradient entry (in eager as in the fused model: the
    gradients of a ReLU6 network at rounding level are a coin toss), which would test the toss, not
    the fold."""
    model = randomize_model_(nn.Sequential(
        nn.Conv2d(3, 16, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(16),
        DepthwiseSeparableConv(16, 24, act_layer=nn.Identity),
        InvertedResidual(24, 24, exp_ratio=4.0, act_layer=nn.Identity),
        InvertedResidual(24, 32, dw_kernel_size=5, stride=2, exp_ratio=6.0, act_layer=nn.Identity),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(32, 10)), seed=27).train()
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.eval()
    fused, report = fuse(model)
    assert report.count == 3 and report.with_residual == ["3.conv_dw"]
    check_train_step(model, fused, randn(3, 3, 29, 35, seed=27), torch.tensor([2, 7, 0]))


def _linear_mobilenet(seed):
    """timm's blocks with no activation, in eval: folded convs and fused units whose gradients at
    rounding level are not a coin toss at a ReLU6's clip points."""
    return randomize_model_(nn.Sequential(
        nn.Conv2d(3, 16, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(16),
        nn.Conv2d(16, 16, 1, bias=False), nn.BatchNorm2d(16),
        DepthwiseSeparableConv(16, 24, act_layer=nn.Identity),
        InvertedResidual(24, 32, dw_kernel_size=5, stride=2, exp_ratio=6.0, act_layer=nn.Identity),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(32, 10)), seed=seed).eval()


@pytest.mark.parametrize("frozen", [True, False], ids=["frozen", "weights-need-grad"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_eval_mode_gradients_match_eager(dtype, frozen):
    """An eval-mode model differentiated (input gradients, saliency, adversarial inputs; or weights
    being fine-tuned with BatchNorms frozen): the folded convs must stay differentiable, for x as for
    the weights, in fp32 and under bf16 autocast (oneDNN's fused convolution has no derivative)."""
    eager = _linear_mobilenet(seed=44)
    eager.requires_grad_(not frozen)
    fused, report = fuse(eager)
    assert report.count == 2 and len(report.folded) == 3, report
    x = randn(2, 3, 37, 29, seed=45).contiguous(memory_format=torch.channels_last)

    def grads(model, x, autocast):
        model.zero_grad()
        x = x.clone().requires_grad_()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            model(x).float().square().sum().backward()
        assert x.grad is not None, "the input has a gradient"
        weights = [p.grad for _, p in sorted(model.named_parameters())]
        assert all((g is None) == frozen for g in weights), "the weights have gradients iff they need them"
        return torch.cat([x.grad.reshape(-1)] + [g.reshape(-1) for g in weights if g is not None])

    bf16 = dtype == torch.bfloat16
    assert_exact(grads(fused, x, bf16), grads(eager, x, bf16), grads(copy.deepcopy(eager).double(), x.double(), False),
                 f"{dtype} gradients", precision=dtype)


def test_fold_is_redone_when_weights_change():
    fused, _ = fuse(randomize_model_(Xception(num_classes=CLASSES), seed=28).eval())
    x = randn(1, 3, 71, 71, seed=29)
    first = logits(fused, x)
    fused.train()
    fused(randn(2, 3, 71, 71, seed=30)).square().mean().backward()
    torch.optim.SGD(fused.parameters(), lr=0.1).step()
    fused.eval()
    after = logits(fused, x)
    eager = Xception(num_classes=CLASSES).eval()
    eager.load_state_dict(fused.state_dict())
    assert not torch.equal(first, after)
    check_exact(fused, eager, x, "after a step")


def test_packed_weights_follow_the_fp32_precision_setting(mobilenet):
    conv = getattr(torch.backends.mkldnn, "conv", None)
    if conv is None or not hasattr(conv, "fp32_precision"):
        pytest.skip("this torch has no torch.backends.mkldnn.conv.fp32_precision")
    fused, _ = fuse(mobilenet)
    x = randn(2, 3, 33, 39, seed=31)
    ref = reference(mobilenet, x)
    assert_exact(logits(fused, x), logits(mobilenet, x), ref, "fp32")
    saved = conv.fp32_precision
    try:
        conv.fp32_precision = "bf16"
        assert_exact(logits(fused, x), logits(mobilenet, x), ref, "fp32 with bf16 products")
    finally:
        conv.fp32_precision = saved
    assert_exact(logits(fused, x), logits(mobilenet, x), ref, "fp32 again")


# ----------------------------------------------------------------------------------------------
# The report

def test_report_reads_per_unit():
    model = randomize_model_(nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU6(),
        DepthwiseSeparableConv(8, 8, se_layer=SqueezeExcite),
        DepthwiseSeparableConv(8, 16, stride=2)), seed=32).eval()
    _, report = fuse(model)
    assert str(report) == (
        "fused 1 separable unit of 2 depthwise convs (0 with their residual add); "
        "BatchNorm folded into 3 other convs\n"
        "  fused:\n"
        "    4.conv_dw  dw3x3 s2 +bn > relu > pw 8->16 +bn\n"
        "  left as they were:\n"
        "    3.conv_dw  se (SqueezeExcite) sits between the depthwise and the pointwise conv; "
        "its BatchNorm is folded into it")
    assert report.refused == [("3.conv_dw", report.units[0].detail)]
    assert report.folded == ["0", "3.conv_dw", "3.conv_pw"]


def test_report_of_a_whole_model(mobilenet):
    _, report = fuse(mobilenet)
    lines = str(report).splitlines()
    assert lines[0] == report.summary == (
        "fused 17 separable units of 17 depthwise convs (10 with their residual add); "
        "BatchNorm folded into 18 other convs")
    assert lines[1] == "  fused:" and len(lines) == 19
    assert lines[2] == "    blocks.0.0.conv_dw  dw3x3 +bn > relu6 > pw 32->16 +bn"
    assert lines[4] == "    blocks.1.1.conv_dw  dw3x3 +bn > relu6 > pw 144->24 +bn > +residual"
    assert report.units[2].block == "blocks.1.1" and report.units[2].residual


# ----------------------------------------------------------------------------------------------
# The fused modules are honest modules

def test_modules_stay_in_their_slots(mobilenet):
    eager = copy.deepcopy(mobilenet)
    block = eager.blocks[1][1]
    children = dict(block.named_children())
    fused, _ = xception_fast.fuse(eager, backend="cpu")
    assert fused is eager and fused.blocks[1][1] is block
    assert dict(block.named_children()) == children, "every child is the same object in the same slot"
    assert type(block.conv_pwl) is nn.Conv2d and type(block.bn3).__name__ == "BatchNormAct2d"
    assert type(block.conv_dw) is FusedSeparableConv2d and type(block.conv_pw) is FusedConv2dBN
    assert type(block).__name__ == "FusedInvertedResidual" and isinstance(block, FusedBlock)
    assert isinstance(block, type(mobilenet.blocks[1][1]))
    assert "forward" not in vars(block), "the forward is the class's, not an instance attribute"
    assert "self.conv_dw(conv_pw_1, mid = (bn2_1,), pw = conv_pwl_1, out = (bn3_1,), residual = x)" in \
        block.fused_code
    assert len(list(fused.modules())) == len(list(mobilenet.modules()))
    # alone, a fused conv is the conv it was
    x = randn(2, 144, 9, 7, seed=33)
    assert torch.equal(block.conv_dw(x), mobilenet.blocks[1][1].conv_dw(x))


@pytest.mark.parametrize("which", ["ours", "mobilenet"])
def test_state_dict_round_trips_both_ways(which, ours, mobilenet):
    model = {"ours": ours, "mobilenet": mobilenet}[which]
    fused, _ = fuse(model)
    assert list(fused.state_dict()) == list(model.state_dict())
    assert [n for n, _ in fused.named_parameters()] == [n for n, _ in model.named_parameters()]
    other = randomize_model_(copy.deepcopy(model), seed=34).eval()
    fused.load_state_dict(other.state_dict())
    x = randn(1, 3, 71, 71, seed=35)
    check_exact(fused, other, x, "after load_state_dict")
    eager = copy.deepcopy(model)
    eager.load_state_dict(fused.state_dict())
    assert torch.equal(logits(eager, x), logits(other, x))


@pytest.mark.parametrize("which", ["ours", "mobilenet"])
def test_whole_fused_model_saves_loads_and_copies(which, ours, mobilenet):
    model = {"ours": ours, "mobilenet": mobilenet}[which]
    fused, _ = fuse(model)
    x = randn(1, 3, 71, 71, seed=36)
    expected = logits(fused, x)
    buffer = io.BytesIO()
    torch.save(fused, buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=False)
    assert type(loaded).__name__ == type(fused).__name__
    assert torch.equal(logits(loaded, x), expected)
    # a copy's forward must run the copy's own modules
    other = randomize_model_(copy.deepcopy(model), seed=37).eval()
    copied = copy.deepcopy(fused)
    copied.load_state_dict(other.state_dict())
    check_exact(copied, other, x, "copy")
    assert torch.equal(logits(fused, x), expected), "the original is untouched"


def test_to_moves_and_converts(mobilenet):
    fused, _ = fuse(mobilenet)
    x = randn(2, 3, 39, 33, seed=38)
    logits(fused, x)
    converted = fused.to(torch.float64).to(torch.float32)  # in place, new tensors: the caches are stale
    assert converted is fused
    check_exact(fused, mobilenet, x, "after .to()")


@pytest.mark.parametrize("which", ["ours", "mobilenet"])
def test_torch_compile_fullgraph_of_fused_model(which, ours, mobilenet):
    model = {"ours": ours, "mobilenet": mobilenet}[which]
    fused, _ = fuse(model)
    x = randn(1, 3, 71, 71, seed=39)
    compiled = torch.compile(fused, fullgraph=True, backend="aot_eager")
    assert_exact(logits(compiled, x), logits(model, x), reference(model, x))


def _count_packs(monkeypatch):
    packs = []
    pack = xception_fast.ops.pack_weights

    def counted(*args, **kwargs):
        packs.append(args[0])
        return pack(*args, **kwargs)

    monkeypatch.setattr(xception_fast.ops, "pack_weights", counted)
    return packs


def change_in_place_(*models):
    """Every weight and running statistic of each model changed in place, the same way."""
    with torch.no_grad():
        for model in models:
            for name, t in list(model.named_parameters()) + list(model.named_buffers()):
                if t.is_floating_point():
                    t.mul_(1.5 if name.endswith("running_var") else 0.9)


def test_torch_compile_keeps_packed_weights_until_a_weight_changes(mobilenet, monkeypatch):
    fused, report = fuse(mobilenet)
    packs = _count_packs(monkeypatch)
    compiled = torch.compile(fused, fullgraph=True, backend="aot_eager")
    x = randn(2, 3, 45, 39, seed=41).contiguous(memory_format=torch.channels_last)
    check_exact(compiled, mobilenet, x, "compiled")
    assert packs == ["cpu"] * report.count, "each unit packs once, when the graph first runs"
    logits(compiled, x)
    assert len(packs) == report.count, "the second call packs nothing"
    # Weights and running statistics changed in place, as an optimizer step or load_state_dict
    # changes them: the compiled model follows, without recompiling.
    changed = copy.deepcopy(mobilenet)
    change_in_place_(fused, changed)
    check_exact(compiled, changed, x, "compiled, after the change")
    assert len(packs) == 2 * report.count


def _count_reorders(monkeypatch):
    """The input sizes of the folded convs' weights laid out in oneDNN's layout, one per reorder."""
    reorders = []
    reorder = FusedConv2dBN._onednn_weight

    def counted(self, weight, input_size):
        reorders.append(input_size)
        return reorder(self, weight, input_size)

    monkeypatch.setattr(FusedConv2dBN, "_onednn_weight", counted)
    return reorders


@pytest.mark.skipif(not torch.backends.mkldnn.is_available(), reason="needs oneDNN")
def test_torch_compile_keeps_folded_convs_until_a_weight_changes(mobilenet, monkeypatch):
    """Compiled, a folded conv looks its fold and its weight in oneDNN's layout up in its module's
    cache when the graph runs (xception_fast::conv_bn_with_cached_weights), as uncompiled: made
    once per weight version, not traced into the graph to run on every call."""
    fused, report = fuse(mobilenet)
    reorders = _count_reorders(monkeypatch)
    compiled = torch.compile(fused, fullgraph=True, backend="aot_eager")
    x = randn(2, 3, 45, 39, seed=44).contiguous(memory_format=torch.channels_last)
    check_exact(compiled, mobilenet, x, "compiled")
    assert len(reorders) == len(report.folded), "each folded conv reorders its weight once, when the graph first runs"
    assert torch.equal(logits(compiled, x), logits(fused, x)), "the same computation as the uncompiled fused model"
    assert len(reorders) == len(report.folded), "and never again for the same weights"
    changed = copy.deepcopy(mobilenet)
    change_in_place_(fused, changed)
    check_exact(compiled, changed, x, "compiled, after the change")
    assert len(reorders) == 2 * len(report.folded)


def _widened(fused, names):
    """How many of the folded convs ``names`` of ``fused`` run in fp32 under bf16 on channels-last
    x (FusedConv2dBN._widens_bf16)."""
    modules = dict(fused.named_modules())
    return sum(modules[name]._widens_bf16(torch.empty(1, modules[name].in_channels, 8, 8).contiguous(
        memory_format=torch.channels_last), torch.bfloat16, ()) for name in names)


@pytest.mark.skipif(not torch.backends.mkldnn.is_available(), reason="needs oneDNN")
@pytest.mark.parametrize("autocast, onednn_bf16, cpu_bf16",
                         [(False, None, None), (True, None, None), (True, True, True), (True, True, False),
                          (True, False, False)],
                         ids=["fp32", "bf16-autocast", "bf16-autocast-on-a-cpu-with-bf16-instructions",
                              "bf16-autocast-on-an-avx512-cpu-without-them", "bf16-autocast-on-an-avx2-cpu"])
def test_folded_convs_keep_onednn_weights_until_a_weight_changes(mobilenet, monkeypatch, autocast, onednn_bf16,
                                                                 cpu_bf16):
    """Channels-last folded convs run as oneDNN's convolution with post-ops, in fp32 as under bf16
    autocast, on the weight reordered once per weight version. Under bf16: in bf16 where the CPU
    has bf16 instructions; on one without them, in fp32 on bf16-rounded operands where the conv
    has the arithmetic for it (FusedConv2dBN._widens_bf16), otherwise in bf16 where oneDNN has
    bf16 on the CPU (not on AVX2 ones, where its ops refuse it) and elsewhere, as there, exactly
    without oneDNN."""
    if onednn_bf16 is not None:
        monkeypatch.setattr(fusion, "_ONEDNN_BF16", onednn_bf16)
    if cpu_bf16 is not None:
        monkeypatch.setattr(fusion, "_CPU_MULTIPLIES_BF16", cpu_bf16)
    fused, report = fuse(mobilenet)
    reorders = _count_reorders(monkeypatch)
    x = randn(1, 3, 45, 39, seed=43).contiguous(memory_format=torch.channels_last)
    ref = reference(mobilenet, x)

    def check(eager, what):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            got, expected = logits(fused, x), logits(eager, x)
        assert_exact(got.float(), expected.float(), ref if eager is mobilenet else reference(eager, x), what)

    widened = _widened(fused, report.folded) if autocast else 0
    if cpu_bf16 is False:
        assert 0 < widened < len(report.folded), "the model has folded convs of both kinds"
    if cpu_bf16 is True:
        assert widened == 0
    folded = len(report.folded) if not autocast or fusion._ONEDNN_BF16 else widened
    check(mobilenet, "first call")
    assert len(reorders) == folded, "each folded conv reorders its weight once"
    check(mobilenet, "again")
    assert len(reorders) == folded, "and never again for the same weights and input size"
    changed = copy.deepcopy(mobilenet)
    change_in_place_(fused, changed)
    check(changed, "after the change")
    assert len(reorders) == 2 * folded
    conv = getattr(torch.backends.mkldnn, "conv", None)
    if not autocast and hasattr(conv, "fp32_precision"):
        # oneDNN lays out a float32 weight for the precision its setting allows.
        saved = conv.fp32_precision
        try:
            conv.fp32_precision = "bf16"
            check(changed, "with fp32_precision='bf16'")
        finally:
            conv.fp32_precision = saved
        assert len(reorders) == 3 * len(report.folded), "a new setting, a new reorder"


@pytest.mark.skipif(not torch.backends.mkldnn.is_available(), reason="needs oneDNN")
@pytest.mark.parametrize("x_dtype", [torch.bfloat16, torch.float32])
def test_folded_bf16_conv_in_fp32_is_the_bf16_operands_exact_result_rounded_once(mobilenet, monkeypatch, x_dtype):
    """On a CPU without bf16 instructions, a folded conv with the arithmetic for it runs under bf16
    autocast in fp32 (FusedConv2dBN._widens_bf16): each output is the exact result of x and the
    folded weight rounded to bf16, plus the float32 folded bias, through the activation, rounded
    once to bf16 (within a bf16 ulp, the fp32 sums' error aside). x comes in bf16 from a previous
    layer, or in fp32 (the stem's image), which the conv rounds as eager's would. A conv with
    little arithmetic per element keeps the bf16 convolution."""
    monkeypatch.setattr(fusion, "_CPU_MULTIPLIES_BF16", False)
    fused, _ = fuse(mobilenet)
    shallow, block = fused.blocks[1][0].conv_pw, fused.blocks[2][0]  # 16 -> 96 and 24 -> 144 channels
    conv, bn = block.conv_pw, block.bn1
    x = randn(2, 24, 13, 11, seed=46).to(x_dtype).contiguous(memory_format=torch.channels_last)
    assert conv._widens_bf16(x, torch.bfloat16, ())
    assert not shallow._widens_bf16(torch.empty(2, 16, 13, 11).contiguous(memory_format=torch.channels_last),
                                    torch.bfloat16, ())
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        got = conv(x, bn=bn)
    assert got.dtype == torch.bfloat16 and got.is_contiguous(memory_format=torch.channels_last)
    weight, bias = xception_fast.fold_bn(conv.weight, bn.weight, bn.bias, bn.running_mean, bn.running_var, bn.eps)
    x64, w64 = x.to(torch.bfloat16).double(), weight.to(torch.bfloat16).double()
    expected = (torch.nn.functional.conv2d(x64, w64) + bias.double().reshape(-1, 1, 1)).clamp(0, 6)
    magnitude = torch.nn.functional.conv2d(x64.abs(), w64.abs()) + bias.double().abs().reshape(-1, 1, 1)
    ulp = torch.exp2(torch.floor(torch.log2(expected.abs().clamp_min(2.0 ** -100))) - 7)
    excess = (got.double() - expected).abs() - ulp - 2.0 ** -18 * magnitude
    assert excess.max() <= 0, f"off the bf16 operands' exact result by more than an ulp: {excess.max():.3g}"


def test_opcheck_of_the_op_torch_compile_calls(mobilenet):
    fused, _ = fuse(mobilenet)
    owner = next(m for m in fused.modules() if isinstance(m, FusedSeparableConv2d))._owner_slot
    g = torch.Generator().manual_seed(42)
    c, cout = 5, 7

    def bn(n):
        return [torch.randn(n, generator=g), torch.randn(n, generator=g), torch.randn(n, generator=g),
                torch.rand(n, generator=g) + 0.5, torch.tensor(3)]

    x = torch.randn(2, c, 9, 8, generator=g).contiguous(memory_format=torch.channels_last)
    dw, pw = torch.randn(c, 1, 3, 3, generator=g), torch.randn(cout, c, 1, 1, generator=g)
    residual = torch.randn(2, cout, 9, 8, generator=g)
    op = torch.ops.xception_fast.unit_with_cached_weights.default
    torch.library.opcheck(op, (x, dw, None, bn(c), pw, None, bn(cout), [1e-3, 1e-5], residual, 1, 1, 1, "relu",
                               "relu6", "identity", owner))
    torch.library.opcheck(op, (x, dw, torch.randn(c, generator=g), [], pw, torch.randn(cout, generator=g), [],
                               [0.0, 0.0], None, 2, 1, 1, "identity", "identity", "relu", owner))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_opcheck_of_the_folded_conv_op_torch_compile_calls(mobilenet, dtype):
    fused, _ = fuse(mobilenet)
    conv = next(m for m in fused.modules() if isinstance(m, FusedConv2dBN) and m.stride == (2, 2))
    g = torch.Generator().manual_seed(45)
    cout, cin, k, _ = conv.weight.shape
    bn = [torch.randn(cout, generator=g), torch.randn(cout, generator=g), torch.randn(cout, generator=g),
          torch.rand(cout, generator=g) + 0.5, torch.tensor(3)]
    x = torch.randn(2, cin, 11, 10, generator=g).to(dtype).contiguous(memory_format=torch.channels_last)
    op = torch.ops.xception_fast.conv_bn_with_cached_weights.default
    for bias, act in ((None, "relu6"), (torch.randn(cout, generator=g), "identity")):
        torch.library.opcheck(op, (x, torch.randn(cout, cin, k, k, generator=g), bias, bn, 1e-3, list(conv.stride),
                                   list(conv.padding), list(conv.dilation), act, conv._owner_slot))


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["cuda", "triton"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_gpu_backends_whole_model(ours, mobilenet, backend, dtype):
    for model, size in ((ours, (299, 299)), (mobilenet, (224, 224))):
        fused, _ = fuse(model, backend=backend)
        fused = fused.cuda().to(dtype=dtype, memory_format=torch.channels_last)
        eager = copy.deepcopy(model).cuda().to(dtype=dtype, memory_format=torch.channels_last)
        x = randn(4, 3, *size, seed=40)
        xd = x.cuda().to(dtype=dtype, memory_format=torch.channels_last)
        assert_exact(logits(fused, xd).float(), logits(eager, xd).float(), reference(model, x), f"{backend} {dtype}")
