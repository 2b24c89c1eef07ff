"""The real server's resident memory over a long load: does it level off, or climb?

    .venv/bin/python benchmarks/bench_memory.py [--rounds 15] [--per-round 2000] [--concurrency 32]
        [--setting detector=yunet --setting threads=1 ...]

Starts ``mien serve`` (``benchmarks/server_load.py``'s server), sends ``--rounds`` × ``--per-round``
POST /predict requests of the package photos in turn at ``--concurrency``, and prints VmRSS after each
round, with the least-squares slope in MB per 1000 requests (a leak climbs; allocator pools level off).
"""

from __future__ import annotations

import argparse
import asyncio
from pathlib import Path

import numpy as np
from server_load import ROOT, jpeg, load, photos, rss_mb, server


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", type=Path, default=ROOT / "models")
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--per-round", type=int, default=2000)
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--setting", action="append", default=["threads=1"], help="a MIEN_ setting, key=value")
    parser.add_argument("--server-log", type=Path, default=Path("/tmp/mien-bench-memory.log"))
    args = parser.parse_args()
    if args.rounds < 2 or args.per_round < 1:
        parser.error("--rounds must be at least 2 (a slope needs two points) and --per-round at least 1")
    env = dict(item.split("=", 1) for item in args.setting)
    bodies = [(name, jpeg(image)) for name, image in photos()]
    with server(args.models, args.server_log, **env) as (url, pid):
        print(f"settings {env}; VmRSS at start {rss_mb(pid):.1f} MB", flush=True)
        sent, samples = [], []
        for round_ in range(args.rounds):
            result = asyncio.run(load(url, bodies, args.concurrency, args.per_round, desc=f"round {round_ + 1}"))
            bad = sum(n for status, n in result["statuses"].items() if status != 200)
            sent.append((round_ + 1) * args.per_round)
            samples.append(rss_mb(pid))
            print(f"after {sent[-1]} requests: VmRSS {samples[-1]:.1f} MB ({bad} not 200)", flush=True)
    slope = np.polyfit(np.array(sent) / 1000.0, samples, 1)[0]
    half = len(samples) // 2
    first, second = np.mean(samples[:half]), np.mean(samples[half:])
    print(f"slope {slope:+.2f} MB per 1000 requests; mean of the first half {first:.1f} MB, of the second "
          f"{second:.1f} MB; range {min(samples):.1f}-{max(samples):.1f} MB")  # fmt: skip


if __name__ == "__main__":
    main()
