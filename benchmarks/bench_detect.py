"""Face detection: YuNet, MTCNN and the Haar cascade on package photos and composites.

    .venv/bin/python benchmarks/bench_detect.py [--detector-dir models/detector] [--threads 1]
        [--threshold T] [--min-face 20] [--json out.json] [--card] [--draw out_dir]

Prints per photo: faces found / expected, false faces and ms per image for each detector, the totals,
recall on the hard groups (±30° rotations, 24-pixel faces, occluded mouths), and ms per image at
512×512, 640×480, 1920×1080 and 4000×3000, both at full resolution and as the service runs it (on a copy
of at most ``--detect-max-pixels`` pixels, boxes mapped back). Each detector uses its own score threshold
unless ``--threshold`` is given. ``--card`` stores the figures in each detector's model card.
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
from detect_photos import FACE_BOXES, Photo, all_photos, match, phone_photo, real_photo

from mien.machine import median_ms
from mien.service.config import Settings
from mien.service.detectors import BUNDLED_DIR, FaceDetector
from mien.service.detectors.haar import HaarFaceDetector
from mien.service.detectors.mtcnn import MtcnnDetector
from mien.service.detectors.yunet import YunetDetector
from mien.service.imaging import Photo as Decoded
from mien.service.pipeline import detect_in_photo

CPU = ("CPUExecutionProvider",)


def photo_640x480() -> Photo:
    """The astronaut photo letterboxed into 640×480: an ordinary camera frame with one face."""
    canvas = np.full((480, 640, 3), 128, np.uint8)
    face = cv2.resize(real_photo("astronaut"), (480, 480), interpolation=cv2.INTER_AREA)
    canvas[:, 80:560] = face
    x, y, w, h = FACE_BOXES["astronaut"][0]
    s = 480 / 512
    return Photo("astronaut 640×480", canvas, [(80 + x * s, y * s, w * s, h * s)])


#: The hard groups of the benchmark, by a word of the photo's name.
GROUPS = {"rotated ±30°": "rotated", "24-px faces": "24 px", "occluded mouth": "occluded"}


def sized_photos() -> list[Photo]:
    """One photo per size the issue measures: 512×512, 640×480, 1920×1080 (full HD frame) and 4000×3000."""
    astronaut = Photo("512×512", real_photo("astronaut"), [tuple(map(float, FACE_BOXES["astronaut"][0]))])
    return [astronaut, photo_640x480(), phone_photo(1920, 1080, face_px=260, at=(800, 300)), phone_photo()]


def run(detectors: dict[str, FaceDetector], photos: list[Photo], repeats: int, min_face: int,
        threshold: float | None, draw: Path | None) -> list[dict]:  # fmt: skip
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


def recall_by_group(rows: list[dict], names: list[str]) -> dict[str, dict[str, str]]:
    """Faces found / expected per detector in each hard group."""
    out = {}
    for group, word in GROUPS.items():
        chosen = [r for r in rows if word in r["photo"]]
        out[group] = {n: f"{sum(r[n]['found'] for r in chosen)}/{sum(r['expected'] for r in chosen)}" for n in names}
    return out


def by_size(detectors: dict[str, FaceDetector], min_face: int, threshold: float | None, max_pixels: int,
            repeats: int) -> list[dict]:  # fmt: skip
    """ms per image at each size, at full resolution and as served (a copy of at most ``max_pixels``)."""
    rows = []
    for photo in sized_photos():
        height, width = photo.image.shape[:2]
        row = {"size": f"{width}×{height}", "faces": len(photo.faces)}
        times = repeats if width * height < 1_000_000 else max(2, repeats // 4)  # MTCNN takes seconds on 12 MP
        decoded = Decoded(photo.image, width, height)
        for name, detector in detectors.items():

            def full(d=detector, image=photo.image):
                return d.detect(image, min_face=min_face, threshold=threshold)

            def served(d=detector, image=decoded):
                return detect_in_photo(image, d, max_pixels, min_face, threshold)[0]

            row[name] = {"full_ms": round(median_ms(full, times, warmup=1), 1),
                         "served_ms": round(median_ms(served, times, warmup=0), 1),
                         "served_found": match(served().boxes, photo.faces)[0]}  # fmt: skip
        rows.append(row)
    return rows


def size_table(rows: list[dict], names: list[str], max_pixels: int) -> str:
    head = "| image | " + " | ".join(f"{n} ms full | {n} ms served" for n in names) + " |"
    lines = [head, "|" + "---|" * (1 + 2 * len(names))]
    for r in rows:
        cells = " | ".join(f"{r[n]['full_ms']:.1f} | {r[n]['served_ms']:.1f} ({r[n]['served_found']}/{r['faces']})"
                           for n in names)  # fmt: skip
        lines.append(f"| {r['size']} | {cells} |")
    return "\n".join(lines) + f"\n\nserved: on a copy of at most {max_pixels:,} pixels, boxes mapped back (faces found)"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--detector-dir", type=Path, default=BUNDLED_DIR, help="default: the checkout's")
    parser.add_argument("--threads", type=int, default=1, help="onnxruntime intra-op threads (0 = its choice)")
    parser.add_argument("--threshold", type=float, default=None, help="final score (default: the detector's)")
    parser.add_argument("--min-face", type=int, default=20, help="smallest face searched, pixels")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--json", default=None, help="also write the results here")
    parser.add_argument("--card", action="store_true", help="store the figures in each detector's card")
    parser.add_argument("--draw", default=None, help="folder for images with boxes drawn (green: truth)")
    parser.add_argument(
        "--detect-max-pixels",
        type=int,
        default=Settings.model_fields["detect_max_pixels"].default,
        help="the service's detection copy size for the 'served' timings (default: the setting's)",
    )
    args = parser.parse_args()

    mtcnn = MtcnnDetector.from_dir(args.detector_dir, CPU, args.threads)
    yunet = YunetDetector.from_dir(args.detector_dir, CPU, args.threads)
    # Haar may search as small as the ONNX detectors, so that the 24-pixel faces are a fair test for it too.
    detectors: dict[str, FaceDetector] = {"yunet": yunet, "mtcnn": mtcnn,
                                          "haar": HaarFaceDetector(min_size=min(30, args.min_face))}  # fmt: skip
    names = list(detectors)
    rows = run(detectors, all_photos(), args.repeats, args.min_face, args.threshold,
               Path(args.draw) if args.draw else None)  # fmt: skip
    frame = photo_640x480()
    per_frame = {n: round(median_ms(lambda d=d: d.detect(frame.image, min_face=args.min_face,
                                                         threshold=args.threshold), 20, warmup=1), 1)
                 for n, d in detectors.items()}  # fmt: skip
    sizes = by_size(detectors, args.min_face, args.threshold, args.detect_max_pixels, args.repeats)
    groups = recall_by_group(rows, names)
    print(table(rows, names))
    print("\n| group | " + " | ".join(names) + " |\n|" + "---|" * (1 + len(names)))
    for group, found in groups.items():
        print(f"| {group} | " + " | ".join(found[n] for n in names) + " |")
    print()
    print(size_table(sizes, names, args.detect_max_pixels))
    threads = args.threads or "default"
    print(f"\nms per 640×480 photo (median of 20, {threads} onnxruntime thread(s), {platform.machine()}):",
          ", ".join(f"{n} {ms:.1f}" for n, ms in per_frame.items()))  # fmt: skip
    thresholds = {"yunet": yunet.threshold, "mtcnn": mtcnn.threshold} if args.threshold is None else args.threshold
    result = {
        "settings": {
            "threshold": thresholds,
            "min_face": args.min_face,
            "threads": args.threads,
            "detect_max_pixels": args.detect_max_pixels,
        },  # fmt: skip
        "totals": totals_of(rows, names),
        "recall_by_group": groups,
        "ms_per_640x480": per_frame,
        "ms_by_size": sizes,
        "rows": rows,
        "command": "benchmarks/bench_detect.py" + (f" --threads {args.threads}" if args.threads != 1 else ""),
        "date": time.strftime("%Y-%m-%d"),
        "machine": platform.processor() or platform.machine(),
    }
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2, ensure_ascii=False) + "\n")
    if args.card:
        for name in ("mtcnn", "yunet"):
            card_path = Path(args.detector_dir) / f"{name}.card.json"
            card = json.loads(card_path.read_text())
            keep = ("settings", "totals", "recall_by_group", "ms_per_640x480", "ms_by_size", "command", "date")
            card["benchmark"] = {k: result[k] for k in keep}
            card_path.write_text(json.dumps(card, indent=2, ensure_ascii=False) + "\n")


if __name__ == "__main__":
    main()
