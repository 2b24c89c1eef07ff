"""Recipes (configs/<model>.toml): every bundled model has one, it gives exactly its card's training config,
`mien train --config` trains from it with flags on top, and the exported card points back to it."""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

import pytest

from mien.cli import main
from mien.training.cli import add_commands, train_config_from_args
from mien.training.recipe import config_from_dict, link_card, load_recipe, recipe_differences, recipe_text, sync

ROOT = Path(__file__).resolve().parents[1]
TRAINED_CARDS = sorted(
    p for p in (ROOT / "models").glob("*.card.json") if (json.loads(p.read_text()).get("training") or {}).get("config")
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mien")
    add_commands(parser.add_subparsers(dest="command", required=True))
    return parser


@pytest.mark.parametrize("card_path", TRAINED_CARDS, ids=lambda p: p.name.removesuffix(".card.json"))
def test_every_bundled_card_points_to_a_recipe_that_gives_its_config(card_path):
    card = json.loads(card_path.read_text())
    recipe = card["training"]["recipe"]
    assert recipe == f"configs/{card['model_id']}.toml"
    assert recipe_differences(card["training"]["config"], load_recipe(ROOT / recipe)) == []


def test_train_config_is_defaults_then_recipe_then_flags(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    Path("configs").mkdir()
    Path("configs/sr_cnn.toml").write_text(
        'model = "sr_cnn"\nlr = 0.0005\nfreeze_sr = true\nepochs = 2\namp = "auto"\n'
        "[model_kwargs]\nwidths = [16, 32, 64, 128]\nhidden = 128\n"
    )
    args = build_parser().parse_args(["train", "--config", "configs/sr_cnn.toml", "--epochs", "1", "--amp", "bf16"])
    cfg, recipe = train_config_from_args(args)
    assert recipe == "configs/sr_cnn.toml"
    assert (cfg.model, cfg.lr, cfg.freeze_sr) == ("sr_cnn", 5e-4, True)  # from the recipe
    assert cfg.out == "runs/sr_cnn"  # a recipe names no run folder: the default, runs/<model>
    assert (cfg.epochs, cfg.amp) == (1, "bf16")  # flags win
    assert cfg.model_kwargs == {"widths": [16, 32, 64, 128], "hidden": 128}
    args = build_parser().parse_args(["train", "--model", "dcnn", "--triplet-weight", "0.5"])
    cfg, recipe = train_config_from_args(args)  # no recipe: TrainConfig's defaults
    assert (cfg.out, cfg.epochs, cfg.objective.triplet_weight, cfg.channels_last, recipe) == (
        "runs/dcnn", 100, 0.5, True, ""
    )  # fmt: skip


@pytest.mark.parametrize("recipe", sorted((ROOT / "configs").glob("*.toml")), ids=lambda p: p.stem)
def test_a_bundled_recipe_names_neither_the_faces_nor_the_run_folder_of_the_machine_it_ran_on(recipe):
    """`mien train --config configs/<model>.toml` on another machine reads its --data and writes runs/<model> (or
    --out), never the training machine's paths (a run folder there would be resumed, not started)."""
    values = load_recipe(recipe)
    assert "data" not in values and "out" not in values
    assert "--out " in recipe.read_text().splitlines()[2]  # the header's command keeps where it ran


def test_a_recipe_with_an_unknown_option_is_refused(tmp_path):
    (tmp_path / "bad.toml").write_text('model = "base_cnn"\nlearning_rate = 0.1\n')
    with pytest.raises(ValueError, match=r"unknown training option\(s\) \['learning_rate'\]"):
        load_recipe(tmp_path / "bad.toml")
    (tmp_path / "bad2.toml").write_text("[augment]\nflip = true\nblur = 1\n")
    with pytest.raises(ValueError, match=r"unknown augment option\(s\) \['blur'\]"):
        load_recipe(tmp_path / "bad2.toml")


def test_sync_writes_the_recipe_and_links_the_card_and_link_refuses_a_drifted_recipe(tmp_path):
    models = tmp_path / "models"
    models.mkdir()
    card_path = models / "base_cnn.card.json"
    card = json.loads((ROOT / "models" / "base_cnn.card.json").read_text())
    del card["training"]["recipe"]
    card["training"]["config"]["epochs"] = 33  # a retrained model: its card changed
    card_path.write_text(json.dumps(card, indent=2) + "\n")
    shutil.copy(ROOT / "models" / "ensemble.card.json", models)  # nothing trained: no recipe

    written = sync(sorted(models.glob("*.card.json")), tmp_path / "configs")
    assert written == [tmp_path / "configs" / "base_cnn.toml"]
    linked = json.loads(card_path.read_text())
    assert linked["training"]["recipe"] == str(tmp_path / "configs" / "base_cnn.toml")
    assert list(linked["training"])[:2] == ["command", "recipe"]
    assert load_recipe(written[0])["epochs"] == 33

    written[0].write_text(written[0].read_text().replace("epochs = 33", "epochs = 34"))
    with pytest.raises(ValueError, match="epochs: card 33, recipe 34"):
        link_card(card_path, written[0])


def test_recipe_text_round_trips_a_card_config():
    card = json.loads((ROOT / "models" / "stn_sr_cnn.card.json").read_text())
    text = recipe_text(card, "models/stn_sr_cnn.card.json")
    assert text.startswith("# Training recipe of stn_sr_cnn") and "mien recipe sync" in text
    import tomllib

    values = tomllib.loads(text)
    assert "labels" not in values  # null in the card: left to the default
    assert recipe_differences(card["training"]["config"], values) == []
    assert "data" not in values and "out" not in values  # where it ran: the header's command says
    assert config_from_dict(values).init == card["training"]["config"]["init"]
    assert config_from_dict(values).sr_init == card["training"]["config"]["sr_init"]


def test_training_from_a_recipe_is_recorded_in_the_exported_card(tmp_path, tiny_npz, monkeypatch):
    from mien.export.onnx_export import ExportConfig, export_checkpoint

    recipe = tmp_path / "configs" / "mini_xception.toml"
    recipe.parent.mkdir()
    recipe.write_text(f'data = "{tiny_npz}"\nmodel = "mini_xception"\nepochs = 1\nbatch_size = 32\nthreads = 1\n')
    monkeypatch.chdir(tmp_path)
    assert main(["train", "--config", "configs/mini_xception.toml", "--out", "run"]) == 0
    export_checkpoint(ExportConfig(checkpoint="run/best.pt", out="m/mini_xception.onnx", data=str(tiny_npz),
                                   parity_faces=256))  # fmt: skip
    card = json.loads(Path("m/mini_xception.card.json").read_text())
    assert card["training"]["recipe"] == "configs/mini_xception.toml"
    assert card["training"]["config"]["out"] == "run"  # the flag given beside the recipe
    assert recipe_differences(card["training"]["config"], {**load_recipe(recipe), "out": "run"}) == []


def test_recipe_check_command_passes_on_the_bundled_models_and_fails_on_drift(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(ROOT)
    assert main(["recipe", "check"]) == 0
    assert "models/mini_xception.card.json: matches configs/mini_xception.toml" in capsys.readouterr().out
    card = json.loads((ROOT / "models" / "base_cnn.card.json").read_text())
    card["training"]["config"]["lr"] = 0.1  # a card retrained without re-syncing its recipe
    drifted = tmp_path / "base_cnn.card.json"
    drifted.write_text(json.dumps(card))
    assert main(["recipe", "check", str(drifted)]) == 1
    recipe_lr = load_recipe(ROOT / "configs" / "base_cnn.toml")["lr"]
    assert recipe_lr != 0.1 and f"lr: card 0.1, recipe {recipe_lr}" in capsys.readouterr().out


EXPERIMENTS = sorted((ROOT / "configs" / "experiments").glob("*.toml"))


@pytest.mark.parametrize("path", EXPERIMENTS, ids=lambda p: p.stem)
def test_every_experiment_recipe_loads_as_mien_train_reads_it(path):
    """The runs queued outside the checkout start from these files: each must load (no unknown option) and
    hold the protocol's validation split out of training (carved from Training, the fixed seed)."""
    cfg = config_from_dict(load_recipe(path))
    assert (cfg.train_split, cfg.val_split, cfg.val_seed) == ("train", "val", 2013), path.name
    assert f"--config configs/experiments/{path.name}" in path.read_text()  # its header says how to run it
