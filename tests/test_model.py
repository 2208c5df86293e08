import pytest
import torch

import xception_fast
from xception_fast import Xception
from exactness import randomize_model_


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return Xception().eval()


def test_parameter_count_matches_paper(model):
    assert sum(p.numel() for p in model.parameters()) == 22_855_952


def test_conv_layer_counts(model):
    convs = [m for m in model.modules() if isinstance(m, torch.nn.Conv2d)]
    depthwise = [m for m in convs if m.groups > 1]
    shortcuts = [m for m in convs if m.kernel_size == (1, 1) and m.stride == (2, 2)]
    # 36 conv layers in the paper's count = 34 separable (depthwise + pointwise) + 2 stem convs;
    # the 4 shortcut projections are not counted there.
    assert len(depthwise) == 34
    assert len(convs) - len(shortcuts) - 34 == 34 + 2
    assert all(m.kernel_size == (3, 3) and m.groups == m.in_channels for m in depthwise)


def test_no_parameter_is_shared(model):
    seen = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        assert p.data_ptr() not in seen, f"{name} shares storage with {seen[p.data_ptr()]}"
        seen[p.data_ptr()] = name
    assert len(seen) == len(list(model.parameters()))


def test_stem_is_unpadded(model):
    assert model.entry_conv1[0].padding == (0, 0) and model.entry_conv2[0].padding == (0, 0)


@pytest.mark.parametrize("size, feature_hw", [((299, 299), (10, 10)), ((71, 71), (3, 3)), ((96, 131), (3, 4))])
def test_feature_and_logit_shapes(model, size, feature_hw):
    x = torch.randn(2, 3, *size)
    with torch.no_grad():
        features = model.forward_features(x)
        logits = model.forward_head(features)
    assert features.shape == (2, 2048, *feature_hw)
    assert logits.shape == (2, 1000)


def test_in_channels_num_classes_and_batch_one():
    m = Xception(in_channels=1, num_classes=7).eval()
    with torch.no_grad():
        assert m(torch.randn(1, 1, 71, 71)).shape == (1, 7)


def test_too_small_input_is_refused(model):
    with pytest.raises(ValueError, match="H, W >= 71"):
        model(torch.randn(1, 3, 70, 80))


def test_init_is_applied_on_construction():
    torch.manual_seed(0)
    m = Xception(num_classes=10)
    assert torch.count_nonzero(m.fc.bias) == 0
    assert m.fc.weight.std().item() == pytest.approx(0.01, rel=0.2)
    w = m.middle_flow[0].sepconv1.pconv.weight  # kaiming fan_out: std = sqrt(2 / Cout)
    assert w.std().item() == pytest.approx((2 / 728) ** 0.5, rel=0.1)


def test_train_forward_backward():
    torch.manual_seed(0)
    m = randomize_model_(Xception(num_classes=5)).train()
    x = torch.randn(2, 3, 71, 71, requires_grad=True)
    before = m.entry_block1.bn1.running_mean.clone()
    loss = torch.nn.functional.cross_entropy(m(x), torch.tensor([1, 3]))
    loss.backward()
    assert torch.isfinite(loss)
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in m.parameters())
    assert x.grad is not None and torch.isfinite(x.grad).all()
    assert not torch.equal(before, m.entry_block1.bn1.running_mean)


def test_forward_does_not_modify_input(model):
    x = torch.randn(1, 3, 71, 71)
    x0 = x.clone()
    with torch.no_grad():
        model(x)
    assert torch.equal(x, x0)


def test_package_exports():
    assert xception_fast.Xception is Xception
