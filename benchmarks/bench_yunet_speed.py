"""Where YuNet's time goes, and what would make it faster: input size, a shrunk detection copy, int8.

    .venv/bin/python benchmarks/bench_yunet_speed.py [--threads 1] [--repeats 5] [--json out.json]

1. onnxruntime run time of ``models/detector/yunet.onnx`` by square input side (64 … 640): is the cost
   per-operator overhead, or per pixel?
2. The detection benchmark's 16 photos (``benchmarks/detect_photos.py``) searched on a copy shrunk by a
   factor f (f = the smallest face YuNet is then asked to find ÷ ``min_face`` 20): faces found, false faces,
   mean ms per photo — the trade the service would make if YuNet ran below full resolution.
3. int8 copies of the net made with onnxruntime's static quantisation (QDQ and QOperator formats,
   per-channel weights, calibrated on the same photos and five scikit-image photos): faces found, false
   faces, mean ms per photo at full resolution.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import tempfile
from pathlib import Path

import cv2
import numpy as np
from detect_photos import all_photos, match

from mien.machine import describe_cpu, median_ms
from mien.service.detectors import BUNDLED_DIR, Detections
from mien.service.detectors.yunet import FILE, OUTPUTS, YunetDetector, to_input

CPU = ("CPUExecutionProvider",)
MIN_FACE = 20


def by_side(detector: YunetDetector, repeats: int) -> dict[int, float]:
    times = {}
    for side in (64, 128, 256, 320, 512, 640):
        x = np.zeros((1, 3, side, side), np.float32)
        times[side] = round(median_ms(lambda x=x: detector.session.run(list(OUTPUTS), {detector.input_name: x}),
                                      repeats * 6), 2)  # fmt: skip
    return times


def shrunk_detect(detector: YunetDetector, image: np.ndarray, factor: float) -> Detections:
    """Faces found on a copy of ``image`` scaled by ``factor``, mapped back to ``image``'s pixels."""
    if factor == 1.0:
        return detector.detect(image, min_face=MIN_FACE)
    small = cv2.resize(image, None, fx=factor, fy=factor, interpolation=cv2.INTER_AREA)
    found = detector.detect(small, min_face=max(1, int(MIN_FACE * factor)))
    scale = np.array([image.shape[1] / small.shape[1], image.shape[0] / small.shape[0]])
    return Detections(np.rint(found.boxes * np.tile(scale, 2)), found.scores, found.landmarks * scale)


def recall_and_time(detector: YunetDetector, factor: float, repeats: int) -> dict:
    found = false = 0
    ms = []
    for photo in all_photos():
        hits, wrong = match(shrunk_detect(detector, photo.image, factor).boxes, photo.faces)
        found, false = found + hits, false + wrong
        ms.append(median_ms(lambda p=photo: shrunk_detect(detector, p.image, factor), repeats, warmup=1))
    return {"found": found, "expected": sum(len(p.faces) for p in all_photos()), "false": false,
            "ms_mean": round(statistics.mean(ms), 2)}  # fmt: skip


def quantised(fmt: str, folder: Path) -> Path:
    """An int8 copy of yunet.onnx in ``folder`` (``fmt``: QDQ or QOperator), calibrated on the benchmark photos."""
    import onnx
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static
    from skimage import data

    source = BUNDLED_DIR / FILE
    name = onnx.load(str(source)).graph.input[0].name
    images = [photo.image for photo in all_photos()]
    images += [cv2.cvtColor(getattr(data, n)(), cv2.COLOR_RGB2BGR) for n in ("coffee", "chelsea", "rocket", "camera",
                                                                               "immunohistochemistry")]  # fmt: skip

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self.feed = iter([{name: to_input(image if image.ndim == 3 else cv2.cvtColor(image, cv2.COLOR_GRAY2BGR))}
                              for image in images])  # fmt: skip

        def get_next(self) -> dict | None:
            return next(self.feed, None)

    folder.mkdir(parents=True, exist_ok=True)
    quantize_static(str(source), str(folder / FILE), Reader(), quant_format=getattr(QuantFormat, fmt),
                    per_channel=True, activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8)  # fmt: skip
    return folder


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    detector = YunetDetector.from_dir(BUNDLED_DIR, CPU, args.threads)
    result: dict = {"machine": describe_cpu(), "threads": args.threads, "min_face": MIN_FACE}
    result["run_ms_by_side"] = by_side(detector, args.repeats)
    print("onnxruntime run, ms by square input side:", result["run_ms_by_side"], flush=True)
    result["shrunk"] = {}
    print("\n| smallest face asked of YuNet (px) | factor | found | false | ms per photo |\n|---|---:|---|---:|---:|")
    for smallest in (20, 16, 14, 12, 10, 8):
        factor = smallest / MIN_FACE
        row = result["shrunk"][smallest] = {"factor": factor, **recall_and_time(detector, factor, args.repeats)}
        print(f"| {smallest} | {factor:.2f} | {row['found']}/{row['expected']} | {row['false']} | {row['ms_mean']} |",
              flush=True)  # fmt: skip
    result["int8"] = {}
    print("\n| net | found | false | ms per photo |\n|---|---|---:|---:|")
    with tempfile.TemporaryDirectory() as tmp:
        for fmt in ("QDQ", "QOperator"):
            folder = quantised(fmt, Path(tmp) / fmt)
            row = result["int8"][fmt] = recall_and_time(YunetDetector.from_dir(folder, CPU, args.threads), 1.0,
                                                        args.repeats)  # fmt: skip
            print(f"| int8 {fmt} | {row['found']}/{row['expected']} | {row['false']} | {row['ms_mean']} |", flush=True)
            shutil.rmtree(folder)
    row = result["shrunk"][20]
    print(f"| float (the bundled net) | {row['found']}/{row['expected']} | {row['false']} | {row['ms_mean']} |")
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
