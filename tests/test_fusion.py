"""fuse(model) and the fused modules, on the whole model, against eager and a float64 run."""
import copy
import io

import pytest
import torch
from torch import nn

import xception_fast
from xception_fast import FusedAwayBatchNorm2d, FusedSeparableConvBN, Xception
from exactness import assert_exact, randomize_model_

timm = pytest.importorskip("timm")


def fused_copy(model, backend="auto"):
    fused, report = xception_fast.fuse(copy.deepcopy(model), backend=backend)
    return fused, report


def logits(model, x):
    with torch.no_grad():
        return model(x)


@pytest.fixture(scope="module")
def ours():
    return randomize_model_(Xception(), seed=3).eval()


@pytest.fixture(scope="module")
def timm_model():
    return randomize_model_(timm.create_model("legacy_xception"), seed=4).eval()


def test_fuses_all_34_units_of_our_xception(ours):
    fused, report = fused_copy(ours)
    assert report.count == 34 and len(set(report.names)) == 34
    assert sorted(report.with_residual) == [f"middle_flow.{i}.sepconv3.dconv" for i in range(8)]
    units = {name: m for name, m in fused.named_modules() if isinstance(m, FusedSeparableConvBN)}
    assert sorted(units) == sorted(report.names)
    # Every ReLU of the network's separable part is in a kernel: in the prologue of the unit after
    # it, or (where the ReLU ends a Sequential: exit_conv1, exit_conv2) in the epilogue before it.
    without_relu_input = {"entry_block1.sepconv1.dconv", "exit_conv1.0.dconv", "exit_conv2.0.dconv"}
    assert {n for n, u in units.items() if not u.relu_input} == without_relu_input
    assert units["exit_conv1.0.dconv"].relu_output and units["exit_conv2.0.dconv"].relu_output
    assert not any(isinstance(m, nn.ReLU) for m in fused.middle_flow.modules())
    assert xception_fast.fuse(fused)[1].count == 0, "fusing twice must find nothing left"


def test_fuses_all_34_units_of_timm_legacy_xception(timm_model):
    fused, report = fused_copy(timm_model)
    assert report.count == 34
    assert sorted(report.with_residual) == sorted(f"block{i}.rep.7.conv1" for i in range(4, 12))
    assert "conv3.conv1" in report.names and "conv4.conv1" in report.names


@pytest.mark.parametrize("size, batch", [((299, 299), 1), ((71, 71), 3), ((83, 120), 3)])
def test_whole_model_eval_is_exact(ours, size, batch):
    fused, _ = fused_copy(ours)
    x = torch.randn(batch, 3, *size, generator=torch.Generator().manual_seed(5))
    ref = logits(copy.deepcopy(ours).double(), x.double())
    got, eager = logits(fused, x), logits(ours, x)
    assert_exact(got, eager, ref, f"Xception {size} batch {batch}")
    assert torch.equal(got.argmax(1), ref.argmax(1))


@pytest.mark.parametrize("size", [(299, 299), (77, 90)])
def test_timm_fused_in_place_is_exact(timm_model, size):
    fused, _ = fused_copy(timm_model)
    x = torch.randn(1 if size[0] == 299 else 3, 3, *size, generator=torch.Generator().manual_seed(6))
    ref = logits(copy.deepcopy(timm_model).double(), x.double())
    got, eager = logits(fused, x), logits(timm_model, x)
    assert_exact(got, eager, ref, f"timm legacy_xception {size}")
    assert torch.equal(got.argmax(1), ref.argmax(1))


