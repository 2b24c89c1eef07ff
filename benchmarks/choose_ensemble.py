"""Greedy forward selection of ensemble members on a split (PublicTest by default).

    .venv/bin/python benchmarks/choose_ensemble.py [--models mini_xception,base_cnn,...] [--flip]

Scores every bundled model once (probabilities of the faces, and of their mirrors with --flip), then adds,
one at a time, the member that raises the averaged accuracy most, until none does, and also scores the
k most accurate models for every k (greedy stops at the first step that does not help; a larger set
can still). Prints each step; the chosen set then goes to `mien ensemble`, which measures it again
through the served code path. Selection
uses the validation split, so the ensemble's figure on that same split is optimistic by construction.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
from mien.training.evaluate import split_for_labels

from mien.runtime import OnnxClassifier


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model-dir", default="models")
    parser.add_argument("--models", default="", help="candidates (default: every models/*.onnx)")
    parser.add_argument("--data", default="../shared/data/fer2013.npz")
    parser.add_argument("--split", default="public_test")
    parser.add_argument("--flip", action="store_true")
    args = parser.parse_args()
    names = args.models.split(",") if args.models else sorted(p.stem for p in Path(args.model_dir).glob("*.onnx"))
    probs, labels = {}, None
    for name in names:
        clf = OnnxClassifier.from_path(Path(args.model_dir) / f"{name}.onnx", providers=("CPUExecutionProvider",))
        images, labels = split_for_labels(args.data, args.split, clf.spec.labels)
        p = clf.predict_crops(list(images))
        if args.flip:
            p = 0.5 * (p + clf.predict_crops([np.ascontiguousarray(im[:, ::-1]) for im in images]))
        probs[name] = p
        print(f"{name:24s} {np.mean(p.argmax(1) == labels):.4f}")
    chosen, best = [], 0.0
    while True:
        scores = {n: np.mean(sum(probs[m] for m in [*chosen, n]).argmax(1) == labels) for n in names if n not in chosen}
        if not scores:
            break
        name, score = max(scores.items(), key=lambda kv: kv[1])
        if score <= best:
            break
        chosen.append(name)
        best = score
        print(f"+ {name:22s} -> {score:.4f}  ({','.join(chosen)})")
    print("greedy members:", ",".join(chosen))
    ranked = sorted(names, key=lambda n: -np.mean(probs[n].argmax(1) == labels))
    top = {k: np.mean(sum(probs[m] for m in ranked[:k]).argmax(1) == labels) for k in range(2, len(ranked) + 1)}
    for k, score in top.items():
        print(f"top {k}: {score:.4f}  ({','.join(ranked[:k])})")
    k = max(top, key=top.get)
    if top[k] > best:
        print("best top-k members:", ",".join(ranked[:k]))


if __name__ == "__main__":
    main()
