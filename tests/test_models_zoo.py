"""Tests of the model zoo beyond the registry-wide ones in test_models.py: ONNX export parity for every
registered model, the shared layers, and the training helpers the papers need (triplet loss,
ten-crop, occlusion)."""

from __future__ import annotations

import math

import numpy as np
import onnxruntime as ort
import pytest
import torch
import torch.nn as nn

from mien.export.onnx_export import INPUT_NAME, OUTPUT_NAME, to_onnx
from mien.training.layers import EDSR, EDSR_PAPER, SpatialTransformer, SqueezeExcite
from mien.training.losses import batch_hard_triplet_loss
from mien.training.models import create_model, default_spec, list_models
from mien.training.occlusion import random_occlusion
from mien.training.tencrop import random_ten_crop, ten_crop, ten_crop_logits


def _perturb_stns(model: nn.Module) -> None:
    """Give every spatial transformer a non-identity, input-dependent warp so parity covers the sampler."""
    gen = torch.Generator().manual_seed(1)
    for module in model.modules():
        if isinstance(module, SpatialTransformer):
            with torch.no_grad():
                module.fc.weight.copy_(torch.randn(module.fc.weight.shape, generator=gen) * 0.01)
                module.fc.bias.add_(torch.tensor([-0.1, 0.05, 0.1, 0.05, 0.1, -0.05]))


@pytest.mark.parametrize("model_id", list_models())
def test_onnx_export_parity(model_id, tmp_path):
    torch.manual_seed(0)
    spec = default_spec(model_id)
    model = create_model(model_id, num_classes=spec.num_classes).eval()
    _perturb_stns(model)
    example = torch.randn(2, spec.channels, *spec.input_size)
    path = tmp_path / f"{model_id}.onnx"
    to_onnx(model, example, path, opset=20, metadata={**spec.to_metadata()})
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    assert session.get_modelmeta().custom_metadata_map == spec.to_metadata()
    for batch in (1, 5):
        x = torch.randn(batch, spec.channels, *spec.input_size) * 1.5
        with torch.no_grad():
            expected = model(x).numpy()
        got = session.run([OUTPUT_NAME], {INPUT_NAME: x.numpy()})[0]
        assert got.shape == (batch, spec.num_classes)
        assert np.abs(expected - got).max() <= 1e-4
        assert (expected.argmax(1) == got.argmax(1)).all()


def test_stn_starts_as_identity_and_learns_a_warp():
    stn = SpatialTransformer(in_channels=1, input_size=(48, 48))
    x = torch.randn(3, 1, 48, 48)
    torch.testing.assert_close(stn(x), x, atol=1e-4, rtol=1e-5)  # float rounding of the sampling grid
    assert stn.theta(x).shape == (3, 2, 3)
    with torch.no_grad():
        stn.fc.bias.copy_(torch.tensor([1.0, 0.0, 0.5, 0.0, 1.0, 0.0]))  # sample a quarter-width to the right
    shifted = stn.warp(torch.arange(48.0).expand(1, 1, 48, 48))
    torch.testing.assert_close(shifted[0, 0, :, :36], torch.arange(12.0, 48.0).expand(48, 36), atol=1e-4, rtol=0)


def test_stn_gets_gradients_through_the_sampler():
    stn = SpatialTransformer()
    stn(torch.randn(2, 1, 48, 48)).pow(2).sum().backward()
    assert stn.fc.bias.grad.abs().sum() > 0


def test_sr_doubles_the_size_without_batch_norm():
    sr = EDSR(in_channels=1)
    assert sr(torch.randn(2, 1, 24, 20)).shape == (2, 1, 48, 40)
    paper = EDSR(in_channels=1, **EDSR_PAPER)
    assert len(paper.body) == 16 + 1 and paper.head.out_channels == 128
    assert paper(torch.randn(1, 1, 8, 8)).shape == (1, 1, 16, 16)
    assert not any(isinstance(m, nn.BatchNorm2d) for m in paper.modules())


def test_se_keeps_the_shape_and_scales_whole_channels():
    se = SqueezeExcite(32, reduction=8)
    x = torch.rand(2, 32, 6, 5) + 0.1
    out = se(x)
    assert out.shape == x.shape
    ratio = out / x  # one gate in (0, 1) per sample and channel
    torch.testing.assert_close(ratio, ratio[..., :1, :1].expand_as(ratio))
    assert ((ratio > 0) & (ratio < 1)).all()


def test_triplet_loss_on_hand_made_embeddings():
    points = torch.tensor([[0.0, 0.0], [1.0, 0.0], [3.0, 0.0], [3.0, 1.0]])
    labels = torch.tensor([0, 0, 1, 1])
    # Hardest positive is 1 for every anchor; hardest negatives: 3, 2, 2, sqrt(5); anchor 0 is satisfied.
    expected = (0.0 + 0.5 + 0.5 + (1 - math.sqrt(5) + 1.5)) / 4
    loss = batch_hard_triplet_loss(points, labels, margin=1.5)
    assert loss.item() == pytest.approx(expected, abs=1e-5)
    # An anchor with no positive in the batch is left out.
    alone = batch_hard_triplet_loss(
        torch.cat([points, torch.tensor([[10.0, 10.0]])]), torch.tensor([0, 0, 1, 1, 2]), 1.5
    )
    assert alone.item() == pytest.approx(expected, abs=1e-5)
    assert batch_hard_triplet_loss(points, labels, margin=0.5).item() == 0.0  # every triplet satisfied


