"""Issue 17's STN front end and the ablation: the STN starts at the identity and its regulariser keeps it there
unless moving pays; each front end trains at its own scaled learning rate; the four ablation arms differ only in
their front end. Tiny data and a few steps only."""

from __future__ import annotations

import json
import math
from dataclasses import asdict, replace
from pathlib import Path

import pytest
import torch
import torch.nn as nn

from mien.spec import FER2013_LABELS
from mien.training.config import TrainConfig
from mien.training.data import load_dataset
from mien.training.hardware import Process
from mien.training.layers import EDSR, SpatialTransformer
from mien.training.layers.stn import affine_stats, identity_penalty, recorded_thetas
from mien.training.models import create_model, default_spec
from mien.training.models.base_cnn import ABLATION_ARMS, ablation_arms, ablation_model_kwargs
from mien.training.objectives import CrossEntropy, build_objective, param_groups
from mien.training.recipe import config_from_dict, load_recipe
from mien.training.schedule import get_lr
from mien.training.support import check_supported
from mien.training.train import build_model, seed_everything, train
from mien.training.transforms import normalize
from tests.conftest import train_interrupted, write_npz

SMALL = {"widths": (8, 16, 16, 32), "hidden": 16}
IDENTITY = torch.tensor([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]])


@pytest.fixture(scope="module")
def small_npz(tmp_path_factory):
    return write_npz(tmp_path_factory.mktemp("stn_sr") / "small.npz", train_per_class=10, test_per_class=3)


def _warp(scale: float, degrees: float, tx: float = 0.0, ty: float = 0.0) -> torch.Tensor:
    c, s = math.cos(math.radians(degrees)), math.sin(math.radians(degrees))
    return torch.tensor([[scale * c, -scale * s, tx], [scale * s, scale * c, ty]])


# --- the STN: identity start, regulariser, statistics ------------------------------------------------------------


def test_an_untrained_stn_is_the_identity_alone_and_in_front_of_stn_cnn():
    torch.manual_seed(0)
    x = torch.randn(4, 1, 48, 48)
    stn = SpatialTransformer(1, (48, 48))
    with torch.no_grad():
        torch.testing.assert_close(stn.theta(x), IDENTITY.expand(4, 2, 3))
        torch.testing.assert_close(stn(x), x, atol=1e-4, rtol=0)  # float rounding of the grid
        model = create_model("stn_cnn", **SMALL).eval()
        torch.testing.assert_close(model.front(x), x, atol=1e-4, rtol=0)
        # so an untrained stn_cnn classifies exactly as its own classifier does without the STN
        torch.testing.assert_close(model(x), model.classifier(x), atol=1e-4, rtol=1e-4)


def test_the_identity_penalty_is_zero_at_identity_and_grows_with_distance():
    assert identity_penalty(IDENTITY.expand(3, 2, 3)).item() == 0.0
    offsets = [0.01, 0.1, 0.5, 1.0]
    penalties = [identity_penalty((IDENTITY + eps).unsqueeze(0)).item() for eps in offsets]
    assert penalties == pytest.approx([6 * eps**2 for eps in offsets])  # six entries, each eps away
    assert penalties == sorted(penalties)
    # the batch mean: one face at the identity and one eps away give half the penalty of the second alone
    pair = torch.stack([IDENTITY, IDENTITY + 0.1])
    assert identity_penalty(pair).item() == pytest.approx(0.5 * penalties[1])


def test_the_penalty_gradient_pulls_theta_back_to_the_identity():
    torch.manual_seed(0)
    theta = (IDENTITY + 0.3 * torch.randn(5, 2, 3)).requires_grad_()
    identity_penalty(theta).backward()
    torch.testing.assert_close(theta.grad, 2 * (theta.detach() - IDENTITY) / 5)
    with torch.no_grad():  # a gradient step moves every matrix toward the identity
        stepped = theta - 0.5 * theta.grad
    before = (theta.detach() - IDENTITY).pow(2).sum((1, 2))
    after = (stepped - IDENTITY).pow(2).sum((1, 2))
    assert (after < before).all()


LR = 0.01
#: A warp far from the identity (zoom 0.6, shifted): mean ‖θ − I‖² = 0.4 on every face.
DISPLACED = [0.6, 0.0, 0.2, 0.0, 0.6, -0.2]


