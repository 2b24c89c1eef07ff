"""Registry-wide tests: every registered model gets them."""

import pytest
import torch

from mien.training.models import create_model, default_spec, list_models


def test_unknown_model_lists_known_ids():
    with pytest.raises(KeyError, match="known model ids: .*mini_xception"):
        create_model("nope")


@pytest.mark.parametrize("model_id", list_models())
def test_forward_backward_shapes_and_finite(model_id):
    spec = default_spec(model_id)
    model = create_model(model_id, num_classes=spec.num_classes)
    x = torch.randn(4, spec.channels, *spec.input_size)
    logits = model(x)
    assert logits.shape == (4, spec.num_classes)
    loss = torch.nn.functional.cross_entropy(logits, torch.tensor([0, 1, 2, 3]))
    loss.backward()
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    assert torch.isfinite(logits).all()


@pytest.mark.parametrize("model_id", list_models())
def test_other_label_sets(model_id):
    spec = default_spec(model_id, labels=("angry", "sad", "happy", "fear", "neutral"))
    model = create_model(model_id, num_classes=spec.num_classes)
    assert model(torch.randn(2, spec.channels, *spec.input_size)).shape == (2, 5)


def test_mini_xception_matches_the_paper():
    model = create_model("mini_xception")
    params = sum(p.numel() for p in model.parameters())
    assert 50_000 <= params <= 65_000  # the paper: about 60,000
    assert not any(isinstance(m, torch.nn.Linear) for m in model.modules())  # no fully connected layer
    separable = [m for m in model.modules() if type(m).__name__ == "SeparableConv2d"]
    assert [m.pointwise.out_channels for m in separable] == [16, 16, 32, 32, 64, 64, 128, 128]
