"""Imports only point down (docs/architecture.md): the ground layer imports no part; training, export and
service import the ground and never each other, except export → training; nothing imports the service
or the command line; the service never imports torch. Every import counts, including those inside
functions, because a lazy import is still a dependency."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PARTS = {"mien.training": "training", "mien.export": "export", "mien.service": "service"}
#: part → the parts it may import (beside the ground, which every part may import)
ALLOWED = {
    "ground": set(),
    "mien.training": set(),
    "mien.export": {"mien.training"},
    "mien.service": set(),
    "mien.cli": {"mien.training", "mien.export", "mien.service"},
}
#: third-party packages a layer must not import, and why
FORBIDDEN_LIBRARIES = {
    "mien.service": {"torch": "the service runs on onnxruntime alone (the image has no torch)"},
    "ground": {"torch": "the ground layer serves the service too, which has no torch"},
}


def module_name(path: Path, root: Path = ROOT) -> str:
    """The import name of a source file, as the wheel installs it."""
    rel = path.relative_to(root).with_suffix("")
    parts = list(rel.parts)
    if parts[0] in PARTS.values():
        parts = ["mien", *parts]
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def layer_of(module: str) -> str:
    if module == "mien.cli" or module == "mien.__main__":
        return "mien.cli"
    for part in PARTS:
        if module == part or module.startswith(part + "."):
            return part
    return "ground" if module == "mien" or module.startswith("mien.") else "outside"


def imported_modules(path: Path, root: Path = ROOT) -> list[tuple[int, str]]:
    """(line, absolute module name) of every import in a file, relative imports resolved."""
    own = module_name(path, root).split(".")
    package = own if path.name == "__init__.py" else own[:-1]
    found = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = package[: len(package) - node.level + 1] if node.level else []
            module = ".".join([*base, *([node.module] if node.module else [])])
            # `from mien import training` imports the part itself
            found += [(node.lineno, f"{module}.{alias.name}") for alias in node.names] if not node.module or \
                module == "mien" else [(node.lineno, module)]  # fmt: skip
    return found


def source_files() -> list[Path]:
    return sorted(p for folder in ("mien", *PARTS.values()) for p in (ROOT / folder).rglob("*.py"))


def violations(files: list[Path], root: Path = ROOT) -> list[str]:
    bad = []
    for path in files:
        layer = layer_of(module_name(path, root))
        for line, target in imported_modules(path, root):
            where = f"{path.relative_to(root)}:{line} ({layer}) imports {target}"
            target_layer = layer_of(target)
            if target_layer == "outside":
                reason = FORBIDDEN_LIBRARIES.get(layer, {}).get(target.split(".")[0])
                if reason:
                    bad.append(f"{where}: {reason}")
            elif target_layer not in ("ground", layer) and target_layer not in ALLOWED[layer]:
                bad.append(where)
            elif layer == "ground" and target_layer != "ground":
                bad.append(where)
    return bad


def test_every_import_points_down():
    files = source_files()
    assert len(files) > 50  # the walk really sees the code
    assert not violations(files), "\n".join(violations(files))


@pytest.mark.parametrize(
    ("folder", "source", "expected"),
    [
        ("service", "from mien.training.models import create_model\n", "(mien.service) imports mien.training.models"),
        (
            "training",
            "def f():\n    from mien.service.registry import ModelRegistry\n",
            "imports mien.service.registry",
        ),
        ("training", "from mien import export\n", "imports mien.export"),
        ("mien", "from mien.export.evaluate import eval_split\n", "(ground) imports mien.export.evaluate"),
        ("mien", "import mien.cli\n", "(ground) imports mien.cli"),
        ("export", "from ...service import errors\n", "(mien.export) imports mien.service"),  # export/sub/ -> mien
        ("service", "import torch\n", "the service runs on onnxruntime alone"),
    ],
)
def test_a_wrong_way_import_is_caught(tmp_path, folder, source, expected):
    # A file placed in the checkout's layout (under a temporary root) is judged by its folder.
    fake = tmp_path / folder / "sub" / "mod.py"
    fake.parent.mkdir(parents=True)
    fake.write_text(source)
    found = violations([fake], tmp_path)
    assert len(found) == 1 and expected in found[0], found


def test_allowed_imports_pass(tmp_path):
    cases = {
        "export/a.py": "from mien.training.models import create_model\nfrom mien.card import read_card\n",
        "service/b.py": "from mien.runtime import OnnxClassifier\nimport numpy\n",
        "mien/c.py": "from mien.spec import PreprocessSpec\n",
        "mien/cli.py": "from mien.service.cli import add_commands\n",
    }
    files = []
    for rel, source in cases.items():
        path = tmp_path / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(source)
        files.append(path)
    assert violations(files, tmp_path) == []
