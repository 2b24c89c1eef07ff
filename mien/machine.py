"""What machine a measurement ran on, and how benchmarks time a call, for the figures that benchmarks and
`mien results` write."""

from __future__ import annotations

import os
import platform
import statistics
import time
from collections.abc import Callable
from pathlib import Path


def describe_cpu() -> str:
    """``<CPU model>, <n> cores`` (the model name from /proc/cpuinfo where there is one)."""
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{cpu}, {os.cpu_count()} cores"


#: Allocators that replace glibc's malloc when preloaded (``LD_PRELOAD``), by the file name of their library.
ALLOCATORS = ("tcmalloc", "jemalloc")


def allocator(maps: str | Path = "/proc/self/maps") -> str:
    """The memory allocator this process runs on: ``tcmalloc`` or ``jemalloc`` when one is loaded (preloaded with
    ``LD_PRELOAD``: docs/training.md, "The memory allocator"), else ``glibc`` (or ``unknown`` without /proc)."""
    try:
        text = Path(maps).read_text()
    except OSError:
        return "unknown"
    # a line: address, permissions, offset, device, inode, then the mapped file's path, if any
    libraries = {Path(fields[5]).name for fields in (line.split(maxsplit=5) for line in text.splitlines())
                 if len(fields) == 6}  # fmt: skip
    for name in ALLOCATORS:
        if any(library.startswith(f"lib{name}") for library in libraries):
            return name
    return "glibc"


def timed(fn: Callable[[], object], repeats: int, warmup: int = 3) -> list[float]:
    """Milliseconds of ``repeats`` calls of ``fn``, after ``warmup`` untimed calls (first runs allocate)."""
    for _ in range(warmup):
        fn()
    samples = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        samples.append((time.perf_counter() - start) * 1000.0)
    return samples


def median_ms(fn: Callable[[], object], repeats: int, warmup: int = 3) -> float:
    """The median of :func:`timed`."""
    return statistics.median(timed(fn, repeats, warmup))
