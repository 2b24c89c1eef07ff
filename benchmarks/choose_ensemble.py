"""Greedy forward selection of ensemble members on a split (the validation split carved from Training
by default: the test split, PublicTest, never chooses).

    .venv/bin/python benchmarks/choose_ensemble.py [--models mini_xception,base_cnn,...] [--flip]

Candidates are the bundled models whose cards say the split was held out from their training (the others
are listed and left out: their figure on faces they trained on would win them a place; --all keeps them).
Scores every candidate once (probabilities of the faces, and of their mirrors with --flip), then adds,
one at a time, the member that raises the averaged accuracy most, until none does, and also scores the
k most accurate models for every k (greedy stops at the first step that does not help; a larger set
can still). Prints each step; the chosen set then goes to `mien ensemble`, which measures it again
through the served code path. Selection
uses the validation split, so the ensemble's figure on that same split is optimistic by construction.
The search itself is mien.export.ensemble_search; this script prints it.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from mien.export.ensemble_search import greedy_members, member_probabilities, not_held_out, top_k
from mien.paths import DEFAULT_DATA


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model-dir", default="models")
    parser.add_argument("--models", default="", help="candidates (default: every models/*.onnx)")
    parser.add_argument("--data", default=DEFAULT_DATA)
    parser.add_argument("--split", default="val")
    parser.add_argument("--flip", action="store_true")
    parser.add_argument("--all", action="store_true", help="keep candidates that trained on --split's faces")
    parser.add_argument("--cache", default=None, help="a folder keeping unchanged models' probabilities between runs")
    args = parser.parse_args()
    names = args.models.split(",") if args.models else sorted(p.stem for p in Path(args.model_dir).glob("*.onnx"))
    if not args.all:
        for name, why in not_held_out(args.model_dir, names, args.split).items():
            print(f"left out {name}: {why}")
            names.remove(name)
    if not names:
        parser.error(f"no candidate has {args.split} held out from its training")
    probs, truth = member_probabilities(
        args.model_dir, names, args.data, args.split, args.flip,
        on_model=lambda n, acc: print(f"{n:24s} {acc:.4f}"), cache=args.cache,
    )  # fmt: skip
    chosen: list[str] = []
    best = 0.0
    for name, score in greedy_members(probs, truth):
        chosen.append(name)
        best = score
        print(f"+ {name:22s} -> {score:.4f}  ({','.join(chosen)})")
    print("greedy members:", ",".join(chosen))
    ranked, top = top_k(probs, truth)
    for k, score in top.items():
        print(f"top {k}: {score:.4f}  ({','.join(ranked[:k])})")
    k = max(top, key=top.get)
    if top[k] > best:
        print("best top-k members:", ",".join(ranked[:k]))


if __name__ == "__main__":
    main()