def test_triplet_loss_gradients_are_finite_with_duplicates_and_one_class():
    emb = torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0]], requires_grad=True)
    batch_hard_triplet_loss(emb, torch.tensor([0, 0, 1])).backward()
    assert torch.isfinite(emb.grad).all()
    one_class = torch.randn(4, 8, requires_grad=True)
    loss = batch_hard_triplet_loss(one_class, torch.zeros(4, dtype=torch.long))
    loss.backward()
    assert loss.item() == 0.0 and one_class.grad is not None


def test_triplet_model_embeds_on_the_unit_sphere():
    model = create_model("stn_resnet10_triplet").eval()
    x = torch.randn(3, 1, 48, 48)
    emb = model.embed(x)
    torch.testing.assert_close(emb.norm(dim=1), torch.ones(3))
    logits, emb_both = model.forward_both(x)
    torch.testing.assert_close(logits, model(x))
    torch.testing.assert_close(emb_both, emb)
    # ResNet-18 cut to ten weight layers: stem + 4 blocks × 2 convs + FC (1×1 shortcuts and the STN aside).
    stn = set(model.stn.modules())
    layers = [
        m
        for m in model.modules()
        if m not in stn and (isinstance(m, nn.Linear) or (isinstance(m, nn.Conv2d) and m.kernel_size != (1, 1)))
    ]
    assert len(layers) == 10 and layers[0].kernel_size == (7, 7) and layers[0].stride == (2, 2)


def test_the_ablation_shares_one_classifier():
    models = {m: create_model(m) for m in ("base_cnn", "stn_cnn", "sr_cnn", "stn_sr_cnn")}
    assert len({type(model.classifier) for model in models.values()}) == 1
    assert [model.stn is not None for model in models.values()] == [False, True, False, True]
    assert [model.sr is not None for model in models.values()] == [False, False, True, True]
    base = models["base_cnn"].classifier.state_dict()
    for model in models.values():  # the same weights fit every variant's classifier
        model.classifier.load_state_dict(base)
    assert models["stn_sr_cnn"].front(torch.randn(1, 1, 48, 48)).shape == (1, 1, 96, 96)


def test_sgan_discriminator_has_a_fake_class_and_a_generator():
    from mien.training.models.sgan import sgan_generator

    disc = create_model("sgan", num_classes=5).eval()
    fake = sgan_generator(noise_dim=16).eval().sample(3, generator=torch.Generator().manual_seed(0))
    assert fake.shape == (3, 1, 48, 48) and fake.abs().max() <= 1.0
    all_logits = disc.discriminate(fake)
    assert all_logits.shape == (3, 6)
    torch.testing.assert_close(disc(fake), all_logits[:, :5])


def test_dcnn_takes_ten_crop_sized_input():
    spec = default_spec("dcnn")
    assert spec.input_size == (42, 42)
    assert create_model("dcnn").eval()(torch.randn(2, 1, 42, 42)).shape == (2, 7)


def test_ten_crop_views_and_averaging():
    images = torch.arange(2 * 6 * 6, dtype=torch.uint8).view(2, 6, 6)
    views = ten_crop(images, 4)
    assert views.shape == (10, 2, 1, 4, 4) and views.dtype == torch.uint8
    x = images[:, None]
    expected = [x[..., :4, :4], x[..., :4, 2:], x[..., 2:, :4], x[..., 2:, 2:], x[..., 1:5, 1:5]]
    for i, crop in enumerate(expected):
        assert torch.equal(views[i], crop)
        assert torch.equal(views[i + 5], crop.flip(-1))

    picked = random_ten_crop(images, 4, generator=torch.Generator().manual_seed(0))
    assert picked.shape == (2, 1, 4, 4)
    assert all(any(torch.equal(picked[n], views[v, n]) for v in range(10)) for n in range(2))

    model = nn.Sequential(nn.Flatten(), nn.Linear(16, 3))
    floats = torch.randn(2, 1, 6, 6)
    manual = torch.stack([model(view) for view in ten_crop(floats, 4)]).mean(0)
    torch.testing.assert_close(ten_crop_logits(model, floats, 4), manual)
    with pytest.raises(ValueError, match="larger"):
        ten_crop(images, 7)


@pytest.mark.parametrize("shape", [(4, 48, 48), (4, 3, 48, 48)])
def test_occlusion_covers_the_area_fraction_with_grey(shape):
    images = torch.zeros(shape, dtype=torch.uint8)
    occluded = random_occlusion(images, area_fraction=0.25, value=128, generator=torch.Generator().manual_seed(0))
    assert images.eq(0).all()  # the input is left alone
    grey = occluded.eq(128)
    assert occluded[~grey].eq(0).all()
    per_image = grey.reshape(shape[0], -1, 48, 48)
    assert (per_image == per_image[:, :1]).all()  # every channel occluded at the same place
    for mask in per_image[:, 0]:
        assert mask.sum().item() == 0.25 * 48 * 48
        rows, cols = mask.any(1).nonzero(), mask.any(0).nonzero()
        assert rows.max() - rows.min() + 1 == 24 and cols.max() - cols.min() + 1 == 24  # one 24×24 square
    positions = {tuple(m.nonzero()[0].tolist()) for m in per_image[:, 0]}
    assert len(positions) > 1  # random places


def test_occlusion_on_normalised_floats():
    images = torch.ones(2, 1, 40, 40)
    out = random_occlusion(images, area_fraction=0.1, value=0.0)
    side = round(math.sqrt(0.1 * 1600))
    assert out.eq(0.0).sum(dim=(1, 2, 3)).tolist() == [side * side] * 2
    with pytest.raises(ValueError):
        random_occlusion(images, area_fraction=1.5)