def _theta_distance_after_steps(npz, stn_reg: float, steps: int = 6) -> float:
    """Mean ‖θ − I‖² on the batch after a few plain SGD steps of stn_cnn's objective with ``stn_reg``, starting
    from :data:`DISPLACED`. Plain SGD: a step proportional to the gradient (Adam would scale every step to about
    its learning rate, whatever the weight), so the regulariser's pull, 2 · weight · (θ − I), shows as such."""
    cfg = TrainConfig(data=str(npz), model="stn_cnn", batch_size=32, stn_reg=stn_reg, channels_last=False)
    torch.manual_seed(0)
    model = create_model("stn_cnn", **SMALL)
    with torch.no_grad():
        model.stn.fc.weight.zero_()
        model.stn.fc.bias.copy_(torch.tensor(DISPLACED))
    generator = torch.Generator().manual_seed(0)
    objective = build_objective(cfg, default_spec("stn_cnn"), model, generator)
    optimizer = torch.optim.SGD(model.parameters(), lr=LR)
    data = load_dataset(npz)
    images, labels = (torch.from_numpy(a[:32]) for a in data.subset("train"))
    model.train()
    for _ in range(steps):
        objective.train_step(model, optimizer, images, labels)
    with torch.no_grad():
        x = normalize(images, default_spec("stn_cnn"))
        return identity_penalty(model.stn.theta(x)).item()


def test_the_regulariser_pulls_a_displaced_warp_back_and_none_leaves_it(small_npz):
    start = sum((d - i) ** 2 for d, i in zip(DISPLACED, [1, 0, 0, 0, 1, 0], strict=True))  # 0.4
    free = _theta_distance_after_steps(small_npz, stn_reg=0.0)
    held = _theta_distance_after_steps(small_npz, stn_reg=25.0)  # lr · 2 · weight = 0.5: halves θ − I per step
    assert free > 0.5 * start, "without the regulariser nothing brings the warp back to the identity"
    assert held < 0.1 * start and held < 0.1 * free, (held, free)


def test_the_penalty_is_logged_in_the_history_and_has_no_effect_without_an_stn(tmp_path, small_npz):
    common = dict(data=str(small_npz), epochs=1, batch_size=14, warmup_epochs=0, threads=1, model_kwargs=SMALL)
    train(TrainConfig(**common, model="stn_cnn", out=str(tmp_path / "stn"), stn_reg=0.01))  # the ablation's weight
    row = json.loads((tmp_path / "stn" / "history.jsonl").read_text().splitlines()[0])
    assert row["stn_penalty"] >= 0 and 0.5 < row["stn_scale"] < 1.5
    assert {"stn_rotation_deg", "stn_translation"} <= set(row)
    # a model without a spatial transformer trains exactly alike whatever stn_reg says
    for reg in (0.0, 10.0):
        train(TrainConfig(**common, model="base_cnn", out=str(tmp_path / f"base{reg}"), stn_reg=reg))
    a, b = (json.loads((tmp_path / f"base{reg}" / "history.jsonl").read_text()) for reg in (0.0, 10.0))
    assert not any(k.startswith("stn_") for k in a)
    assert a["train_loss"] == b["train_loss"] and a["val_loss"] == b["val_loss"]


def test_recorded_thetas_leaves_no_hook_behind():
    model = create_model("stn_cnn", **SMALL)
    with recorded_thetas(model) as thetas:
        model(torch.zeros(2, 1, 48, 48))
    assert len(thetas) == 1 and thetas[0].shape == (2, 2, 3)
    assert not model.stn.fc._forward_hooks
    with recorded_thetas(model, enabled=False) as none:
        model(torch.zeros(2, 1, 48, 48))
    assert none == []


def test_affine_stats_reads_scale_rotation_and_shift():
    stats = affine_stats(IDENTITY.expand(10, 2, 3))
    assert stats["scale"] == pytest.approx(1.0) and stats["rotation_deg"] == pytest.approx(0.0)
    assert stats["translation"] == pytest.approx(0.0) and stats["scale_std"] == pytest.approx(0.0)
    assert stats["faces"] == 10 and stats["det_negative"] == 0.0
    warps = torch.stack([_warp(0.8, 10, 0.3, 0.4), _warp(0.6, 30, 0.0, 0.0)])
    stats = affine_stats(warps)
    assert stats["scale"] == pytest.approx(0.7) and stats["scale_std"] == pytest.approx(0.1)
    assert stats["rotation_deg"] == pytest.approx(20.0) and stats["rotation_deg_std"] == pytest.approx(10.0)
    assert stats["translation"] == pytest.approx(0.25)
    assert affine_stats(warps.numpy()) == stats  # numpy in, the same figures
    mirrored = torch.tensor([[[-1.0, 0.0, 0.0], [0.0, 1.0, 0.0]]])
    assert affine_stats(mirrored)["det_negative"] == 1.0


