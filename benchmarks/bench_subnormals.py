"""How much subnormal floats in a run's weights slow its training step, and what flushing them to zero gives back
(docs/training.md, "Subnormal floats").

    .venv/bin/python benchmarks/bench_subnormals.py ~/mien-runs/converged_sgan/last.pt --threads 2

Counts the subnormal values (non-zero, below 1.2e-38 in fp32) in the checkpoint's weights and optimiser state,
then times a forward and backward pass of its network on a random batch, in fresh processes: with freshly
initialised weights and with the checkpoint's, each without and within ``flushing_denormals()`` (entered first, as
``mien train`` does, so that torch's threads inherit it). Prints the median seconds per step of each, and as a
control the machine's fp32 matrix-product rate (a slow CPU slows every row alike). Pause any training on the
machine first: the figures are a benchmark's, for docs and notes, not a test's.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys


def subnormals(tree) -> int:
    """The subnormal floats in a nest of dicts, lists and tensors."""
    import torch

    if isinstance(tree, torch.Tensor):
        if not tree.is_floating_point():
            return 0
        t = tree.float()
        return int(((t != 0) & (t.abs() < torch.finfo(torch.float32).tiny)).sum())
    if isinstance(tree, dict):
        return sum(subnormals(v) for v in tree.values())
    if isinstance(tree, (list, tuple)):
        return sum(subnormals(v) for v in tree)
    return 0


def worker(args: argparse.Namespace) -> None:
    """One process: the median seconds of a forward and backward pass, as JSON on stdout."""
    from contextlib import nullcontext

    from mien.training.hardware import flushing_denormals

    with flushing_denormals() if args.flush else nullcontext():  # first, before torch's thread pool exists
        print(json.dumps({"seconds": step_seconds(args)}))


def step_seconds(args: argparse.Namespace) -> float:
    import statistics
    import time

    import torch

    from mien.training.models import create_model

    torch.set_num_threads(args.threads)
    checkpoint = torch.load(args.checkpoint, map_location="cpu", weights_only=False)
    spec = checkpoint["spec"]
    kwargs = {"num_classes": len(spec["labels"]), **checkpoint.get("model_kwargs", {})}
    model = create_model(checkpoint["model_id"], **kwargs)
    if args.trained:
        model.load_state_dict(checkpoint["state_dict"])
    model.train()
    x = torch.randn(args.batch_size, 1, *spec["input_size"], generator=torch.Generator().manual_seed(0))
    times = []
    for i in range(args.steps + 2):
        start = time.perf_counter()
        model(x).float().logsumexp(1).sum().backward()
        if i >= 2:  # the first two warm up
            times.append(time.perf_counter() - start)
    return statistics.median(times)


def matmul_gflops(threads: int, side: int = 2048, repeats: int = 10) -> float:
    """The fp32 matrix-product rate of this CPU at ``threads`` threads: the control."""
    import time

    import torch

    torch.set_num_threads(threads)
    a, b = torch.randn(side, side), torch.randn(side, side)
    a @ b
    start = time.perf_counter()
    for _ in range(repeats):
        a @ b
    return 2 * side**3 * repeats / (time.perf_counter() - start) / 1e9


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoint", help="a run's last.pt or best.pt")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--trained", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--flush", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args)
        return
    import torch

    checkpoint = torch.load(args.checkpoint, map_location="cpu", weights_only=False)
    state = {k: v for k, v in checkpoint.items() if k in ("optimizer", "objective_state", "ema")}
    print(f"{args.checkpoint}: {subnormals(checkpoint['state_dict'])} subnormal weights, "
          f"{subnormals(state)} subnormal values in the optimiser and objective state")  # fmt: skip
    print(f"control: fp32 matrix product at {matmul_gflops(args.threads):.0f} GFLOPS ({args.threads} threads)")
    print(f"| weights | flush | s per forward and backward (batch {args.batch_size}, {args.threads} threads) |")
    print("|---|---|---|")
    for trained in (False, True):
        for flush in (False, True):
            command = [sys.executable, __file__, args.checkpoint, "--worker", "--threads", str(args.threads),
                       "--batch-size", str(args.batch_size), "--steps", str(args.steps)]  # fmt: skip
            command += ["--trained"] * trained + ["--flush"] * flush
            result = json.loads(subprocess.run(command, capture_output=True, text=True, check=True).stdout)
            print(f"| {'checkpoint' if trained else 'fresh'} | {'yes' if flush else 'no'} | {result['seconds']:.3f} |")


if __name__ == "__main__":
    main()
