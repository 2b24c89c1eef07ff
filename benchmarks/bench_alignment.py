"""Does alignment help? Accuracy on rotated FER2013 PublicTest faces pasted into larger photos.

    .venv/bin/python benchmarks/bench_alignment.py [--model models/mini_xception.onnx] [--limit 600]
        [--detector yunet|mtcnn] [--angles -30 -15 0 15 30] [--data ../shared/data/fer2013.npz] [--json out.json]
    .venv/bin/python benchmarks/bench_alignment.py --fit-template [--detector yunet|mtcnn] [--limit 3000]

Each PublicTest face is upscaled ×3, rotated by each angle and pasted at a random place into a 320×320
noisy grey photo. The chosen detector (YuNet or MTCNN) finds it; the classifier then sees either the
detector's box grown by the model's crop margin (no alignment) or the aligned crop (``mien.service.align``).
Faces the detector misses count as wrong for both; the accuracy on the untouched 48×48 faces is printed for reference.

``--fit-template`` measures FER2013's framing in the detector's landmarks (``FER2013_TEMPLATE`` for MTCNN,
``FER2013_TEMPLATE_YUNET``) on *Training* faces instead, so that PublicTest stays unseen by every choice the
alignment makes.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import cv2
import numpy as np

from mien.paths import DEFAULT_DATA
from mien.runtime import OnnxClassifier
from mien.service.align import FaceTemplate, align_face
from mien.service.detectors import BUNDLED_DIR, FaceDetector
from mien.service.detectors.mtcnn import MtcnnDetector
from mien.service.detectors.yunet import YunetDetector
from mien.service.pipeline import crop_faces

CPU = ("CPUExecutionProvider",)
UPSCALE = 3


def load_split(path: str, split: int) -> tuple[np.ndarray, np.ndarray]:
    data = np.load(path)
    keep = data["split"] == split
    return data["images"][keep], data["labels"][keep]


def fit_template(detector: FaceDetector, faces: np.ndarray) -> tuple[FaceTemplate, np.ndarray, int]:
    """FER2013's framing, from the faces the detector finds: the median eye midpoint and eye distance, and
    the median detector box (x, y, w, h), all as fractions of the 48-pixel side."""
    pad = 48
    eyes, boxes = [], []
    for face in faces:
        big = cv2.resize(face, None, fx=UPSCALE, fy=UPSCALE, interpolation=cv2.INTER_CUBIC)
        big = cv2.copyMakeBorder(big, pad, pad, pad, pad, cv2.BORDER_REFLECT)
        found = detector.detect(cv2.cvtColor(big, cv2.COLOR_GRAY2BGR), min_face=60)
        if len(found):
            side = UPSCALE * 48.0
            left, right = (found.landmarks[0, :2] - pad) / side
            eyes.append([*((left + right) / 2.0), np.hypot(*(right - left))])
            boxes.append((found.boxes[0] - [pad, pad, 0, 0]) / side)
    x, y, d = np.median(np.asarray(eyes), axis=0)
    template = FaceTemplate(eye_x=round(float(x), 4), eye_y=round(float(y), 4), eye_distance=round(float(d), 4))
    return template, np.median(np.asarray(boxes), axis=0), len(eyes)


def make_photo(face: np.ndarray, angle: float, rng: np.random.Generator, side: int = 320) -> np.ndarray:
    """The face upscaled, rotated (border replicated, so no black corners) and pasted into a noisy photo."""
    big = cv2.resize(face, None, fx=UPSCALE, fy=UPSCALE, interpolation=cv2.INTER_CUBIC)
    size = big.shape[0]
    turned = cv2.warpAffine(big, cv2.getRotationMatrix2D((size / 2, size / 2), angle, 1.0), (size, size),
                            borderMode=cv2.BORDER_REPLICATE)  # fmt: skip
    photo = rng.normal(120, 20, (side, side)).clip(0, 255).astype(np.uint8)
    photo = cv2.GaussianBlur(photo, (0, 0), 3)
    x, y = rng.integers(0, side - size, size=2)
    photo[y : y + size, x : x + size] = turned
    return cv2.cvtColor(photo, cv2.COLOR_GRAY2BGR)


def evaluate(classifier: OnnxClassifier, detector: FaceDetector, faces: np.ndarray, labels: np.ndarray,
             angles: list[float], seed: int = 0) -> dict:  # fmt: skip
    rng = np.random.default_rng(seed)
    reference = float((classifier.predict_crops(list(faces)).argmax(1) == labels).mean())
    result = {"reference_48x48": reference, "faces": len(faces), "angles": {}}
    for angle in angles:
        plain, aligned, truth = [], [], []
        for face, label in zip(faces, labels, strict=True):
            photo = make_photo(face, angle, rng)
            found = detector.detect(photo)
            if not len(found):
                continue
            plain += crop_faces(photo, found.boxes[:1], classifier.spec.crop_margin)
            aligned.append(align_face(photo, found.landmarks[0], detector.template))
            truth.append(label)
        truth = np.asarray(truth)
        n = len(faces)

        def correct(crops: list[np.ndarray], truth: np.ndarray = truth) -> int:
            return int((classifier.predict_crops(crops).argmax(1) == truth).sum()) if crops else 0

        hits = max(len(truth), 1)
        box_ok, aligned_ok = correct(plain), correct(aligned)
        result["angles"][str(angle)] = row = {
            "detected": len(truth) / n,
            "accuracy_box_crop": box_ok / n,  # a missed face counts as wrong
            "accuracy_aligned": aligned_ok / n,
            "accuracy_box_crop_on_detected": box_ok / hits,
            "accuracy_aligned_on_detected": aligned_ok / hits,
        }
        print(f"angle {angle:+5.0f}°  detected {row['detected']:.3f}  accuracy (all / detected): "
              f"box crop {row['accuracy_box_crop']:.4f} / {row['accuracy_box_crop_on_detected']:.4f}  "
              f"aligned {row['accuracy_aligned']:.4f} / {row['accuracy_aligned_on_detected']:.4f}",
              flush=True)  # fmt: skip
    rows = result["angles"].values()
    result["mean_box_crop"] = float(np.mean([r["accuracy_box_crop"] for r in rows]))
    result["mean_aligned"] = float(np.mean([r["accuracy_aligned"] for r in rows]))
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="models/mini_xception.onnx", help="a classifier from `mien export`")
    parser.add_argument("--detector-dir", type=Path, default=BUNDLED_DIR, help="default: the checkout's")
    parser.add_argument("--data", default=DEFAULT_DATA)
    parser.add_argument("--limit", type=int, default=600, help="faces used (0 = all)")
    parser.add_argument("--angles", type=float, nargs="+", default=[-30, -15, 0, 15, 30])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--detector", choices=("yunet", "mtcnn"), default="yunet", help="the landmark detector")
    parser.add_argument("--fit-template", action="store_true", help="measure FER2013's framing on Training faces")
    parser.add_argument("--json", default=None)
    args = parser.parse_args()

    detector = {"yunet": YunetDetector, "mtcnn": MtcnnDetector}[args.detector].from_dir(args.detector_dir, CPU,
                                                                                        args.threads)  # fmt: skip
    if args.fit_template:
        faces, _ = load_split(args.data, 0)
        faces = faces[np.random.default_rng(0).permutation(len(faces))[: args.limit or None]]
        template, box, used = fit_template(detector, faces)
        print(f"{template} from {used} of {len(faces)} Training faces (current: {detector.template}); "
              f"median detector box x, y, w, h: {np.round(box, 3).tolist()}")  # fmt: skip
        return
    faces, labels = load_split(args.data, 1)
    if args.limit:
        faces, labels = faces[: args.limit], labels[: args.limit]
    classifier = OnnxClassifier.from_path(args.model, CPU, args.threads)
    result = evaluate(classifier, detector, faces, labels, args.angles)
    result["model"] = str(args.model)
    result["detector"] = args.detector
    print(f"reference (48×48 faces as given): {result['reference_48x48']:.4f}; mean over angles: "
          f"box crop {result['mean_box_crop']:.4f}, aligned {result['mean_aligned']:.4f}")  # fmt: skip
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