# --- the front ends' learning-rate scales ------------------------------------------------------------------------

SCALED = dict(model="stn_sr_cnn", model_kwargs={**SMALL, "sr_kwargs": {"num_blocks": 1, "features": 8}},
              optimizer="sgd", lr=0.05, stn_lr_scale=0.1, sr_lr_scale=0.5, stn_reg=0.01)  # fmt: skip


def _ids(params) -> list[int]:
    return [id(p) for p in params]


@pytest.mark.parametrize("model_id", ["stn_sr_cnn", "stn_resnet10_triplet", "sgan"])
def test_each_front_end_is_a_parameter_group_at_its_scaled_rate_and_every_other_parameter_is_in_the_first(model_id):
    spec = default_spec(model_id)
    torch.manual_seed(0)
    model = create_model(model_id, **(SCALED["model_kwargs"] if model_id == "stn_sr_cnn" else {}))
    owners = {"stn": SpatialTransformer, "sr": EDSR}
    wanted = {name: {id(p) for m in model.modules() if isinstance(m, kind) for p in m.parameters()}
              for name, kind in owners.items()}  # fmt: skip
    cfg = TrainConfig(**{**SCALED, "model": model_id, "model_kwargs": {}})
    groups = build_objective(cfg, spec, model, torch.Generator()).build_optimizer(model).param_groups
    names = [g["name"] for g in groups]
    assert names == ["main"] + [n for n in owners if wanted[n]], model_id  # the base rate's group first
    listed = [i for g in groups for i in _ids(g["params"])]
    assert sorted(listed) == sorted(_ids(model.parameters())) and len(set(listed)) == len(listed)  # all, once
    for group in groups:
        scale = {"main": 1.0, "stn": 0.1, "sr": 0.5}[group["name"]]
        assert (group["lr_scale"], group["lr"]) == (scale, pytest.approx(0.05 * scale))
        if group["name"] != "main":
            assert set(_ids(group["params"])) == wanted[group["name"]]
    assert not set(_ids(groups[0]["params"])) & (wanted["stn"] | wanted["sr"])

    # the defaults (1.0): the one group every run had before the scales, in the model's order
    default = param_groups(model, replace(cfg, stn_lr_scale=1.0, sr_lr_scale=1.0))
    assert len(default) == 1 and _ids(default[0]["params"]) == _ids(model.parameters())
    if wanted["sr"]:  # a frozen front end stays out of every group
        model.sr.requires_grad_(False)
        frozen = param_groups(model, cfg)
        assert [g["name"] for g in frozen] == ["main", "stn"]
        assert not {i for g in frozen for i in _ids(g["params"])} & wanted["sr"]
        with pytest.raises(ValueError, match="must be positive"):
            check_supported(
                replace(cfg, sr_lr_scale=0.0), build_objective(cfg, spec, model, torch.Generator()), Process(), False
            )


def test_the_schedule_keeps_each_groups_ratio_through_warm_up_and_cosine_and_resume_is_exact(
    tmp_path, small_npz, monkeypatch
):
    common = dict(data=str(small_npz), epochs=4, batch_size=14, warmup_epochs=1, threads=1, **SCALED)
    rates = []
    real_step = CrossEntropy.train_step

    def recording_step(self, model, optimizer, images, y):
        rates.append([(g["lr"], g["lr_scale"]) for g in optimizer.param_groups])
        return real_step(self, model, optimizer, images, y)

    monkeypatch.setattr(CrossEntropy, "train_step", recording_step)
    straight = tmp_path / "straight"
    train(TrainConfig(**common, out=str(straight)))
    steps_per_epoch = len(rates) // 4
    cfg = TrainConfig(**common)
    for step, groups in enumerate(rates):
        assert [scale for _, scale in groups] == [1.0, 0.1, 0.5]
        assert [lr for lr, _ in groups] == pytest.approx(
            [get_lr(cfg, step, steps_per_epoch) * s for s in (1, 0.1, 0.5)]
        )
    assert rates[steps_per_epoch - 1][0][0] == pytest.approx(0.05)  # the warm-up's end, then the cosine decay
    assert rates[-1][0][0] < 0.5 * 0.05

    halves = tmp_path / "halves"
    train_interrupted(TrainConfig(**common, out=str(halves)), 2, monkeypatch)
    with pytest.raises(ValueError, match=r"scales \[1.0, 0.1, 0.5\]; this run asks \[1.0, 0.1\]"):
        train(TrainConfig(**{**common, "sr_lr_scale": 1.0}, out=str(halves)))  # another recipe: refused
    train(TrainConfig(**common, out=str(halves)))
    a, b = (torch.load(run / "last.pt", weights_only=False) for run in (straight, halves))
    assert [h["epoch"] for h in b["history"]] == [1, 2, 3, 4]
    for key, tensor in a["state_dict"].items():
        torch.testing.assert_close(tensor, b["state_dict"][key], rtol=0, atol=0, msg=key)
    assert [g["lr_scale"] for g in b["optimizer"]["param_groups"]] == [1.0, 0.1, 0.5]


