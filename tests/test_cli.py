import subprocess
import sys

import pytest

COMMANDS = ["train", "recipe", "pretrain-sr", "sr-eval", "export", "ensemble", "eval", "calibrate", "results",
            "recover", "serve", "analyze"]  # fmt: skip


def test_the_command_line_has_exactly_these_subcommands():
    import argparse

    from mien.cli import build_parser

    (sub,) = [a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction)]
    assert sorted(sub.choices) == sorted(COMMANDS)


@pytest.mark.parametrize("command", COMMANDS)
def test_every_subcommand_has_help(command):
    result = subprocess.run([sys.executable, "-m", "mien.cli", command, "--help"], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert f"usage: mien {command}" in result.stdout


def test_list_models():
    result = subprocess.run(
        [sys.executable, "-m", "mien.cli", "train", "--list-models"], capture_output=True, text=True
    )
    assert result.returncode == 0 and "mini_xception" in result.stdout.split()


def test_eval_command_prints_accuracy(model_dir, tiny_npz, tmp_path):
    command = ["eval", str(model_dir / "mini_xception.onnx"), "--data", str(tiny_npz), "--out", str(tmp_path)]
    result = subprocess.run([sys.executable, "-m", "mien.cli", *command], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert "public_test: accuracy" in result.stdout and (tmp_path / "report.json").exists()
