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

    .venv/bin/python benchmarks/choose_ensemble.py --compare vgg_fer_seed1,sr_cnn,vgg_fer vgg_fer_ba,vgg_fer_seed1

compares named member sets instead, each with the weights `mien ensemble --weights fit` would give it: its
accuracy and NLL with equal weights, with weights fitted on all the split's faces (the ensemble's own figure,
optimistic), and cross-fitted (weights fitted on one stratified half score the other, five cuts: the figure
that compares sets without the weights' fit on the same faces); --out writes them as JSON.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from mien.export.ensemble_search import cross_fitted, greedy_members, member_probabilities, not_held_out, top_k
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
    parser.add_argument("--compare", nargs="+", default=[], metavar="SET", help="member sets (a,b,c) to compare")
    parser.add_argument("--out", default=None, help="with --compare: the figures as JSON")
    args = parser.parse_args()
    sets = [s.split(",") for s in args.compare]
    if sets:
        names = sorted({m for s in sets for m in s})
    elif args.models:
        names = args.models.split(",")
    else:
        names = sorted(p.stem for p in Path(args.model_dir).glob("*.onnx"))
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
    if sets:
        compare(sets, probs, truth, args)
        return
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


def compare(sets: list[list[str]], probs, truth, args: argparse.Namespace) -> None:
    """Each named set's equal-weight, fitted (in-sample) and cross-fitted figures, printed and as JSON."""
    missing = sorted({m for s in sets for m in s} - set(probs))
    if missing:
        raise SystemExit(f"not candidates on {args.split} (trained on its faces): {', '.join(missing)}")
    rows = []
    for members in sets:
        row = {"members": members, **cross_fitted(probs, members, truth)}
        rows.append(row)
        weights = " + ".join(f"{m} {w:.3f}" for m, w in zip(members, row["fitted_weights"], strict=True))
        print(
            f"{','.join(members)}: equal {row['equal_accuracy']:.4f} (NLL {row['equal_nll']:.4f}); "
            f"fitted {row['fitted_accuracy']:.4f} (NLL {row['fitted_nll']:.4f}; {weights}); "
            f"cross-fitted {row['cross_fitted_accuracy']:.4f} (NLL {row['cross_fitted_nll']:.4f})"
        )
    if args.out:
        meta = {
            "split": args.split,
            "faces": len(truth),
            "flip": args.flip,
            "cross_fit": "2 stratified halves, seeds 0-4",
        }
        Path(args.out).write_text(json.dumps({**meta, "sets": rows}, indent=1) + "\n")
        print("wrote", args.out)


if __name__ == "__main__":
    main()
