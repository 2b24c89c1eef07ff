"""The per-model training objectives (training/objectives.py) and SR pre-training, on tiny generated data:
every registered model trains one epoch and comes back from best.pt; the triplet batches are balanced;
the DCNN reports both validation protocols; SGAN resumes exactly; SR pre-training learns."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

import mien.training.train as train_module
from mien.training.checkpoint import load_model
from mien.training.config import ObjectiveConfig
from mien.training.data import load_dataset
from mien.training.layers import EDSR
from mien.training.losses import sgan_discriminator_loss
from mien.training.models import create_model, default_spec, list_models
from mien.training.objectives import OBJECTIVES, CrossEntropy, TripletObjective, build_objective
from mien.training.sampling import balanced_batches
from mien.training.sr_pretrain import SRPretrainConfig, downscale, pretrain_sr, sr_l1
from mien.training.train import TrainConfig, train
from mien.training.transforms import normalize
from tests.conftest import write_npz


@pytest.fixture(scope="module")
def small_npz(tmp_path_factory):
    """7 × 6 training and 7 × 2 validation faces: one epoch is 3 steps of 14 (2 per class when balanced)."""
    return write_npz(tmp_path_factory.mktemp("small") / "small.npz", train_per_class=6, test_per_class=2)


def _cfg(data, out, **kw) -> TrainConfig:
    base = dict(data=str(data), out=str(out), epochs=1, batch_size=14, warmup_epochs=0, threads=1,
                objective=ObjectiveConfig(triplet_per_class=2))  # fmt: skip
    return TrainConfig(**{**base, **kw})


def _history(out) -> list[dict]:
    return [json.loads(line) for line in (out / "history.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("model_id", list_models())
def test_every_model_trains_an_epoch_and_reloads(tmp_path, small_npz, model_id):
    best = train(_cfg(small_npz, tmp_path, model=model_id))
    model, spec, ckpt = load_model(tmp_path / "best.pt")
    assert ckpt["model_id"] == model_id and ckpt["objective"] == OBJECTIVES.get(model_id, CrossEntropy).name
    assert 0.0 <= best["val_acc"] <= 1.0 and torch.isfinite(torch.tensor(_history(tmp_path)[0]["train_loss"]))
    x = torch.zeros(2, spec.channels, *spec.input_size)
    with torch.no_grad():
        assert model(x).shape == (2, 7)


def test_triplet_batches_are_class_balanced_and_reproducible():
    labels = torch.tensor([0] * 30 + [1] * 5 + [2] * 12 + [3] * 40)  # imbalanced, like FER2013's disgust
    batches = balanced_batches(labels, batch_size=12, per_class=4, generator=torch.Generator().manual_seed(0))
    assert len(batches) == len(labels) // 12
    for idx in batches:
        counts = torch.bincount(labels[idx], minlength=4)
        assert len(idx) == 12 and sorted(counts.tolist()) == [0, 4, 4, 4]  # P = 3 classes × K = 4
        assert len(set(idx.tolist())) == 12  # no face twice in one batch
    again = balanced_batches(labels, batch_size=12, per_class=4, generator=torch.Generator().manual_seed(0))
    assert all(torch.equal(a, b) for a, b in zip(batches, again, strict=True))
    with pytest.raises(ValueError, match="needs ≥ 2 classes"):
        balanced_batches(labels, batch_size=6, per_class=4, generator=torch.Generator())


def test_triplet_objective_occludes_and_adds_the_triplet_term():
    occlude_all = ObjectiveConfig(occlusion_prob=1.0, occlusion_area=0.25, triplet_weight=0.0)
    cfg = TrainConfig(model="stn_resnet10_triplet", channels_last=False, objective=occlude_all)
    spec = default_spec(cfg.model)
    model = create_model(cfg.model).eval()
    objective = build_objective(cfg, spec, model, torch.Generator().manual_seed(0))
    assert isinstance(objective, TripletObjective)
    images = torch.full((4, 48, 48), 255, dtype=torch.uint8)  # white faces: a grey patch is easy to find
    x = objective.inputs(images)
    grey = (128 / 255 - 0.5) / 0.5
    assert all(((x[i] - grey).abs() < 1e-6).sum() >= 0.2 * 48 * 48 for i in range(4))
    y = torch.tensor([0, 0, 1, 1])
    without, _ = objective.loss(model, x, y)
    objective.cfg = TrainConfig(model=cfg.model, objective=ObjectiveConfig(triplet_weight=1.0, triplet_margin=5.0))
    with_triplet, _ = objective.loss(model, x, y)
    assert with_triplet > without + 1.0  # margin 5 exceeds any unit-sphere distance: the term is active


def test_dcnn_trains_on_crops_and_reports_both_protocols(tmp_path, small_npz):
    train(_cfg(small_npz, tmp_path, model="dcnn"))
    row = _history(tmp_path)[0]
    assert 0.0 <= row["val_acc_tencrop"] <= 1.0 and "val_acc" in row
    _, _, ckpt = load_model(tmp_path / "best.pt")
    assert "ten" in ckpt["notes"] and ckpt["metrics"]["val_acc"] == row["val_acc"]
    objective = build_objective(TrainConfig(model="dcnn"), default_spec("dcnn"), None, torch.Generator())
    assert objective.inputs(torch.zeros(3, 48, 48, dtype=torch.uint8)).shape == (3, 1, 42, 42)


def test_sgan_losses_match_the_k_plus_one_softmax():
    real, fake, y = torch.randn(5, 8), torch.randn(5, 8), torch.randint(0, 7, (5,))
    p_real, p_fake = real.softmax(1), fake.softmax(1)
    expected = F.cross_entropy(real[:, :7], y) - torch.log(1 - p_real[:, 7]).mean() - torch.log(p_fake[:, 7]).mean()
    torch.testing.assert_close(sgan_discriminator_loss(real, fake, y, 0.0, 1.0), expected)


def test_sgan_generated_batches_leave_the_running_statistics_alone():
    from mien.training.models.sgan import real_stats_only

    disc = create_model("sgan", num_classes=3, widths=(4, 8)).train()
    norm = next(m for m in disc.modules() if isinstance(m, torch.nn.BatchNorm2d))
    before = norm.running_mean.clone()
    with real_stats_only(disc):
        disc.discriminate(torch.randn(4, 1, 48, 48) + 3.0)
    torch.testing.assert_close(norm.running_mean, before)  # a generated batch: statistics untouched
    assert norm.momentum == 0.1  # and the momentum is back
    disc.discriminate(torch.randn(4, 1, 48, 48) + 3.0)
    assert not torch.allclose(norm.running_mean, before)  # a real batch moves them


def test_sgan_discriminator_refuses_an_unknown_norm():
    with pytest.raises(ValueError, match="norm must be one of"):
        create_model("sgan", norm="layer")


def test_sgan_resume_is_exact(tmp_path, small_npz, monkeypatch):
    cfg = dict(model="sgan", epochs=2, limit=28)
    train(_cfg(small_npz, tmp_path / "straight", **cfg))

    real_epoch = train_module.train_one_epoch
    calls = {"n": 0}

    def interrupted(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt
        return real_epoch(*args, **kwargs)

    monkeypatch.setattr(train_module, "train_one_epoch", interrupted)
    with pytest.raises(KeyboardInterrupt):
        train(_cfg(small_npz, tmp_path / "resumed", **cfg))
    monkeypatch.setattr(train_module, "train_one_epoch", real_epoch)
    train(_cfg(small_npz, tmp_path / "resumed", **cfg))

    a = torch.load(tmp_path / "straight" / "last.pt", weights_only=False)
    b = torch.load(tmp_path / "resumed" / "last.pt", weights_only=False)
    assert [h["epoch"] for h in b["history"]] == [1, 2]
    for key, tensor in a["state_dict"].items():
        torch.testing.assert_close(tensor, b["state_dict"][key], rtol=0, atol=1e-6, msg=key)
    for key, tensor in a["objective_state"]["generator"].items():
        torch.testing.assert_close(tensor, b["objective_state"]["generator"][key], rtol=0, atol=1e-6, msg=key)
    assert not any(k.startswith("gen") for k in a["state_dict"])  # best/last hold the discriminator only


def test_sr_pretraining_reduces_l1_and_initialises_a_frozen_front_end(tmp_path, small_npz):
    sr_kwargs = {"num_blocks": 1, "features": 8}
    sr_npz = write_npz(tmp_path / "sr.npz", train_per_class=16, test_per_class=2)
    val = normalize(torch.from_numpy(load_dataset(sr_npz).subset("public_test")[0]), default_spec("sr_cnn"))
    torch.manual_seed(0)
    before, _ = sr_l1(EDSR(1, **sr_kwargs), val)  # the same initial weights pretrain_sr starts from
    metrics = pretrain_sr(SRPretrainConfig(data=str(sr_npz), out=str(tmp_path / "sr.pt"), sr_kwargs=sr_kwargs,
                                           epochs=3, batch_size=16, lr=3e-3, threads=1))  # fmt: skip
    assert metrics["val_l1"] < 0.7 * before
    assert downscale(torch.zeros(1, 1, 48, 48)).shape == (1, 1, 24, 24)

    sr_state = torch.load(tmp_path / "sr.pt", weights_only=False)["state_dict"]
    train(_cfg(small_npz, tmp_path / "run", model="sr_cnn", sr_init=str(tmp_path / "sr.pt"), freeze_sr=True))
    model, _, ckpt = load_model(tmp_path / "run" / "best.pt")
    assert ckpt["model_kwargs"]["sr_kwargs"] == {**sr_kwargs, "res_scale": 0.1, "scale": 2}
    for key, tensor in sr_state.items():  # frozen: the classifier trained around it
        torch.testing.assert_close(model.sr.state_dict()[key], tensor, rtol=0, atol=0, msg=key)


def test_model_kwargs_travel_into_the_checkpoint(tmp_path, small_npz):
    kwargs = {"sr_kwargs": {"num_blocks": 2, "features": 8}, "hidden": 32}
    train(_cfg(small_npz, tmp_path, model="stn_sr_cnn", model_kwargs=kwargs))
    model, _, ckpt = load_model(tmp_path / "best.pt")
    sr_kwargs = {"num_blocks": 2, "features": 8, "res_scale": 0.1, "scale": 2}
    assert ckpt["model_kwargs"] == {"num_classes": 7, "hidden": 32, "sr_kwargs": sr_kwargs}
    assert len(model.sr.body) == 3 and model.classifier.head[1].out_features == 32


def test_sr_options_refuse_what_cannot_work(tmp_path, small_npz):
    with pytest.raises(ValueError, match="need a model with an SR front end"):
        train(_cfg(small_npz, tmp_path / "a", model="base_cnn", freeze_sr=True))
    with pytest.raises(ValueError, match="would freeze a random SR network"):
        train(_cfg(small_npz, tmp_path / "b", model="sr_cnn", freeze_sr=True))
    with pytest.raises(FileNotFoundError, match="no such SR checkpoint"):
        train(_cfg(small_npz, tmp_path / "c", model="sr_cnn", sr_init=str(tmp_path / "missing.pt")))
