"""The service's subcommand of ``mien``: ``mien serve``.

uvicorn and the app are imported inside the handler, so that ``mien --help`` stays instant.
"""

from __future__ import annotations

import argparse
import sys


def add_commands(sub: argparse._SubParsersAction) -> None:
    """Add ``serve`` to the ``mien`` command's subparsers."""
    p = sub.add_parser("serve", help="serve the ONNX models over HTTP (settings from MIEN_* variables)",
                       description="Start the FastAPI service. Every option can also be set by an environment "
                       "variable MIEN_<NAME> (e.g. MIEN_MODEL_DIR); flags win over the environment.")  # fmt: skip
    p.add_argument("--host", default=None)
    p.add_argument("--port", type=int, default=None)
    p.add_argument("--model-dir", default=None)
    p.add_argument("--default-model", default=None)
    p.set_defaults(func=run_serve)


def run_serve(args: argparse.Namespace) -> int:
    """Settings from the environment with the flags over them, then uvicorn; 2 when the settings are invalid."""
    import uvicorn
    from pydantic import ValidationError

    from mien.service.config import Settings
    from mien.service.main import create_app

    overrides = {k: v for k, v in {"host": args.host, "port": args.port, "model_dir": args.model_dir,
                                   "default_model": args.default_model}.items() if v is not None}  # fmt: skip
    try:
        settings = Settings(**overrides)
    except ValidationError as exc:
        problems = "; ".join(f"MIEN_{'_'.join(map(str, e['loc'])).upper()}: {e['msg']}" for e in exc.errors())
        print(f"mien serve: invalid settings: {problems}", file=sys.stderr)
        return 2
    uvicorn.run(create_app(settings), host=settings.host, port=settings.port)
    return 0
