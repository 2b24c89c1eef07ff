"""mien.export.cli: export's subcommands, with the options, defaults and help `mien` has always had."""

from __future__ import annotations

import argparse

import pytest

from mien.cli import build_parser
from mien.export.cli import add_commands
from mien.paths import DEFAULT_DATA

COMMANDS = ("export", "ensemble", "eval", "results")


def export_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mien")
    add_commands(parser.add_subparsers(dest="command", required=True))
    return parser


def subparsers(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    action = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return dict(action.choices)


def described(parser: argparse.ArgumentParser) -> list[tuple]:
    """Every option as the user meets it: flags, destination, default, type, choices, help, nargs."""
    return [
        (tuple(a.option_strings), a.dest, a.default, _type(a.type), a.choices, a.help, a.nargs) for a in parser._actions
    ]


def _type(kind) -> str | None:
    return getattr(kind, "__name__", None) if kind is not None else None


@pytest.mark.parametrize("command", COMMANDS)
def test_the_mien_command_dispatches_to_export(command):
    """`mien <command>` is export's own subcommand: same options and help, handled in mien.export.cli."""
    ours, mien = subparsers(export_parser())[command], subparsers(build_parser())[command]
    assert described(ours) == described(mien)
    assert mien.get_default("func").__module__ == "mien.export.cli"


def test_each_subcommand_parses_its_options():
    parser = export_parser()
    args = parser.parse_args(["export", "runs/x/best.pt", "--out", "m.onnx", "--parity-faces", "300", "--atol",
                              "1e-3", "--opset", "18", "--flip-tta", "--split", "val"])  # fmt: skip
    assert parser.parse_args(["export", "b.pt", "--ten-crop", "40"]).ten_crop == 40
    assert (args.checkpoint, args.out, args.parity_faces, args.atol, args.opset, args.flip_tta, args.split) == (
        "runs/x/best.pt", "m.onnx", 300, 1e-3, 18, True, "val")  # fmt: skip
    assert args.data == DEFAULT_DATA and args.model_dir == "models" and args.max_batch_size == 64
    args = parser.parse_args(["ensemble", "mini_xception, stn_cnn", "--flip", "--model-id", "e"])
    assert args.members == ("mini_xception", "stn_cnn") and args.flip and args.model_id == "e"
    assert args.data == DEFAULT_DATA and args.split == "public_test"
    args = parser.parse_args(["eval", "m.onnx", "--label-source", "ferplus7", "--batch-size", "64"])
    assert (args.model, args.label_source, args.batch_size, args.out, args.ferplus_votes) == (
        "m.onnx", "ferplus7", 64, None, "")  # fmt: skip
    args = parser.parse_args(["results", "--threads", "2", "--repeats", "5"])
    assert (args.threads, args.repeats, args.out, args.figures) == (2, 5, "docs/results.md", "docs/figures/results")
    assert args.readme == "README.md" and parser.parse_args(["results", "--readme", ""]).readme == ""
    assert {args.func.__module__ for args in [parser.parse_args([c, "x"]) for c in ("export", "eval")]} == {
        "mien.export.cli"
    }


@pytest.mark.parametrize("argv", [["ensemble", "only_one"], ["eval", "m.onnx", "--label-source", "ckplus"], ["export"]])
def test_bad_arguments_are_refused(argv, capsys):
    with pytest.raises(SystemExit) as exc:
        export_parser().parse_args(argv)
    assert exc.value.code == 2


def test_export_command_runs_through_the_patched_export(monkeypatch):
    """Commands look their function up when run, so a test (or a caller) can replace it."""
    import mien.export.onnx_export as onnx_export

    seen = {}

    def fake_export(cfg):
        seen["cfg"] = cfg
        return type("Result", (), {"passed": False})()

    monkeypatch.setattr(onnx_export, "export_checkpoint", fake_export)
    args = export_parser().parse_args(["export", "runs/x/best.pt", "--flip-tta"])
    assert args.func(args) == 1
    assert seen["cfg"].checkpoint == "runs/x/best.pt" and seen["cfg"].flip_tta and seen["cfg"].data == DEFAULT_DATA
