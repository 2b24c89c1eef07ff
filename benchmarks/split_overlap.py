"""How many faces of the validation split and of PublicTest are copies of the faces training fits, and what
those copies do to accuracy and calibration.

    .venv/bin/python benchmarks/split_overlap.py [--models vgg_fer,mini_xception_kd] [--out FILE.json]

FER2013 holds 1,516 groups of exact duplicates (../shared/data/README.md), and PublicTest shares some with
Training. The validation split is carved from Training face by face (training/data.py), so a face there can
have a copy among the faces training fits; so can a PublicTest face. If one split held many more copies than
the other, a model would look better (and a calibration fitted there would be more confident) on that split
for a reason that is not the model. Printed and written per split: the share of faces with an exact copy
(same pixels) and with a near copy (cosine similarity of the mean-removed 16×16 thumbnails above
``--near``) among the fitting faces; and, per bundled model held out from the validation split (by its card),
accuracy and mean top probability on the faces with and without a copy, and how far accuracy falls from val to
PublicTest (all faces, and the faces without a copy) with its 95% bootstrap interval, each split resampled on its
own: whether the drop is more than two samples of these sizes differ by chance.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from mien.ensemble import load_classifier
from mien.export.ensemble_search import not_held_out
from mien.export.stats import independent_bootstrap_diff
from mien.paths import DEFAULT_DATA
from mien.training.data import CARVED_SPLIT, load_with_validation

SPLITS = (CARVED_SPLIT, "public_test")


def thumbnails(images: np.ndarray, pool: int = 3) -> np.ndarray:
    """Mean-removed, unit-length thumbnails (48×48 → 16×16 by ``pool``×``pool`` averaging), one row per face."""
    n, h, w = images.shape
    small = images.astype(np.float32).reshape(n, h // pool, pool, w // pool, pool).mean(axis=(2, 4)).reshape(n, -1)
    small -= small.mean(axis=1, keepdims=True)
    return small / (np.linalg.norm(small, axis=1, keepdims=True) + 1e-6)


def nearest_similarity(query: np.ndarray, reference: np.ndarray, chunk: int = 4096) -> np.ndarray:
    """For each row of ``query``, its largest cosine similarity to a row of ``reference`` (both unit rows)."""
    best = np.full(len(query), -1.0, dtype=np.float32)
    for start in range(0, len(reference), chunk):
        best = np.maximum(best, (query @ reference[start : start + chunk].T).max(axis=1))
    return best


def overlap(data, split: str, near: float) -> dict[str, np.ndarray]:
    """Masks over ``split``'s faces: an exact copy, a near copy among the faces training fits."""
    fitting = data.images[data.split == "train"]
    faces = data.images[data.split == split]
    exact_keys = {image.tobytes() for image in fitting}
    exact = np.array([image.tobytes() in exact_keys for image in faces])
    similar = nearest_similarity(thumbnails(faces), thumbnails(fitting)) >= near
    return {"exact": exact, "near": similar | exact}


def subset_scores(probs: np.ndarray, truth: np.ndarray, mask: np.ndarray) -> dict:
    """Faces, accuracy and mean top probability of the faces under ``mask``."""
    if not mask.any():
        return {"faces": 0}
    top = probs[mask]
    return {
        "faces": int(mask.sum()),
        "accuracy": float((top.argmax(1) == truth[mask]).mean()),
        "mean_confidence": float(top.max(1).mean()),
    }


def accuracy_drop(correct: dict[str, np.ndarray], masks: dict[str, np.ndarray]) -> dict:
    """Val accuracy less PublicTest accuracy, in points, on the faces under each split's mask, with the 95%
    bootstrap interval of that drop (the two splits are different faces: each is resampled on its own)."""
    val, test = (correct[split][masks[split]] for split in SPLITS)
    low, high = independent_bootstrap_diff(test, val)
    return {"points": 100 * float(val.mean() - test.mean()), "ci95": [100 * low, 100 * high]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default=DEFAULT_DATA)
    parser.add_argument("--model-dir", default="models")
    parser.add_argument("--models", default="", help="default: every models/*.onnx held out from the val split")
    parser.add_argument("--near", type=float, default=0.95, help="cosine similarity of thumbnails for a near copy")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", default="docs/figures/split_overlap.json")
    args = parser.parse_args()
    data = load_with_validation(args.data)
    masks = {split: overlap(data, split, args.near) for split in SPLITS}
    result: dict = {"near_similarity": args.near, "splits": {}, "models": {}}
    for split, mask in masks.items():
        row = {"faces": len(mask["exact"]), **{f"{kind}_share": float(m.mean()) for kind, m in mask.items()}}
        result["splits"][split] = row
        print(f"{split:<12} {row['faces']:5d} faces: exact copy in training {100 * row['exact_share']:.1f}%, "
              f"near copy {100 * row['near_share']:.1f}%")  # fmt: skip
    names = args.models.split(",") if args.models else sorted(p.stem for p in Path(args.model_dir).glob("*.onnx"))
    for name, why in not_held_out(args.model_dir, names, CARVED_SPLIT).items():
        print(f"left out {name}: {why}")
        names.remove(name)
    for name in names:
        classifier = load_classifier(Path(args.model_dir) / f"{name}.onnx", threads=args.threads)
        rows, correct = {}, {}
        for split in SPLITS:
            faces = data.images[data.split == split]
            truth = data.labels[data.split == split]
            probs = classifier.predict_crops(list(faces))
            near = masks[split]["near"]
            correct[split] = probs.argmax(1) == truth
            rows[split] = {"all": subset_scores(probs, truth, np.ones_like(near)),
                           "near_copy": subset_scores(probs, truth, near),
                           "no_copy": subset_scores(probs, truth, ~near)}  # fmt: skip
            print(f"{name:<18} {split:<12} " + "  ".join(
                f"{part} {100 * r['accuracy']:.1f}% (conf {100 * r['mean_confidence']:.1f}%)"
                for part, r in rows[split].items() if r["faces"]))  # fmt: skip
        for part, pick in (("all", lambda m: np.ones_like(m)), ("no_copy", lambda m: ~m)):
            drop = accuracy_drop(correct, {split: pick(masks[split]["near"]) for split in SPLITS})
            rows[f"drop_{part}"] = drop
            print(f"{name:<18} val - public_test, {part}: {drop['points']:+.2f} points "
                  f"[{drop['ci95'][0]:+.2f}, {drop['ci95'][1]:+.2f}]")  # fmt: skip
        result["models"][name] = rows
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
