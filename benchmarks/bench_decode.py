"""Decoding a phone photo for detection: a full decode (and a resize) against OpenCV's reduced JPEG decodes.

    .venv/bin/python benchmarks/bench_decode.py [--width 4000 --height 3000] [--repeats 20] [--json out.json]

The photo is ``benchmarks/detect_photos.py``'s phone photo (one face on a textured, noisy background) as a
quality-90 JPEG. Rows: ``IMREAD_COLOR`` (full size); full size then ``INTER_AREA`` down to the service's
detection copy (``MIEN_DETECT_MAX_PIXELS``); ``IMREAD_REDUCED_COLOR_2/4/8`` (the JPEG's DCT scaling); and
what the service does (:func:`mien.service.imaging.decode_photo` with that pixel budget). Median ms.
"""

from __future__ import annotations

import argparse
import json
import platform
from pathlib import Path

import cv2
import numpy as np
from detect_photos import phone_photo

from mien.machine import describe_cpu, median_ms
from mien.service.config import Settings
from mien.service.imaging import decode_photo
from mien.service.pipeline import shrink


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--width", type=int, default=4000)
    parser.add_argument("--height", type=int, default=3000)
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    cv2.setNumThreads(1)  # one core, like one request
    budget = Settings.model_fields["detect_max_pixels"].default
    photo = phone_photo(args.width, args.height)
    data = cv2.imencode(".jpg", photo.image, [cv2.IMWRITE_JPEG_QUALITY, 90])[1].tobytes()
    buffer = np.frombuffer(data, np.uint8)
    rows = {
        "IMREAD_COLOR (full size)": lambda: cv2.imdecode(buffer, cv2.IMREAD_COLOR),
        f"full size + INTER_AREA to {budget:,} px": lambda: shrink(cv2.imdecode(buffer, cv2.IMREAD_COLOR), budget),
        "IMREAD_REDUCED_COLOR_2": lambda: cv2.imdecode(buffer, cv2.IMREAD_REDUCED_COLOR_2),
        "IMREAD_REDUCED_COLOR_4": lambda: cv2.imdecode(buffer, cv2.IMREAD_REDUCED_COLOR_4),
        "IMREAD_REDUCED_COLOR_8": lambda: cv2.imdecode(buffer, cv2.IMREAD_REDUCED_COLOR_8),
        f"mien decode_photo (budget {budget:,} px)": lambda: decode_photo(data, 10**9, budget).image,
    }
    result = {"photo": f"{args.width}×{args.height} JPEG, {len(data) / 1e6:.2f} MB", "machine": describe_cpu(),
              "python": platform.python_version(), "opencv": cv2.__version__, "ms": {}}  # fmt: skip
    print(f"{result['photo']}; {result['machine']}; OpenCV {cv2.__version__}, 1 thread\n")
    print("| decode | output | median ms |\n|---|---|---:|")
    for name, run in rows.items():
        shape = run().shape
        ms = median_ms(run, args.repeats, warmup=1)
        result["ms"][name] = round(ms, 1)
        print(f"| {name} | {shape[1]}×{shape[0]} | {ms:.1f} |")
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2, ensure_ascii=False) + "\n")


if __name__ == "__main__":
    main()