def test_other_model_with_the_chain_and_nothing_else_touched():
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.stem = nn.Conv2d(3, 8, 3, padding=1)
            self.dw = nn.Conv2d(8, 8, 3, padding=1, groups=8, bias=False)
            self.pw = nn.Conv2d(8, 16, 1)  # with a bias, folded too
            self.bn = nn.BatchNorm2d(16)
            self.act = nn.ReLU()
            self.strided_dw = nn.Conv2d(16, 16, 3, stride=2, padding=1, groups=16, bias=False)
            self.head = nn.Conv2d(16, 4, 1)

        def forward(self, x):
            return self.head(self.strided_dw(self.act(self.bn(self.pw(self.dw(self.stem(x)))))))

    net = randomize_model_(Net(), seed=7).eval()
    fused, report = fused_copy(net)
    assert report.names == ["dw"]
    assert fused.stem is not net.stem and type(fused.stem) is nn.Conv2d and type(fused.strided_dw) is nn.Conv2d
    assert isinstance(fused.act, nn.Identity) and fused.dw.relu_output and not fused.dw.relu_input
    x = torch.randn(2, 3, 9, 11)
    assert_exact(logits(fused, x), logits(net, x), logits(copy.deepcopy(net).double(), x.double()))


def test_state_dict_round_trips_both_ways(ours):
    fused, _ = fused_copy(ours)
    assert list(fused.state_dict()) == list(ours.state_dict())
    other = randomize_model_(Xception(), seed=8).eval()
    fused.load_state_dict(other.state_dict())
    x = torch.randn(1, 3, 71, 71)
    assert_exact(logits(fused, x), logits(other, x), logits(copy.deepcopy(other).double(), x.double()))
    eager = Xception().eval()
    eager.load_state_dict(fused.state_dict())
    assert torch.equal(logits(eager, x), logits(other, x))


def test_whole_fused_model_saves_loads_and_copies():
    fused = Xception(num_classes=10, fused=True).eval()
    x = torch.randn(1, 3, 71, 71)
    buffer = io.BytesIO()
    torch.save(fused, buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=False)
    assert torch.equal(logits(loaded, x), logits(fused, x))
    # a copy's rewritten forward must run the copy's own modules
    other = randomize_model_(Xception(num_classes=10), seed=15).eval()
    copied = copy.deepcopy(fused)
    copied.load_state_dict(other.state_dict())
    assert_exact(logits(copied, x), logits(other, x), logits(copy.deepcopy(other).double(), x.double()))


def test_fold_is_redone_when_weights_change():
    fused, _ = fused_copy(randomize_model_(Xception(num_classes=10), seed=9).eval())
    x = torch.randn(1, 3, 71, 71)
    first = logits(fused, x)
    fused.train()
    loss = fused(torch.randn(2, 3, 71, 71)).square().mean()
    loss.backward()
    torch.optim.SGD(fused.parameters(), lr=0.1).step()
    fused.eval()
    after = logits(fused, x)
    eager = Xception(num_classes=10).eval()
    eager.load_state_dict(fused.state_dict())
    assert not torch.equal(first, after)
    assert_exact(after, logits(eager, x), logits(copy.deepcopy(eager).double(), x.double()), "after a step")


def test_train_step_matches_eager():
    torch.manual_seed(10)
    eager = randomize_model_(Xception(num_classes=5), seed=10).train()
    fused, _ = fused_copy(eager)
    reference = copy.deepcopy(eager).double()
    x = torch.randn(3, 3, 71, 71, generator=torch.Generator().manual_seed(11))
    target = torch.tensor([0, 3, 4])

    def step(model, inp):
        loss = nn.functional.cross_entropy(model(inp), target)
        loss.backward()
        torch.optim.SGD(model.parameters(), lr=0.01).step()
        return loss.detach()

    ref_loss, eager_loss, fused_loss = step(reference, x.double()), step(eager, x), step(fused, x)
    assert_exact(fused_loss, eager_loss, ref_loss.reshape(()), "loss")

    # The gradients, the updated parameters and the running statistics are each one result (all
    # of the model's tensors of that kind, flattened): per tensor, over some 300 of them at rounding
    # level, the rule would hold fused to whichever eager tensor happened to round luckiest.
    def flat(model, kind):
        tensors = (model.named_parameters() if kind != "buffers" else
                   ((n, b) for n, b in model.named_buffers() if b.is_floating_point()))
        pick = (lambda p: p.grad) if kind == "gradients" else (lambda p: p)
        return torch.cat([pick(t).detach().reshape(-1) for _, t in sorted(tensors, key=lambda item: item[0])])

    for kind in ("gradients", "parameters", "buffers"):
        assert_exact(flat(fused, kind), flat(eager, kind), flat(reference, kind), kind)
    counts = {n: b for n, b in fused.named_buffers() if not b.is_floating_point()}
    assert all(torch.equal(b, dict(reference.named_buffers())[n]) for n, b in counts.items())


