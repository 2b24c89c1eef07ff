"""The training part's subcommands: ``mien train``, ``mien recipe``, ``mien pretrain-sr`` and ``mien sr-eval``.

``mien train``'s options are generated from :class:`~mien.training.config.TrainConfig` (nested options
included) and ``mien pretrain-sr``'s from ``SRPretrainConfig``: one flag per field, ``--kebab-name``,
parsed by the field's annotation, with the help, choices and group of its metadata and the default of
the field itself. Torch is imported inside each command, so building the parser stays instant and
``mien serve`` works without the ``train`` extra.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from dataclasses import MISSING, Field, fields, replace
from pathlib import Path
from typing import Any

from mien.training.config import SRPretrainConfig, TrainConfig, leaf_fields, nested_configs


def comma_list(text: str) -> tuple[str, ...]:
    """``angry,sad,happy`` → ('angry', 'sad', 'happy')."""
    labels = tuple(name.strip() for name in text.split(",") if name.strip())
    if len(labels) < 2:
        raise argparse.ArgumentTypeError(f"expected at least two comma-separated labels, got {text!r}")
    return labels


def pairs(text: str) -> dict[str, str]:
    """``surprise=happy,contempt=angry`` → {'surprise': 'happy', 'contempt': 'angry'}."""
    items = [item.split("=") for item in text.split(",") if item.strip()]
    if not items or any(len(pair) != 2 or not pair[0].strip() or not pair[1].strip() for pair in items):
        raise argparse.ArgumentTypeError(f"expected old=new[,old=new...], got {text!r}")
    return {old.strip(): new.strip() for old, new in items}


def json_object(text: str) -> dict:
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        raise argparse.ArgumentTypeError(f"not valid JSON ({exc}): {text!r}") from None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError(f"expected a JSON object such as '{{\"sr_kwargs\": {{}}}}', got {text!r}")
    return value


#: How a flag's text becomes a field's value, by the field's annotation (bools are --x/--no-x switches).
PARSERS: dict[Any, Any] = {
    int: int,
    float: float,
    str: str,
    tuple[str, ...] | None: comma_list,
    dict[str, str]: pairs,
    dict: json_object,
}


def field_default(f: Field) -> Any:
    return f.default_factory() if f.default is MISSING else f.default


def flag(f: Field) -> str:
    return "--" + f.name.replace("_", "-")


def _help(f: Field) -> str:
    text, value = f.metadata["help"], field_default(f)
    if f.metadata["show_default"] and value not in ("", None, {}, ()):
        shown = ("on" if value else "off") if isinstance(value, bool) else f"{value:g}" if isinstance(value, float) \
            else str(value)  # fmt: skip
        text = f"{text} (default {shown})"
    return text.replace("%", "%%")  # argparse formats help with %


def add_config_options(parser: argparse.ArgumentParser, cls: type, suppress: bool) -> None:
    """One flag per option of the config class ``cls``, nested options included, in field order.

    ``suppress``: a flag not given leaves no attribute (so a recipe's value stands); otherwise it
    holds the field's default.
    """
    titles = {f.name: f.metadata["help"] for f in fields(cls) if f.name in nested_configs(cls)}
    groups: dict[str, argparse._ArgumentGroup] = {}
    for parent, f, kind in leaf_fields(cls):
        title = f.metadata["group"] or titles.get(parent, "")
        target = groups.setdefault(title, parser.add_argument_group(title)) if title else parser
        kwargs: dict[str, Any] = {"dest": f.name, "help": _help(f)}
        if kind is bool:
            kwargs["action"] = argparse.BooleanOptionalAction
        elif kind in PARSERS:
            kwargs["type"] = PARSERS[kind]
        else:
            raise TypeError(f"{cls.__name__}.{f.name}: no flag parser for {kind}; add one to PARSERS")
        if f.metadata["choices"]:
            kwargs["choices"] = f.metadata["choices"]
        kwargs["default"] = argparse.SUPPRESS if suppress else field_default(f)
        target.add_argument(flag(f), **kwargs)


def add_commands(sub: argparse._SubParsersAction) -> None:
    """Add ``train``, ``recipe``, ``pretrain-sr`` and ``sr-eval`` to the ``mien`` command's subparsers."""
    _add_train(sub)
    _add_recipe(sub)
    _add_pretrain_sr(sub)
    _add_sr_eval(sub)


def _add_train(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("train", help="train a model on FER2013 (resumes from <out>/last.pt)",
                       description="Train a registered model on the train split, keep the best checkpoint by "
                       "validation accuracy (a split carved from Training unless --val-split says otherwise). "
                       "Rerun the same command to resume. Runs unchanged under torchrun (one process per CPU "
                       "socket or GPU).")  # fmt: skip
    p.add_argument("--config", default="", help="a recipe, e.g. configs/mini_xception.toml: every training choice "
                   "of a bundled model; flags given beside it override its values")  # fmt: skip
    add_config_options(p, TrainConfig, suppress=True)  # a flag not given leaves the recipe's value
    p.add_argument("--list-models", action="store_true", default=False, help="print the registered model ids and exit")
    p.set_defaults(func=_run_train)


def train_config_from_args(args: argparse.Namespace) -> tuple[TrainConfig, str]:
    """(TrainConfig, recipe path): TrainConfig's defaults, then the recipe's values, then the flags given."""
    from mien.training.recipe import config_from_dict, load_recipe

    given: dict[str, Any] = {}
    for parent, f, _ in leaf_fields(TrainConfig):
        if hasattr(args, f.name):
            (given.setdefault(parent, {}) if parent else given)[f.name] = getattr(args, f.name)
    recipe = load_recipe(args.config) if args.config else {}
    cfg = config_from_dict(given, base=config_from_dict(recipe))
    if "out" not in given and "out" not in recipe:
        cfg = replace(cfg, out=f"runs/{cfg.model}")
    return cfg, args.config


def _run_train(args: argparse.Namespace) -> int:
    from mien.training.models import list_models
    from mien.training.train import Stopped, train

    if args.list_models:
        print("\n".join(list_models()))
        return 0
    cfg, recipe = train_config_from_args(args)
    try:
        best = train(cfg, recipe=recipe)
    except Stopped as stopped:  # a SIGTERM: the step under way ended and last.pt was written
        print(f"mien train: {stopped}; rerun the same command to resume", file=sys.stderr)
        return 128 + stopped.signum  # what a shell reports for a process the signal ended
    if os.environ.get("RANK", "0") == "0":  # under torchrun, once
        where = f"at epoch {best['epoch']}; checkpoint {cfg.out}/best.pt"
        print(f"best {cfg.val_split} accuracy {best['val_acc']:.4f} {where}")
    return 0


def _add_recipe(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("recipe", help="training recipes (configs/<model>.toml) made from model cards",
                       description="Make and check the recipe of a bundled model. `sync` is the one command to run "
                       "after a model is retrained and exported: it rewrites configs/<model id>.toml from the card "
                       "and points the card at it.")  # fmt: skip
    rsub = p.add_subparsers(dest="recipe_command", required=True)
    f = rsub.add_parser("from-card", help="print the TOML recipe of a card's training.config")
    f.add_argument("card")
    k = rsub.add_parser("link", help="set a card's training.recipe after checking the recipe gives its config")
    k.add_argument("card")
    k.add_argument("recipe")
    y = rsub.add_parser("sync", help="write configs/<model id>.toml from each card and link the card to it")
    y.add_argument("cards", nargs="*", help="model cards (default: every card in --model-dir)")
    y.add_argument("--model-dir", default="models")
    y.add_argument("--configs", default="configs")
    c = rsub.add_parser("check", help="exit 1 when a card's training.config differs from what its recipe gives")
    c.add_argument("cards", nargs="*", help="model cards (default: every card in --model-dir)")
    c.add_argument("--model-dir", default="models")
    p.set_defaults(func=_run_recipe)


def _run_recipe(args: argparse.Namespace) -> int:
    from mien.card import CARD_SUFFIX
    from mien.training.recipe import check_card, link_card, recipe_from_card, sync

    if args.recipe_command == "from-card":
        sys.stdout.write(recipe_from_card(args.card))
        return 0
    if args.recipe_command == "link":
        link_card(args.card, args.recipe)
        print(f"{args.card}: training.recipe = {args.recipe}")
        return 0
    cards = args.cards or sorted(str(p) for p in Path(args.model_dir).glob("*" + CARD_SUFFIX))
    if args.recipe_command == "sync":
        for recipe in sync(cards, args.configs):
            print(f"wrote {recipe}")
        return 0
    failed = 0
    for card_path in cards:
        checked = check_card(card_path)
        if checked is None:
            continue  # nothing was trained (an ensemble)
        message, ok = checked
        print(f"{card_path}: {message}")
        failed += not ok
    return 1 if failed else 0


def _add_pretrain_sr(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("pretrain-sr", help="pre-train the SR front end (24->48 faces, L1) for --sr-init",
                       description="Train the EDSR front end of sr_cnn/stn_sr_cnn to undo a x2 downscale of "
                       "FER2013 Training faces (less the val faces mien train carves, with --val-split val, the "
                       "default); for `mien train --sr-init X`. L1 per epoch in <out>.json; rerun the same command to "
                       "resume from <out stem>.last.pt, written every epoch.")  # fmt: skip
    add_config_options(p, SRPretrainConfig, suppress=False)
    p.set_defaults(func=_run_pretrain_sr)


def _run_pretrain_sr(args: argparse.Namespace) -> int:
    from mien.training.sr_pretrain import pretrain_sr

    cfg = SRPretrainConfig(**{f.name: getattr(args, f.name) for f in fields(SRPretrainConfig)})
    m = pretrain_sr(cfg)
    print(f"SR {m['split']} L1 {m['val_l1']:.4f} (bicubic {m['bicubic_l1']:.4f}); checkpoint {cfg.out}")
    return 0


def _add_sr_eval(sub: argparse._SubParsersAction) -> None:
    from mien.paths import DEFAULT_DATA

    p = sub.add_parser("sr-eval", help="PSNR and SSIM of a pre-trained SR front end against bicubic upsampling",
                       description="Score a `mien pretrain-sr` checkpoint on a split's faces: each 48x48 face is "
                       "the high-resolution truth, its x2 downscale the input; the network's output and bicubic "
                       "upsampling are scored against the truth with PSNR (0-255 scale) and SSIM, and the margin "
                       "printed and written as JSON.")  # fmt: skip
    p.add_argument("checkpoint", help="an SR checkpoint written by `mien pretrain-sr`, or a `mien train` checkpoint "
                   "of sr_cnn/stn_sr_cnn (its front end as training left it)")  # fmt: skip
    p.add_argument("--data", default=DEFAULT_DATA, help="fer2013.csv, fer2013.npz or image-folder root")
    p.add_argument(
        "--split",
        default="public_test",
        help="the split whose faces are scored (default public_test; "
        "val = the faces carved from Training for validation)",
    )
    p.add_argument("--out", default="", help="the JSON report (default: <checkpoint>.<split>.eval.json beside it)")
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--limit", type=int, default=0, help="score only the first N faces; 0 = all")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads; 0 = torch's default")
    p.set_defaults(func=_run_sr_eval)


def _run_sr_eval(args: argparse.Namespace) -> int:
    import torch

    from mien.training.sr_eval import evaluate_sr, format_sr_evaluation, write_sr_evaluation

    if args.threads:
        torch.set_num_threads(args.threads)
    report = evaluate_sr(args.checkpoint, args.data, args.split, args.batch_size, args.limit)
    checkpoint = Path(args.checkpoint)
    out = write_sr_evaluation(report, args.out or checkpoint.with_name(f"{checkpoint.stem}.{args.split}.eval.json"))
    print(format_sr_evaluation(report))
    print(f"wrote {out}")
    return 0
