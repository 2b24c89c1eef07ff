"""What machine a measurement ran on, for the figures that benchmarks and `mien results` write."""

from __future__ import annotations

import os
import platform
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
