"""Every recipe scripts/train_plan.sh trains still trains with the code of today: one epoch of each, as the plan
runs it (the distillations with teachers, the SR arms with the committed front end and their fine-tuning phase), on
tiny data. The plan runs unattended between sessions and stops at a failed step, so a recipe the code no longer
accepts would cost the rest of a session's training; this finds it first."""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path

import pytest

from mien.training.config import config_from_dict
from mien.training.recipe import load_recipe
from mien.training.train import TrainConfig, train
from tests.conftest import write_npz
from tests.test_ferplus import write_votes

ROOT = Path(__file__).resolve().parents[1]
PLAN = ROOT / "scripts" / "train_plan.sh"
DISTILLED = ("vgg_fer_ba", "mini_xception_fm")  # the plan adds --teacher with both seeds


def plan_recipes() -> list[str]:
    """The steps of the plan that train a recipe of configs/experiments, in the plan's order."""
    steps = re.search(r"^STEPS=\(([^)]*)\)", PLAN.read_text(), re.M).group(1).split()
    return [s for s in steps if (ROOT / "configs" / "experiments" / f"{s}.toml").is_file()]


@pytest.fixture(scope="module")
def plan_data(tmp_path_factory):
    """Tiny data with FER+ votes (the FER+ recipe reads them), and a teacher checkpoint for the distillations."""
    root = tmp_path_factory.mktemp("plan_recipes")
    npz = write_npz(root / "fer2013.npz", train_per_class=40, test_per_class=10)
    write_votes(npz, root / "ferplus_votes.csv")
    train(TrainConfig(data=str(npz), out=str(root / "teacher"), model="vgg_fer", model_kwargs={"width": 4, "hidden": 8},
                      epochs=1, batch_size=32, threads=1, limit=64, checkpoint_minutes=0))  # fmt: skip
    return npz, root / "teacher" / "best.pt"


def test_the_plan_trains_recipes_of_both_issues():
    recipes = plan_recipes()
    assert {"ablation_sr", "ablation_stn_sr", "vgg_fer_ferplus", *DISTILLED} <= set(recipes)
    assert sum(r.startswith("converged_") for r in recipes) == 6


@pytest.mark.parametrize("name", plan_recipes())
def test_a_plan_recipe_trains_one_epoch(name, plan_data, tmp_path):
    npz, teacher = plan_data
    cfg = config_from_dict(load_recipe(ROOT / "configs" / "experiments" / f"{name}.toml"))
    tiny = {"data": str(npz), "out": str(tmp_path / name), "epochs": 1, "limit": 64, "batch_size": 16, "threads": 1,
            "checkpoint_minutes": 0}  # fmt: skip
    if name in DISTILLED:
        tiny["teacher"] = f"{teacher},{teacher}"
    if cfg.sr_finetune_epochs:  # the one epoch is a fine-tuning one: the SR front end trains too
        tiny["sr_finetune_epochs"] = 1
    best = train(dataclasses.replace(cfg, **tiny))
    assert 0.0 <= best["val_acc"] <= 1.0 and (tmp_path / name / "best.pt").is_file()
