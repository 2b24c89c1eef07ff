"""Milliseconds per face of ONNX classifier files, bundled or not, as ``mien results`` times the bundled ones.

    .venv/bin/python benchmarks/ms_per_face.py models/vgg_fer_seed1.onnx ~/mien-runs/vgg_fer_tta/vgg_fer_tta.onnx

Each file answers real PublicTest faces through ``OnnxClassifier.predict_crops`` on the CPU, at batch 1 and 32 and
--threads threads; the median of --repeats calls (``export.results.ms_per_face``) is printed per face. Pause any
training on the machine first: the figure is a benchmark's, for docs and notes, not a test's.
"""

from __future__ import annotations

import argparse

from mien.export.evaluate import eval_split
from mien.export.results import ms_per_face
from mien.paths import DEFAULT_DATA
from mien.runtime import OnnxClassifier


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("files", nargs="+", help="ONNX classifier files (a card beside each)")
    parser.add_argument("--data", default=DEFAULT_DATA)
    parser.add_argument("--threads", type=int, default=1, help="onnxruntime threads (1: as mien results times)")
    parser.add_argument("--repeats", type=int, default=15)
    args = parser.parse_args()
    print(
        f"| file | ms/face, batch 1 | batch 32 |  ({args.threads} thread(s), median of {args.repeats})\n|---|---|---|"
    )
    for path in args.files:
        classifier = OnnxClassifier.from_path(path, threads=args.threads, providers=("CPUExecutionProvider",))
        faces = eval_split(args.data, "public_test", classifier.spec.labels).images
        one, many = (ms_per_face(classifier, faces, batch, args.repeats) for batch in (1, 32))
        print(f"| `{path}` | {one:.2f} | {many:.2f} |")


if __name__ == "__main__":
    main()