def test_a_last_pt_from_before_the_scales_resumes_exactly(tmp_path, small_npz, monkeypatch):
    common = dict(data=str(small_npz), epochs=2, batch_size=14, warmup_epochs=1, threads=1, model="stn_cnn",
                  model_kwargs=SMALL, out=str(tmp_path / "run"))  # fmt: skip
    train_interrupted(TrainConfig(**common), 1, monkeypatch)
    last = tmp_path / "run" / "last.pt"
    state = torch.load(last, weights_only=False)
    for group in state["optimizer"]["param_groups"]:  # as written before the option existed
        del group["lr_scale"], group["name"]
    torch.save(state, last)
    train(TrainConfig(**common))
    train(TrainConfig(**{**common, "out": str(tmp_path / "straight")}))
    a, b = (torch.load(tmp_path / run / "last.pt", weights_only=False) for run in ("straight", "run"))
    assert [h["epoch"] for h in b["history"]] == [1, 2]
    for key, tensor in a["state_dict"].items():
        torch.testing.assert_close(tensor, b["state_dict"][key], rtol=0, atol=0, msg=key)


# --- the ablation arms differ only in their front end ------------------------------------------------------------


def _layers(module: nn.Module) -> list[tuple[str, str, list[tuple[int, ...]]]]:
    return [(name, type(m).__name__, [tuple(p.shape) for p in m.parameters(recurse=False)])
            for name, m in module.named_modules()]  # fmt: skip


@pytest.mark.parametrize(
    "kwargs",
    [{}, {"widths": (8, 16, 16, 32), "hidden": 16, "sr_blocks": 2, "sr_features": 8}],
    ids=["default width", "narrow"],
)
def test_the_four_arms_share_one_classifier_and_differ_in_their_front_end_only(kwargs):
    arms = ablation_arms(**kwargs)
    assert list(arms) == list(ABLATION_ARMS) == ["base_cnn", "stn_cnn", "sr_cnn", "stn_sr_cnn"]
    base = arms["base_cnn"].classifier
    for model_id, model in arms.items():
        stn, sr = ABLATION_ARMS[model_id]
        assert (model.stn is not None, model.sr is not None) == (stn, sr), model_id
        clf = model.classifier
        # the same layers with the same parameter shapes, and the same number of parameters
        assert _layers(clf.features) == _layers(base.features), model_id
        assert _layers(clf.head) == _layers(base.head), model_id
        assert sum(p.numel() for p in clf.parameters()) == sum(p.numel() for p in base.parameters())
        # the only classifier difference: the SR arms' parameter-free 2×2 pool back to 3×3 maps (96 → 48 input)
        assert not list(clf.pool.parameters())
        assert type(clf.pool).__name__ == ("AvgPool2d" if sr else "Identity")
        for key, tensor in base.state_dict().items():  # same_init: the same starting weights
            torch.testing.assert_close(clf.state_dict()[key], tensor, rtol=0, atol=0)
        # the front end is all the rest
        own = sum(p.numel() for p in model.parameters()) - sum(p.numel() for p in clf.parameters())
        front = sum(p.numel() for part in (model.stn, model.sr) if part is not None for p in part.parameters())
        assert own == front
        # and the arm is what `mien train --model <id> --model-kwargs ...` builds
        built = create_model(model_id, **ablation_model_kwargs(**kwargs)[model_id])
        assert _layers(built) == _layers(model), model_id
        with torch.no_grad():
            assert model.eval()(torch.zeros(2, 1, 48, 48)).shape == (2, 7)
    sr_sizes = {m.sr.kwargs["num_blocks"] for m in arms.values() if m.sr is not None}
    assert sr_sizes == {kwargs.get("sr_blocks", 4)}


