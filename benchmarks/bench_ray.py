"""Images per second of ``mien analyze`` over a folder: in process, and over 1 and 2 Ray actors on a local instance.

    nice -n 0 .venv/bin/python benchmarks/bench_ray.py [--images 600] [--repeats 2] [--json docs/figures/bench_ray.json]

The folder is generated: ``--images`` photos of 640×480, each a grey, noisy background with scikit-image's
astronaut's head (one face) pasted at a random place and size, written as JPEG. The same folder is analysed by

* the single-process run (:meth:`Analyzer.analyze`), with one onnxruntime thread and with onnxruntime's
  own choice (one thread per core);
* :class:`mien.service.scale.RayAnalyzer` with 1 and with 2 actors (one onnxruntime thread each), on one local
  Ray instance of 2 CPUs started before the timings (its start is not timed; each run's actor start is).

Each figure is the best of ``--repeats`` runs over the whole folder (file reading and decoding included). A run
over 4 images with 1 actor is timed too: it is mostly the fixed cost of starting the actors and their models.
Every run must give the same number of faces. The machine, its load average and the Ray version are recorded.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import cv2
import numpy as np

from mien.machine import describe_cpu
from mien.service.analysis import AnalyzeOptions, Analyzer
from mien.service.scale import RayAnalyzer, connected, image_items

ROOT = Path(__file__).resolve().parents[1]
CPU = ("CPUExecutionProvider",)


def make_photos(folder: Path, count: int, seed: int = 0) -> Path:
    """``count`` 640×480 JPEGs, each with one astronaut head (90 to 200 pixels) at a random place."""
    from skimage import data

    rng = np.random.default_rng(seed)
    head = cv2.cvtColor(data.astronaut(), cv2.COLOR_RGB2BGR)[20:220, 125:325]
    for i in range(count):
        photo = np.clip(110 + rng.normal(0, 12, (480, 640, 3)), 0, 255).astype(np.uint8)
        side = int(rng.integers(90, 201))
        face = cv2.resize(head, (side, side), interpolation=cv2.INTER_AREA)
        x, y = int(rng.integers(0, 640 - side)), int(rng.integers(0, 480 - side))
        photo[y : y + side, x : x + side] = face
        cv2.imwrite(str(folder / f"photo_{i:04d}.jpg"), photo, [cv2.IMWRITE_JPEG_QUALITY, 90])
    return folder


def best_of(repeats: int, run) -> tuple[float, int]:
    """The shortest wall time of ``repeats`` calls of ``run`` (which returns a face count) and that count."""
    times, counts = [], set()
    for _ in range(repeats):
        start = time.perf_counter()
        counts.add(run())
        times.append(time.perf_counter() - start)
    assert len(counts) == 1, counts
    return min(times), counts.pop()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=600)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--model-dir", default=str(ROOT / "models"))
    parser.add_argument("--json", default=str(ROOT / "docs" / "figures" / "bench_ray.json"))
    parser.add_argument("--note", default="", help="what else the machine was doing, recorded with the figures")
    args = parser.parse_args(argv)

    import ray

    results = []
    with tempfile.TemporaryDirectory() as tmp:
        folder = make_photos(Path(tmp), args.images)
        items = image_items(folder)
        load_before = os.getloadavg()

        single = (("single process, 1 onnxruntime thread", 1), ("single process, onnxruntime's threads", 0))
        for name, threads in single:
            analyzer = Analyzer.load(Path(args.model_dir), AnalyzeOptions(threads=threads), CPU)
            seconds, faces = best_of(args.repeats, lambda a=analyzer: sum(1 for _ in a.analyze(folder)))
            results.append({"run": name, "workers": None, "threads": threads, "seconds": round(seconds, 3),
                            "images_per_s": round(len(items) / seconds, 2), "faces": faces})  # fmt: skip
            print(results[-1], file=sys.stderr)

        with connected("local", workers=2):
            for workers in (1, 2):
                spread = RayAnalyzer(args.model_dir, AnalyzeOptions(threads=1), CPU, workers=workers)
                seconds, faces = best_of(args.repeats, lambda s=spread: sum(1 for _ in s.analyze(items)))
                results.append({"run": f"Ray, {workers} actor{'s' if workers > 1 else ''}", "workers": workers,
                                "threads": 1, "seconds": round(seconds, 3),
                                "images_per_s": round(len(items) / seconds, 2), "faces": faces})  # fmt: skip
                print(results[-1], file=sys.stderr)
            spread = RayAnalyzer(args.model_dir, AnalyzeOptions(threads=1), CPU, workers=1)
            overhead, _ = best_of(args.repeats, lambda: sum(1 for _ in spread.analyze(items[:4])))
        load_after = os.getloadavg()

    by_workers = {r["workers"]: r["images_per_s"] for r in results if r["workers"]}
    document = {
        "command": " ".join(["nice -n 0 .venv/bin/python benchmarks/bench_ray.py", *(argv or sys.argv[1:])]),
        "images": len(items),
        "image_size": [640, 480],
        "repeats": args.repeats,
        "cpu": describe_cpu(),
        "cores": os.cpu_count(),
        "python": platform.python_version(),
        "ray": ray.__version__,
        "load_average_1min_before_after": [round(load_before[0], 2), round(load_after[0], 2)],
        "note": args.note,
        "results": results,
        "ray_2_over_1_workers": round(by_workers[2] / by_workers[1], 3),
        "ray_4_images_1_actor_seconds": round(overhead, 3),
    }
    Path(args.json).write_text(json.dumps(document, indent=2) + "\n", encoding="utf-8")
    print(json.dumps(document, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
