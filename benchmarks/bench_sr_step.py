"""Seconds per training step of the SR front end's pre-training (`mien pretrain-sr`), by layout and precision.

    .venv/bin/python benchmarks/bench_sr_step.py [--threads 2] [--steps 8] [--blocks 4] [--features 32]

One step = what `training.sr_pretrain.l1_step` does on a batch of 64 random 48x48 faces (x2 area downscale, EDSR,
L1, Adam), NCHW or channels-last, fp32 or bf16 autocast; the median of the steps after two warm-up steps is
printed. docs/training.md ("SR pre-training, measured") has the figures of the 2-core AMD EPYC.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from mien.training.layers import EDSR
from mien.training.sr_pretrain import l1_step


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--blocks", type=int, default=4)
    parser.add_argument("--features", type=int, default=32)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    for layout in (torch.contiguous_format, torch.channels_last):
        for amp in ("none", "bf16"):
            torch.manual_seed(0)
            sr = EDSR(1, num_blocks=args.blocks, features=args.features).to(memory_format=layout)
            optimizer = torch.optim.Adam(sr.parameters(), lr=1e-4)
            hr = torch.randn(args.batch_size, 1, 48, 48).contiguous(memory_format=layout)
            times = []
            for _ in range(args.steps + 2):
                started = time.perf_counter()
                l1_step(sr, optimizer, hr, amp)
                times.append(time.perf_counter() - started)
            name = "channels-last" if layout is torch.channels_last else "NCHW"
            print(f"{name:13s} {amp:4s}  {statistics.median(times[2:]):.3f} s/step")


if __name__ == "__main__":
    main()