def test_same_classifier_init_gives_every_arm_the_classifier_base_cnn_starts_from():
    def classifiers(**kwargs):
        states = []
        for model_id in ABLATION_ARMS:
            torch.manual_seed(7)
            states.append(create_model(model_id, **SMALL, **kwargs).classifier.state_dict())
        return states

    def same(a, b):
        return all(torch.equal(a[k], b[k]) for k in a)

    base, *others = classifiers(same_classifier_init=True)
    assert all(same(base, other) for other in others)
    default = classifiers()  # off by default: a front end drawn first changes the classifier's start...
    assert same(default[0], base) and not any(same(default[0], other) for other in default[1:])
    torch.manual_seed(7)  # ...and a model built before the option keeps its exact initialisation
    a = create_model("stn_sr_cnn", **SMALL).state_dict()
    torch.manual_seed(7)
    b = create_model("stn_sr_cnn", **SMALL, same_classifier_init=False).state_dict()
    assert list(a) == list(b) and same(a, b)


#: The STN's learning-rate scale and the SR front end's joint epochs the ablation's recipes chose (docs/training.md).
STN_LR_SCALE, SR_FINETUNE_EPOCHS = 0.01, 10
RECIPES = {arm: f"configs/experiments/ablation_{name}.toml"
           for arm, name in zip(ABLATION_ARMS, ("base", "stn", "sr", "stn_sr"), strict=True)}  # fmt: skip


def test_the_ablation_recipes_differ_only_in_the_front_end_and_build_ablation_arms(tmp_path):
    """configs/experiments/ablation_*.toml, read by mien train's own loader: the same recipe but for the model,
    stn_reg and stn_lr_scale (STN arms) and sr_init and sr_finetune_epochs (SR arms); built as mien train builds them,
    they are ablation_arms()'s four models, classifier weights included."""
    root = Path(__file__).resolve().parents[1]
    configs = {arm: config_from_dict(load_recipe(root / path)) for arm, path in RECIPES.items()}
    base = asdict(configs["base_cnn"])
    for arm, cfg in configs.items():
        stn, sr = ABLATION_ARMS[arm]
        values = asdict(cfg)
        differ = {k for k in base if values[k] != base[k]}
        expected = {"model"} if arm != "base_cnn" else set()
        front = ({"stn_reg", "stn_lr_scale"} if stn else set()) | ({"sr_init", "sr_finetune_epochs"} if sr else set())
        assert differ == expected | front, arm
        assert (cfg.model, cfg.stn_reg, cfg.freeze_sr) == (arm, 0.01 if stn else 0.0, False)
        assert (cfg.stn_lr_scale, cfg.sr_lr_scale) == (STN_LR_SCALE if stn else 1.0, 1.0)
        assert cfg.sr_finetune_epochs == (SR_FINETUNE_EPOCHS if sr else 0)
        assert cfg.sr_init == ("models/frontends/edsr_x2.onnx" if sr else "")  # the exported, committed front end
    cfg = configs["base_cnn"]
    assert (cfg.epochs, cfg.early_stop, cfg.optimizer, cfg.schedule, cfg.amp, cfg.channels_last) == (
        50, 0, "sgd", "cosine", "auto", True
    )  # fmt: skip
    assert (cfg.train_split, cfg.val_split, cfg.val_fraction, cfg.val_seed, cfg.augment.crop) == (
        "train", "val", 0.1, 2013, 0
    )  # fmt: skip
    assert cfg.model_kwargs == {**ablation_model_kwargs()["base_cnn"], "widths": [32, 64, 128, 256]}

    sr_init = tmp_path / "sr.pt"  # stands in for models/frontends/edsr_x2.onnx: the default EDSR, B=4, F=32
    torch.save({"kind": "sr_pretrain", "sr_kwargs": EDSR(1).kwargs, "state_dict": EDSR(1).state_dict()}, sr_init)
    torch.manual_seed(cfg.seed)
    arms = ablation_arms()
    for arm, cfg in configs.items():
        seed_everything(cfg.seed)
        model, *_ = build_model(replace(cfg, sr_init=str(sr_init) if cfg.sr_init else ""), FER2013_LABELS,
                                torch.device("cpu"))  # fmt: skip
        assert _layers(model) == _layers(arms[arm]), arm
        built, want = model.classifier.state_dict(), arms[arm].classifier.state_dict()
        assert list(built) == list(want), arm
        for key, tensor in want.items():
            torch.testing.assert_close(built[key], tensor, rtol=0, atol=0, msg=f"{arm}: {key}")
