"""Face detection, ONNX detector (MTCNN) against the Haar cascade, on package photos and composites.

    .venv/bin/python benchmarks/bench_detect.py [--detector-dir models/detector] [--threads 1]
        [--threshold 0.9] [--min-face 20] [--json out.json] [--card] [--draw out_dir]

Prints per photo: faces found / expected, false faces and ms per image for each detector, the totals,
and the median ms per 640×480 photo. ``--card`` stores the totals in the detector's model card.
The photos and the matching rule are in ``benchmarks/detect_photos.py``.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path

import cv2
import numpy as np
from detect_photos import FACE_BOXES, Photo, all_photos, match, real_photo

from mien.machine import median_ms
from mien.service.detectors import BUNDLED_DIR, FaceDetector
from mien.service.detectors.haar import HaarFaceDetector
from mien.service.detectors.mtcnn import MtcnnDetector

CPU = ("CPUExecutionProvider",)


def photo_640x480() -> Photo:
    """The astronaut photo letterboxed into 640×480: an ordinary camera frame with one face."""
    canvas = np.full((480, 640, 3), 128, np.uint8)
    face = cv2.resize(real_photo("astronaut"), (480, 480), interpolation=cv2.INTER_AREA)
    canvas[:, 80:560] = face
    x, y, w, h = FACE_BOXES["astronaut"][0]
    s = 480 / 512
    return Photo("astronaut 640×480", canvas, [(80 + x * s, y * s, w * s, h * s)])


def run(detectors: dict[str, FaceDetector], photos: list[Photo], repeats: int, min_face: int, threshold: float,
        draw: Path | None) -> list[dict]:  # fmt: skip
    rows = []
    for photo in photos:
        row = {"photo": photo.name, "expected": len(photo.faces)}
        for name, detector in detectors.items():
            found = detector.detect(photo.image, min_face=min_face, threshold=threshold)
            hits, false = match(found.boxes, photo.faces)
            call = lambda d=detector, im=photo.image: d.detect(im, min_face=min_face, threshold=threshold)  # noqa: E731
            ms = median_ms(call, repeats, warmup=1)
            row[name] = {"found": hits, "false": false, "ms": round(ms, 1)}
            if draw is not None:
                _draw(photo, found, draw / f"{name}-{photo.name.replace(' ', '_')}.jpg")
        rows.append(row)
    return rows


def _draw(photo: Photo, found, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    image = photo.image.copy()
    for x, y, w, h in photo.faces:
        cv2.rectangle(image, (int(x), int(y)), (int(x + w), int(y + h)), (0, 255, 0), 1)
    for i, (x, y, w, h) in enumerate(found.boxes):
        cv2.rectangle(image, (int(x), int(y)), (int(x + w), int(y + h)), (0, 0, 255), 2)
        if found.landmarks is not None:
            for px, py in found.landmarks[i]:
                cv2.circle(image, (int(px), int(py)), 2, (255, 255, 0), -1)
    cv2.imwrite(str(path), image)


def table(rows: list[dict], names: list[str]) -> str:
    head = "| photo | faces | " + " | ".join(f"{n} found | {n} false | {n} ms" for n in names) + " |"
    lines = [head, "|" + "---|" * (2 + 3 * len(names))]
    for r in rows:
        cells = " | ".join(f"{r[n]['found']}/{r['expected']} | {r[n]['false']} | {r[n]['ms']:.1f}" for n in names)
        lines.append(f"| {r['photo']} | {r['expected']} | {cells} |")
    totals = totals_of(rows, names)
    cells = " | ".join(f"**{t['found']}/{t['expected']}** | **{t['false']}** | {t['ms_mean']:.1f}"
                       for t in totals.values())  # fmt: skip
    lines.append(f"| **total** | {rows and sum(r['expected'] for r in rows)} | {cells} |")
    return "\n".join(lines)


def totals_of(rows: list[dict], names: list[str]) -> dict[str, dict]:
    return {
        n: {
            "found": sum(r[n]["found"] for r in rows),
            "expected": sum(r["expected"] for r in rows),
            "false": sum(r[n]["false"] for r in rows),
            "ms_mean": round(statistics.mean(r[n]["ms"] for r in rows), 1),
        }
        for n in names
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--detector-dir", type=Path, default=BUNDLED_DIR, help="default: the checkout's")
    parser.add_argument("--threads", type=int, default=1, help="onnxruntime intra-op threads (0 = its choice)")
    parser.add_argument("--threshold", type=float, default=None, help="final score (default: the detector's)")
    parser.add_argument("--min-face", type=int, default=20, help="smallest face searched, pixels")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--json", default=None, help="also write the results here")
    parser.add_argument("--card", action="store_true", help="store the totals in <detector-dir>/mtcnn.card.json")
    parser.add_argument("--draw", default=None, help="folder for images with boxes drawn (green: truth)")
    args = parser.parse_args()

    onnx = MtcnnDetector.from_dir(args.detector_dir, CPU, args.threads)
    threshold = onnx.threshold if args.threshold is None else args.threshold
    # Haar may search as small as the ONNX detector, so that the 24-pixel faces are a fair test for both.
    detectors: dict[str, FaceDetector] = {"onnx": onnx, "haar": HaarFaceDetector(min_size=min(30, args.min_face))}
    rows = run(detectors, all_photos(), args.repeats, args.min_face, threshold, Path(args.draw) if args.draw else None)
    frame = photo_640x480()
    per_frame = {n: round(median_ms(lambda d=d: d.detect(frame.image, min_face=args.min_face, threshold=threshold),
                                    20, warmup=1), 1)
                 for n, d in detectors.items()}  # fmt: skip
    print(table(rows, list(detectors)))
    threads = args.threads or "default"
    print(f"\nms per 640×480 photo (median of 20, {threads} onnxruntime thread(s), {platform.machine()}):",
          ", ".join(f"{n} {ms:.1f}" for n, ms in per_frame.items()))  # fmt: skip
    result = {
        "settings": {"threshold": threshold, "min_face": args.min_face, "threads": args.threads},
        "totals": totals_of(rows, list(detectors)),
        "ms_per_640x480": per_frame,
        "rows": rows,
        "command": "benchmarks/bench_detect.py" + (f" --threads {args.threads}" if args.threads != 1 else ""),
        "date": time.strftime("%Y-%m-%d"),
    }
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
    if args.card:
        card_path = Path(args.detector_dir) / "mtcnn.card.json"
        card = json.loads(card_path.read_text())
        card["benchmark"] = {k: result[k] for k in ("settings", "totals", "ms_per_640x480", "command", "date")}
        card_path.write_text(json.dumps(card, indent=2) + "\n")


if __name__ == "__main__":
    main()
