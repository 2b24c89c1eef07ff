"""The ``mien`` command. It only dispatches: each part owns its subcommands and adds them here.

* ``mien.training.cli``: ``train``, ``recipe``, ``pretrain-sr``
* ``mien.export.cli``: ``export`` (also ``export detector``, ``export triton``), ``ensemble``, ``eval``,
  ``calibrate``, ``results``
* ``mien.service.cli``: ``serve``, ``analyze``

This is the one module above the parts (docs/architecture.md): the ground layer below it imports none of
them. Heavy imports (torch, onnx, uvicorn) happen inside each subcommand's handler, so that ``mien serve``
works without the ``train`` extra and ``--help`` is instant.
"""

from __future__ import annotations

import argparse
import logging
import sys

from mien.export.cli import add_commands as add_export_commands
from mien.service.cli import add_commands as add_service_commands
from mien.training.cli import add_commands as add_training_commands


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="mien", description="Facial expression recognition: train, export, eval, serve."
    )
    sub = parser.add_subparsers(dest="command", required=True)
    for add_commands in (add_training_commands, add_export_commands, add_service_commands):
        add_commands(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
