"""Speed of the bundled models and of /predict, on this machine's CPU (or GPU where present).

    .venv/bin/python benchmarks/bench_spine.py [--models models] [--json out.json]

Prints, per model: ONNX ms per face at batch 1 and batch 32; then ms per POST /predict of
scikit-image's astronaut photo (512×512, one face) through the whole app in-process (decode,
detection with the service's default detector, align, classify, JSON), median and p95. A benchmark, not a
test: figures go to docs.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
from pathlib import Path

import cv2
import numpy as np

from mien.machine import describe_cpu, timed
from mien.runtime import OnnxClassifier


def bench_classifier(path: Path, providers: tuple[str, ...]) -> dict:
    classifier = OnnxClassifier.from_path(path, providers=providers)
    shape = (classifier.spec.channels, *classifier.spec.input_size)
    rng = np.random.default_rng(0)
    result = {"model": classifier.model_id, "provider": classifier.provider}
    for batch, repeats in ((1, 300), (32, 60)):
        x = rng.normal(size=(batch, *shape)).astype(np.float32)
        result[f"ms_per_face_batch{batch}"] = statistics.median(timed(lambda x=x: classifier(x), repeats)) / batch
    return result


def bench_predict(model_dir: Path, model_id: str, repeats: int) -> dict:
    from fastapi.testclient import TestClient
    from skimage import data

    from mien.service.config import Settings
    from mien.service.main import create_app

    ok, jpeg = cv2.imencode(".jpg", cv2.cvtColor(data.astronaut(), cv2.COLOR_RGB2BGR))
    body = jpeg.tobytes()
    with TestClient(create_app(Settings(model_dir=model_dir))) as client:

        def call():
            response = client.post(f"/predict?model={model_id}", files={"file": ("astronaut.jpg", body, "image/jpeg")})
            response.raise_for_status()
            return response.json()

        answer = call()
        samples = timed(call, repeats)
    samples.sort()
    return {
        "model": model_id,
        "faces": len(answer["faces"]),
        "top_label": answer["faces"][0]["label"] if answer["faces"] else None,
        "ms_median": statistics.median(samples),
        "ms_p95": samples[int(0.95 * (len(samples) - 1))],
        "stage_ms": answer["timings_ms"],
    }


def machine() -> str:
    return f"{describe_cpu()}, Python {platform.python_version()}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default="models", type=Path)
    parser.add_argument("--providers", default="CUDAExecutionProvider,CPUExecutionProvider")
    parser.add_argument("--repeats", type=int, default=100, help="/predict calls per model")
    parser.add_argument("--json", type=Path, default=None, help="also write the results here")
    args = parser.parse_args()

    providers = tuple(args.providers.split(","))
    paths = sorted(args.models.glob("*.onnx"))
    if not paths:
        raise SystemExit(f"no .onnx files in {args.models}")
    print(f"machine: {machine()}")
    print("| model | provider | ms/face, batch 1 | ms/face, batch 32 |\n|---|---|---|---|")
    classifiers = []
    for path in paths:
        row = bench_classifier(path, providers)
        classifiers.append(row)
        b1, b32 = row["ms_per_face_batch1"], row["ms_per_face_batch32"]
        print(f"| {row['model']} | {row['provider']} | {b1:.3f} | {b32:.3f} |")
    print("\n| model | POST /predict astronaut.jpg, median ms | p95 ms | faces | top label |\n|---|---|---|---|---|")
    predicts = []
    for row in classifiers:
        result = bench_predict(args.models, row["model"], args.repeats)
        predicts.append(result)
        print(f"| {result['model']} | {result['ms_median']:.1f} | {result['ms_p95']:.1f} | {result['faces']} | "
              f"{result['top_label']} |")  # fmt: skip
    if args.json:
        results = {"machine": machine(), "classifiers": classifiers, "predict": predicts}
        args.json.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
