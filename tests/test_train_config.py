"""One training config: `mien train`'s flags are generated from TrainConfig (nested options included) and
`mien pretrain-sr`'s from SRPretrainConfig, with the dataclasses' defaults, and a recipe sits under the flags."""

from __future__ import annotations

import argparse
import subprocess
import sys
from dataclasses import fields, replace

import pytest

from mien.training.cli import add_commands, field_default, flag, train_config_from_args
from mien.training.config import AugmentConfig, ObjectiveConfig, SRPretrainConfig, TrainConfig, leaf_fields

CLI_ONLY = {"help", "config", "list_models"}  # `mien train` options that are not training choices


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mien")
    add_commands(parser.add_subparsers(dest="command", required=True))
    return parser


def _subparser(name: str) -> argparse.ArgumentParser:
    sub = next(a for a in _parser()._actions if isinstance(a, argparse._SubParsersAction))
    return sub.choices[name]


def _config(*argv: str) -> TrainConfig:
    return train_config_from_args(_parser().parse_args(["train", *argv]))[0]


def _value(cfg: TrainConfig, parent: str | None, name: str):
    return getattr(getattr(cfg, parent) if parent else cfg, name)


@pytest.mark.parametrize("command, cls", [("train", TrainConfig), ("pretrain-sr", SRPretrainConfig)])
def test_every_config_field_has_exactly_one_flag_and_nothing_else_does(command, cls):
    actions = [a for a in _subparser(command)._actions if a.dest not in CLI_ONLY]
    leaves = leaf_fields(cls)
    names = [f.name for _, f, _ in leaves]
    assert len(names) == len(set(names)), "a nested option shares its name with another option"
    assert sorted(a.dest for a in actions) == sorted(names)
    for action in actions:
        assert action.option_strings[0] == "--" + action.dest.replace("_", "-")
    if cls is TrainConfig:  # nested options are flags like any other
        assert {"--mixup", "--crop", "--erasing", "--cutmix", "--triplet-weight"} <= {flag(f) for _, f, _ in leaves}


def test_flag_defaults_are_the_dataclass_defaults():
    args = _parser().parse_args(["train"])
    assert not any(hasattr(args, f.name) for _, f, _ in leaf_fields(TrainConfig))  # not given: the recipe stands
    assert _config() == TrainConfig()  # and with no recipe, the dataclass's defaults
    helps = {a.dest: a.help for a in _subparser("train")._actions}
    for _, f, _ in leaf_fields(TrainConfig):
        value = field_default(f)
        if not f.metadata["show_default"] or value in ("", None, {}, ()):
            continue
        shown = ("on" if value else "off") if isinstance(value, bool) else f"{value:g}" if isinstance(value, float) \
            else str(value)  # fmt: skip
        assert helps[f.name].endswith(f"(default {shown})"), f.name
    args = _parser().parse_args(["pretrain-sr"])
    assert SRPretrainConfig(**{f.name: getattr(args, f.name) for f in fields(SRPretrainConfig)}) == SRPretrainConfig()


def _other_value(f, kind):
    """A value of field ``f`` other than its default, as (flag arguments, parsed value)."""
    default = field_default(f)
    if kind is bool:
        return [("--no-" if default else "--") + f.name.replace("_", "-")], not default
    if f.metadata["choices"]:
        value = next(c for c in f.metadata["choices"] if c != default)
    else:
        value = {int: lambda: default + 3, float: lambda: default + 0.25, str: lambda: "elsewhere"}.get(kind, str)()
    special = {"labels": ("angry,sad", ("angry", "sad")), "label_map": ("a=b,c=d", {"a": "b", "c": "d"}),
               "model_kwargs": ('{"width": 8}', {"width": 8})}  # fmt: skip
    text, value = special.get(f.name, (str(value), value))
    return [flag(f), text], value


@pytest.mark.parametrize("parent, f, kind", leaf_fields(TrainConfig), ids=[flag(f) for _, f, _ in leaf_fields()])
def test_every_flag_sets_its_field_and_only_it(parent, f, kind):
    argv, value = _other_value(f, kind)
    cfg = _config(*argv)
    assert _value(cfg, parent, f.name) == value
    expected = TrainConfig()
    if parent:
        expected = replace(expected, **{parent: replace(getattr(expected, parent), **{f.name: value})})
    else:
        expected = replace(expected, **{f.name: value})
    if f.name == "model":
        expected = replace(expected, out=f"runs/{value}")  # a run without --out goes to runs/<model>
    assert cfg == expected


def test_a_recipe_under_flags_gives_the_expected_config(tmp_path):
    recipe = tmp_path / "r.toml"
    recipe.write_text(
        'model = "vgg_fer"\nout = "runs/r"\nepochs = 7\noptimizer = "sgd"\nchannels_last = false\nfreeze_sr = true\n'
        'labels = ["angry", "sad"]\n\n[augment]\nmixup = 0.2\ncrop = 40\n\n[objective]\ntriplet_weight = 2.0\n'
    )
    flags = ["--epochs", "9", "--cutmix", "1.0", "--channels-last", "--no-freeze-sr", "--optimizer", "sgd",
             "--teacher", "t.onnx"]  # fmt: skip
    args = _parser().parse_args(["train", "--config", str(recipe), *flags])
    cfg, path = train_config_from_args(args)
    assert path == str(recipe)
    assert cfg == replace(
        TrainConfig(), model="vgg_fer", out="runs/r", epochs=9, optimizer="sgd", channels_last=True, freeze_sr=False,
        labels=("angry", "sad"), teacher="t.onnx", augment=AugmentConfig(mixup=0.2, crop=40, cutmix=1.0),
        objective=ObjectiveConfig(triplet_weight=2.0),
    )  # fmt: skip
    # a flag given with the default value still overrides the recipe; no --out and none in the recipe: runs/<model>
    recipe.write_text('model = "vgg_fer"\noptimizer = "sgd"\n[augment]\nmixup = 0.2\n')
    cfg, _ = train_config_from_args(_parser().parse_args(["train", "--config", str(recipe), "--optimizer", "adam"]))
    assert (cfg.optimizer, cfg.augment.mixup, cfg.out) == ("adam", 0.2, "runs/vgg_fer")


@pytest.mark.parametrize(
    "argv",
    [["--optimizer", "rmsprop"], ["--amp", "fp8"], ["--schedule", "linear"], ["--labels", "angry"],
     ["--label-map", "surprise"], ["--model-kwargs", "[1]"], ["--epochs", "1.5"], ["--ferplus-target", "hard"]],
)  # fmt: skip
def test_bad_values_are_refused_by_the_parser(argv):
    with pytest.raises(SystemExit):
        _parser().parse_args(["train", *argv])


def test_building_the_parser_imports_no_torch():
    code = (
        "import argparse, sys; from mien.training.cli import add_commands; "
        "add_commands(argparse.ArgumentParser().add_subparsers()); assert 'torch' not in sys.modules, 'torch'"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
