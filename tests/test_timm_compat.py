import pytest
import torch

from xception_fast import Xception, convert_timm_state_dict, convert_to_timm_state_dict
from exactness import randomize_model_

timm = pytest.importorskip("timm")


@pytest.fixture(scope="module")
def timm_model():
    return randomize_model_(timm.create_model("legacy_xception", pretrained=False), seed=1).eval()


def test_same_parameter_count(timm_model):
    assert sum(p.numel() for p in timm_model.parameters()) == 22_855_952


def test_state_dict_maps_onto_our_model_and_back(timm_model):
    ours = Xception()
    converted = convert_timm_state_dict(timm_model.state_dict())
    ours.load_state_dict(converted, strict=True)
    back = convert_to_timm_state_dict(ours.state_dict())
    reference = timm_model.state_dict()
    assert list(back) == list(reference)
    assert all(torch.equal(back[k], reference[k]) for k in reference)


@pytest.mark.parametrize("size", [(299, 299), (71, 99)])
def test_same_logits(timm_model, size):
    ours = Xception().eval()
    ours.load_state_dict(convert_timm_state_dict(timm_model.state_dict()))
    x = torch.randn(2, 3, *size, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        expected = timm_model(x)
        got = ours(x)
    assert (got - expected).abs().max().item() <= 1e-5 * expected.abs().max().item()


def test_unknown_key_is_named():
    with pytest.raises(KeyError, match="block99.rep.1.conv1.weight"):
        convert_timm_state_dict({"block99.rep.1.conv1.weight": torch.zeros(1)})