def test_channels_last_and_autocast(ours):
    fused, _ = fused_copy(ours)
    x = torch.randn(2, 3, 75, 80)
    ref = logits(copy.deepcopy(ours).double(), x.double())
    cl_model = copy.deepcopy(fused).to(memory_format=torch.channels_last)
    eager_cl = copy.deepcopy(ours).to(memory_format=torch.channels_last)
    x_cl = x.contiguous(memory_format=torch.channels_last)
    assert_exact(logits(cl_model, x_cl), logits(eager_cl, x_cl), ref, "channels_last")
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got, eager = logits(fused, x_cl), logits(ours, x_cl)
    assert got.dtype == eager.dtype
    assert_exact(got.float(), eager.float(), ref, "autocast bf16")


def test_to_dtype_refolds(ours):
    fused, _ = fused_copy(ours)
    x = torch.randn(1, 3, 71, 71)
    logits(fused, x)
    fused_bf16, eager_bf16 = copy.deepcopy(fused).bfloat16(), copy.deepcopy(ours).bfloat16()
    ref = logits(copy.deepcopy(ours).double(), x.double())
    assert_exact(logits(fused_bf16, x.bfloat16()).float(), logits(eager_bf16, x.bfloat16()).float(), ref, "bf16")


def test_torch_compile_fullgraph_of_fused_model():
    model = randomize_model_(Xception(num_classes=10), seed=12).eval()
    fused, _ = fused_copy(model)
    x = torch.randn(1, 3, 71, 71)
    compiled = torch.compile(fused, fullgraph=True, backend="aot_eager")
    assert_exact(logits(compiled, x), logits(model, x), logits(copy.deepcopy(model).double(), x.double()))


def test_reference_backend_is_the_eager_two_step(ours):
    fused, _ = fused_copy(ours, backend="reference")
    x = torch.randn(1, 3, 71, 71)
    assert_exact(logits(fused, x), logits(ours, x), logits(copy.deepcopy(ours).double(), x.double()))


def test_fused_away_modules_keep_the_state():
    fused, _ = fused_copy(randomize_model_(Xception(), seed=13))
    bn = fused.middle_flow[0].bn2
    assert isinstance(bn, FusedAwayBatchNorm2d)
    assert fused.middle_flow[0].sepconv2.dconv.bn is bn


def test_fused_xception_in_one_line(ours):
    model = Xception(fused=True).eval()
    assert sum(isinstance(m, FusedSeparableConvBN) for m in model.modules()) == 34
    model.load_state_dict(ours.state_dict())
    x = torch.randn(1, 3, 71, 71)
    assert_exact(logits(model, x), logits(ours, x), logits(copy.deepcopy(ours).double(), x.double()))


def test_bad_arguments():
    with pytest.raises(TypeError, match="model must be an nn.Module"):
        xception_fast.fuse("xception")
    with pytest.raises(ValueError, match="backend must be one of"):
        xception_fast.fuse(Xception(), backend="fastest")


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["cuda", "triton"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_gpu_backends_whole_model(ours, backend, dtype):
    fused, _ = fused_copy(ours, backend=backend)
    fused = fused.cuda().to(dtype=dtype, memory_format=torch.channels_last)
    eager = copy.deepcopy(ours).cuda().to(dtype=dtype, memory_format=torch.channels_last)
    x = torch.randn(4, 3, 299, 299, generator=torch.Generator().manual_seed(14))
    ref = logits(copy.deepcopy(ours).double(), x.double())
    xd = x.cuda().to(dtype=dtype, memory_format=torch.channels_last)
    assert_exact(logits(fused, xd).float(), logits(eager, xd).float(), ref, f"{backend} {dtype}")
