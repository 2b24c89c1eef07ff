"""One import name: the wheel installs only `mien`; training/, export/ and service/ go in as its subpackages.

The wheel is built from a copy of exactly what the Dockerfile copies, so the checkout gets no build/ or
*.egg-info and the image's build context is checked too.
"""

from __future__ import annotations

import ast
import importlib.metadata
import shutil
import subprocess
import sys
import tomllib
import zipfile
from pathlib import Path

import pytest
from packaging.requirements import Requirement

ROOT = Path(__file__).resolve().parents[1]
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))
# Folder on disk -> import name; mien/ is itself.
MAPPED = {"export": "mien.export", "service": "mien.service", "training": "mien.training"}
OLD_NAMES = set(MAPPED)


def _packages_on_disk() -> list[str]:
    found = []
    for folder, name in {"mien": "mien", **MAPPED}.items():
        for init in sorted((ROOT / folder).rglob("__init__.py")):
            if "__pycache__" not in init.parts:
                rel = init.parent.relative_to(ROOT / folder).parts
                found.append(".".join((name, *rel)))
    return sorted(found)


def _setuptools_is_new_enough() -> bool:
    (req,) = [Requirement(r) for r in PYPROJECT["build-system"]["requires"] if r.startswith("setuptools")]
    try:
        return req.specifier.contains(importlib.metadata.version("setuptools"), prereleases=True)
    except importlib.metadata.PackageNotFoundError:
        return False


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> zipfile.ZipFile:
    src = tmp_path_factory.mktemp("src")
    for name in ("pyproject.toml", "README.md"):
        shutil.copy2(ROOT / name, src / name)
    for folder in ("mien", *MAPPED):
        shutil.copytree(ROOT / folder, src / folder, ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
    out = tmp_path_factory.mktemp("wheel")
    # Offline with the environment's setuptools when it meets build-system.requires; else pip fetches one.
    isolation = ["--no-build-isolation"] if _setuptools_is_new_enough() else []
    cmd = [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", *isolation, "-w", str(out), str(src)]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    (path,) = out.glob("mien-*.whl")
    with zipfile.ZipFile(path) as z:
        yield z


def test_the_wheel_installs_one_top_level_package(wheel):
    names = wheel.namelist()
    assert {n.split("/")[0] for n in names if ".dist-info/" not in n} == {"mien"}
    (top_level,) = [n for n in names if n.endswith(".dist-info/top_level.txt")]
    assert wheel.read(top_level).decode().split() == ["mien"]


def test_the_wheel_holds_every_module_and_the_web_page(wheel):
    names = set(wheel.namelist())
    static = sorted(p.name for p in (ROOT / "service" / "static").iterdir() if p.is_file())
    assert static and {f"mien/service/static/{f}" for f in static} <= names
    for folder in ("mien", *MAPPED):
        for py in (ROOT / folder).rglob("*.py"):
            if "__pycache__" not in py.parts:
                rel = py.relative_to(ROOT / folder).as_posix()
                assert (f"mien/{rel}" if folder == "mien" else f"mien/{folder}/{rel}") in names


def test_package_list_matches_the_folders_on_disk():
    setup = PYPROJECT["tool"]["setuptools"]
    assert sorted(setup["packages"]) == _packages_on_disk()
    assert setup["package-dir"] == {name: folder for folder, name in MAPPED.items()}
    assert "mien.service" in setup["package-data"]


def test_editable_install_maps_the_folders():
    """The installed mien (editable here) finds each part in its top-level folder, not a stale copy."""
    import mien.export
    import mien.service
    import mien.training

    for folder, module in (("export", mien.export), ("service", mien.service), ("training", mien.training)):
        assert Path(module.__file__).resolve() == ROOT / folder / "__init__.py", module.__file__


def test_no_code_imports_the_old_top_level_names():
    """pytest puts the checkout on sys.path, where `import service` would still work; the wheel has no such name."""
    bad = []
    for folder in ("mien", *MAPPED, "tests", "benchmarks", "scripts"):
        for py in sorted((ROOT / folder).rglob("*.py")):
            for node in ast.walk(ast.parse(py.read_text(encoding="utf-8"), str(py))):
                if isinstance(node, ast.Import):
                    names = [a.name for a in node.names]
                elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                    names = [node.module]
                else:
                    continue
                bad += [f"{py.relative_to(ROOT)}:{node.lineno} {n}" for n in names if n.split(".")[0] in OLD_NAMES]
    assert not bad, bad
