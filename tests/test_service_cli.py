"""``mien serve`` as the service defines it (mien.service.cli.add_commands): options parse, the flags reach the
settings, invalid settings exit 2; uvicorn is replaced, so no server starts."""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest

from mien.service.cli import add_commands, run_serve


def parser() -> argparse.ArgumentParser:
    root = argparse.ArgumentParser(prog="mien")
    add_commands(root.add_subparsers(dest="command", required=True))
    return root


def test_serve_options_parse():
    args = parser().parse_args(["serve", "--host", "0.0.0.0", "--port", "8123", "--model-dir", "elsewhere",
                                "--default-model", "dcnn"])  # fmt: skip
    assert (args.command, args.host, args.port, args.model_dir, args.default_model) == (
        "serve", "0.0.0.0", 8123, "elsewhere", "dcnn"
    )  # fmt: skip
    assert args.func is run_serve


def test_serve_options_default_to_the_environment():
    args = parser().parse_args(["serve"])
    assert (args.host, args.port, args.model_dir, args.default_model) == (None, None, None, None)


def test_a_port_that_is_not_a_number_is_refused():
    with pytest.raises(SystemExit):
        parser().parse_args(["serve", "--port", "http"])


def test_serve_hands_the_settings_to_uvicorn(monkeypatch, tmp_path: Path):
    import uvicorn

    calls = {}
    monkeypatch.setattr(uvicorn, "run", lambda app, **kwargs: calls.update(app=app, **kwargs))
    monkeypatch.setenv("MIEN_PORT", "9000")
    monkeypatch.setenv("MIEN_PROVIDERS", "cpu")
    args = parser().parse_args(["serve", "--model-dir", str(tmp_path), "--port", "8123"])
    assert args.func(args) == 0
    assert calls["port"] == 8123 and calls["host"] == "127.0.0.1"  # the flag wins over MIEN_PORT
    assert calls["app"].state.settings.model_dir == tmp_path


def test_invalid_settings_exit_2_and_name_the_variable(monkeypatch, capsys):
    import uvicorn

    monkeypatch.setattr(uvicorn, "run", lambda *a, **k: pytest.fail("the server must not start"))
    args = parser().parse_args(["serve", "--port", "0"])
    assert args.func(args) == 2
    assert "MIEN_PORT" in capsys.readouterr().err
