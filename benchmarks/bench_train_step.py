"""Training throughput of a registered model on this CPU: NCHW vs channels-last, fp32 vs bf16 autocast.

    .venv/bin/python benchmarks/bench_train_step.py --model mini_xception --threads 2

Prints seconds per FER2013 epoch (28,709 images) estimated from timed optimiser steps on random
input. A benchmark, not a test: its figures go to docs/training.md.
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F

from training.models import create_model, default_spec

FER2013_TRAIN_IMAGES = 28_709


def seconds_per_epoch(model_id: str, batch: int, channels_last: bool, bf16: bool, steps: int) -> float:
    spec = default_spec(model_id)
    model = create_model(model_id, num_classes=spec.num_classes)
    x = torch.randn(batch, spec.channels, *spec.input_size)
    if channels_last:
        model, x = model.to(memory_format=torch.channels_last), x.contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, spec.num_classes, (batch,))
    optimizer = torch.optim.Adam(model.parameters())

    def step() -> None:
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            loss = F.cross_entropy(model(x), y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    for _ in range(3):
        step()
    start = time.perf_counter()
    for _ in range(steps):
        step()
    return (time.perf_counter() - start) / steps * FER2013_TRAIN_IMAGES / batch


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="mini_xception")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--threads", type=int, default=0)
    parser.add_argument("--steps", type=int, default=30)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"{args.model}, batch {args.batch_size}, {torch.get_num_threads()} threads, torch {torch.__version__}")
    print("| layout | precision | s/epoch |\n|---|---|---|")
    for channels_last in (False, True):
        for bf16 in (False, True):
            s = seconds_per_epoch(args.model, args.batch_size, channels_last, bf16, args.steps)
            print(
                f"| {'channels-last' if channels_last else 'NCHW'} | {'bf16 autocast' if bf16 else 'fp32'} | {s:.0f} |"
            )


if __name__ == "__main__":
    main()
