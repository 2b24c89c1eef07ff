"""Which shift test-time augmentation (``mien export --shift-tta``) pays, measured on the validation split.

    .venv/bin/python benchmarks/shift_tta_val.py --models vgg_fer_seed1,vgg_fer --pixels 1 \
        --out docs/figures/shift_tta_val.json

Each bundled model answers every face of the split moved by each (dx, dy) of the 3×3 grid of --pixels (edge
pixels repeated into the uncovered border, as ``ShiftAverage`` does in the graph; the file's own flip averaging
and calibration included), once per move; the patterns of ``SHIFT_PATTERNS`` (grid, plus, cross) then average the
moves they hold. Prints and writes the accuracy of each pattern beside the unmoved face's. The choice of pattern
is made here, on faces carved from Training, never on the test split. A benchmark, not a test.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from mien.export.evaluate import eval_split
from mien.export.onnx_export import SHIFT_PATTERNS
from mien.paths import DEFAULT_DATA
from mien.runtime import OnnxClassifier


def moved(faces: np.ndarray, dx: int, dy: int, pad: int) -> np.ndarray:
    """The faces (N×H×W) moved right by dx and down by dy pixels, edge pixels repeated."""
    padded = np.pad(faces, ((0, 0), (pad, pad), (pad, pad)), mode="edge")
    height, width = faces.shape[1:]
    return padded[:, pad - dy : pad - dy + height, pad - dx : pad - dx + width]


def accuracy(probs: dict, keys: list[tuple[int, int]], truth: np.ndarray) -> float:
    """Accuracy of the probabilities summed over the moves ``keys``."""
    return float((sum(probs[k] for k in keys).argmax(1) == truth).mean())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default="vgg_fer_seed1,vgg_fer")
    parser.add_argument("--model-dir", default="models")
    parser.add_argument("--data", default=DEFAULT_DATA)
    parser.add_argument("--split", default="val")
    parser.add_argument("--pixels", type=int, default=1)
    parser.add_argument("--threads", type=int, default=0, help="onnxruntime threads (0: every core)")
    parser.add_argument("--out", default="", help="JSON file for the figures")
    args = parser.parse_args()
    moves = [(dx * args.pixels, dy * args.pixels) for dx, dy in SHIFT_PATTERNS["grid"]]
    results = {}
    for model_id in args.models.split(","):
        classifier = OnnxClassifier.from_path(Path(args.model_dir) / f"{model_id}.onnx", threads=args.threads,
                                              providers=("CPUExecutionProvider",))  # fmt: skip
        faces = eval_split(args.data, args.split, classifier.spec.labels)
        probs = {}
        for dx, dy in moves:
            probs[dx, dy] = classifier.predict_crops(list(moved(faces.images, dx, dy, args.pixels)))[:, faces.columns]
            right = float((probs[dx, dy].argmax(1) == faces.truth).mean())
            print(f"{model_id} moved ({dx:+d}, {dy:+d}): {100 * right:.2f}%", flush=True)

        row = {"faces": len(faces.truth), "none": accuracy(probs, [(0, 0)], faces.truth)}
        for pattern, unit in SHIFT_PATTERNS.items():
            row[pattern] = accuracy(probs, [(dx * args.pixels, dy * args.pixels) for dx, dy in unit], faces.truth)
        results[model_id] = row
        print(
            f"{model_id} on {args.split}: " + ", ".join(f"{k} {100 * v:.2f}%" for k, v in row.items() if k != "faces")
        )
    print(f"\n| model ({args.split}, {args.pixels} px) | none | " + " | ".join(SHIFT_PATTERNS) + " |")
    print("|---|---|" + "---|" * len(SHIFT_PATTERNS))
    for model_id, row in results.items():
        cells = [f"{100 * row[p]:.2f} ({100 * (row[p] - row['none']):+.2f})" for p in SHIFT_PATTERNS]
        print(f"| `{model_id}` | {100 * row['none']:.2f} | " + " | ".join(cells) + " |")
    if args.out:
        Path(args.out).write_text(json.dumps({"split": args.split, "pixels": args.pixels, "models": results},
                                             indent=1) + "\n")  # fmt: skip


if __name__ == "__main__":
    main()
