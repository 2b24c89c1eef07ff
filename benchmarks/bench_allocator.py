"""A training step under glibc's malloc and under a preloaded tcmalloc or jemalloc (docs/training.md, "The memory
allocator").

    .venv/bin/python benchmarks/bench_allocator.py --models sr_cnn --freeze-sr --rounds 4 \
        --model-kwargs '{"widths": [32, 64, 128, 256], "hidden": 256}'

glibc serves an allocation above its mmap threshold (at most 32 MB) with a fresh ``mmap`` and returns it with
``munmap`` when freed, so a model whose activations are that large (a batch of 64 of the SR arms' 32×96×96 maps is
75 MB) faults every page of them in again on every step; tcmalloc and jemalloc keep freed memory for the next step.
An allocator can only be chosen when a process starts (``LD_PRELOAD``), so each measurement is a fresh process
running the optimiser steps of ``bench_train_step.py`` (the training loop's, on random input), the allocators
taking turns round by round so that a machine shared with other work slows them alike. Reports the median step
as seconds per FER2013 epoch, and the share of the process's CPU time spent in the kernel. A benchmark, not a
test: its figures go to docs/training.md.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
#: The libraries tried, by the name the Debian packages install (libtcmalloc-minimal4, libjemalloc2).
LIBRARIES = {"tcmalloc": "libtcmalloc_minimal.so.4", "jemalloc": "libjemalloc.so.2"}
FER2013_TRAIN_IMAGES = 28_709


def find_library(name: str) -> str | None:
    """The path of a shared library from the loader's cache (``ldconfig -p``), if it is installed."""
    for ldconfig in ("ldconfig", "/sbin/ldconfig"):
        try:
            listing = subprocess.run([ldconfig, "-p"], capture_output=True, text=True, check=True).stdout
        except (OSError, subprocess.CalledProcessError):
            continue
        for line in listing.splitlines():
            if line.strip().startswith(name + " "):
                return line.rsplit("=>", 1)[-1].strip()
    return None


def worker(args: argparse.Namespace) -> None:
    """One process, one allocator: the step timings and the CPU time they took, as JSON on stdout."""
    import torch

    sys.path.insert(0, str(HERE))
    from bench_train_step import make_step

    from mien.machine import allocator

    torch.set_num_threads(args.threads)
    kwargs = json.loads(args.model_kwargs) if args.model_kwargs is not None else None
    step = make_step(args.model, args.batch_size, "channels-last", "none", crop=args.crop, kwargs=kwargs,
                     freeze_sr=args.freeze_sr)  # fmt: skip
    for _ in range(2):  # warm-up: oneDNN primitive creation, the allocator's first requests
        step()
    before, times = resource.getrusage(resource.RUSAGE_SELF), []
    for _ in range(args.steps):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    after = resource.getrusage(resource.RUSAGE_SELF)
    print(json.dumps({"allocator": allocator(), "step_seconds": times, "user": after.ru_utime - before.ru_utime,
                      "sys": after.ru_stime - before.ru_stime}))  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default="sr_cnn", help="comma-separated model ids")
    parser.add_argument("--allocators", default="glibc,tcmalloc,jemalloc", help="those installed are measured")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--steps", type=int, default=6, help="timed steps per process")
    parser.add_argument("--rounds", type=int, default=3, help="processes per allocator, taking turns")
    parser.add_argument("--crop", type=int, default=0, help="train on random crops of this size (the recipe's --crop)")
    parser.add_argument("--model-kwargs", default=None, help="JSON builder kwargs instead of the bundled ones")
    parser.add_argument("--freeze-sr", action="store_true", help="fix the SR front end (as the SR arms' first epochs)")
    parser.add_argument("--out", default=None, help="also write the figures here as JSON")
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)  # internal: one process's measurement
    args = parser.parse_args()
    if args.worker:
        args.model = args.worker
        worker(args)
        return

    from mien.machine import describe_cpu

    libraries: dict[str, str] = {}
    for name in args.allocators.split(","):
        path = "" if name == "glibc" else find_library(LIBRARIES[name])
        if path is None:
            print(f"{name}: {LIBRARIES[name]} is not installed, not measured")
        else:
            libraries[name] = path
    passed = ["--batch-size", str(args.batch_size), "--threads", str(args.threads), "--steps", str(args.steps),
              "--crop", str(args.crop)] + (["--freeze-sr"] if args.freeze_sr else []) \
        + (["--model-kwargs", args.model_kwargs] if args.model_kwargs is not None else [])  # fmt: skip
    environ = {k: v for k, v in os.environ.items() if k != "LD_PRELOAD"}
    results: dict = {"machine": describe_cpu(), "threads": args.threads, "batch_size": args.batch_size,
                     "steps": args.steps, "rounds": args.rounds, "models": {}}  # fmt: skip
    print(
        f"{describe_cpu()}; {args.threads} thread(s), batch {args.batch_size}, channels-last fp32; median step of "
        f"{args.rounds} processes per allocator × {args.steps} steps, the allocators taking turns\n"
    )
    print("| model | allocator | s/epoch | kernel share of CPU time | speed-up over glibc |\n|---|---|---|---|---|")
    for model in args.models.split(","):
        measured: dict[str, list[dict]] = {name: [] for name in libraries}
        for _ in range(args.rounds):
            for name, path in libraries.items():
                env = {**environ, **({"LD_PRELOAD": path} if path else {})}
                out = subprocess.run([sys.executable, __file__, "--worker", model, *passed], env=env, check=True,
                                     capture_output=True, text=True).stdout  # fmt: skip
                run = json.loads(out.strip().splitlines()[-1])
                if run["allocator"] != name:
                    raise SystemExit(f"{name}: the process ran on {run['allocator']} (LD_PRELOAD={path})")
                measured[name].append(run)
        rows = {}
        for name, runs in measured.items():
            step = statistics.median(t for r in runs for t in r["step_seconds"])
            kernel = sum(r["sys"] for r in runs) / sum(r["user"] + r["sys"] for r in runs)
            rows[name] = {"step_seconds": step, "s_per_epoch": step * FER2013_TRAIN_IMAGES / args.batch_size,
                          "kernel_share": kernel, "library": libraries[name] or None}  # fmt: skip
        base = rows.get("glibc", {}).get("step_seconds")
        for name, row in rows.items():
            row["speedup_over_glibc"] = base / row["step_seconds"] if base else None
            speedup = f"{row['speedup_over_glibc']:.2f}×" if base else "—"
            print(f"| {model} | {name} | {row['s_per_epoch']:.0f} | {row['kernel_share']:.0%} | {speedup} |")
        results["models"][model] = rows
    if args.out:
        Path(args.out).write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
