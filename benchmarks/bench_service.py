"""Speed of the service as a user meets it: classifiers, /predict under load, a soak, and the `fer` package.

    .venv/bin/python benchmarks/bench_service.py [--out docs/performance-run.md] [--soak 10000] [--quick]

Prints markdown tables (and writes them with ``--out``):

1. classifier ms per face at batch 1 and 32 for every bundled model (``models/*.onnx``) and ensemble,
   through ``predict_crops`` on real face crops (resize and normalisation included);
2. POST /predict latency p50/p95/p99 and requests per second at concurrency 1, 8 and 32, on real photos
   (the package photos of ``benchmarks/detect_photos.py``: astronaut, Grace Hopper, camera, a five-face
   group, coffee with no face), against the real server (``mien serve`` in a subprocess) with an httpx
   client, micro-batching on and, at the highest concurrency, off for comparison; then, at concurrency 1,
   the astronaut alone (512×512) and a 4000×3000 phone-style JPEG with one face. Each detector of
   ``--detectors`` gets its own server (the first also gets the soak and the batching comparison);
3. a soak (10,000 requests at concurrency 32 by default): the count of 5xx answers (must be 0) and the
   growth of the server's resident memory, VmRSS from /proc/<pid>/status (must stay under 50 MB);
4. with the optional ``bench`` extra and ``pip install --no-deps fer``: the same photos through the
   ``fer`` package (its Haar cascade passed explicitly) and mien's pipeline in-process, and the time ratio;
5. micro-batching on and off in alternating rounds on fresh servers (``--ab-rounds``; ``--ab-only`` runs
   just this), so that a shared machine's changing load falls on both alike.

A benchmark, not a test: it exits non-zero only when the soak breaks its two promises. Never downloads.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import os
import platform
import statistics
import sys
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import onnxruntime as ort
from tqdm import tqdm

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.detect_photos import FACE_BOXES, match, phone_photo, real_photo  # noqa: E402
from benchmarks.server_load import PHOTOS, jpeg, latency_row, load, percentile, photos, rss_mb, server  # noqa: E402
from mien.ensemble import ENSEMBLE_SUFFIX, load_classifier  # noqa: E402
from mien.machine import describe_cpu, median_ms  # noqa: E402
from mien.service.config import Settings  # noqa: E402

MAX_RSS_GROWTH_MB = 50.0


def face_crops() -> list[np.ndarray]:
    """The real faces of the package photos, cut by their hand-drawn boxes."""
    crops = []
    for name, boxes in FACE_BOXES.items():
        image = real_photo(name)
        crops += [image[y : y + h, x : x + w] for x, y, w, h in boxes]
    return crops


# --- 1. classifiers ----------------------------------------------------------------------------------


def bench_classifiers(model_dir: Path, settings: Settings, quick: bool) -> list[str]:
    paths = sorted(model_dir.glob("*.onnx")) + sorted(model_dir.glob(f"*{ENSEMBLE_SUFFIX}"))
    crops = face_crops()
    batch32 = [crops[i % len(crops)] for i in range(32)]
    lines = ["| model | provider | ms/face, batch 1 | ms/face, batch 32 |", "|---|---|---:|---:|"]
    for path in tqdm(paths, desc="classifiers", leave=False):
        classifier = load_classifier(path, settings.providers, settings.session_config())
        one = median_ms(lambda c=classifier: c.predict_crops(crops[:1]), 20 if quick else 200)
        many = median_ms(lambda c=classifier: c.predict_crops(batch32), 5 if quick else 40) / 32
        lines.append(f"| {classifier.model_id} | {classifier.provider} | {one:.2f} | {many:.2f} |")
    return lines


# --- 4. the fer package, in-process ----------------------------------------------------------------


def bench_fer(model_dir: Path, settings: Settings, repeats: int) -> list[str]:
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    try:
        from importlib.resources import files

        from fer.fer import FER
    except ImportError as exc:
        return [f"`fer` is not installed ({exc}): `pip install -e '.[bench]'` then `pip install --no-deps fer`."]
    from mien.runtime import OnnxClassifier
    from mien.service.detectors import BUNDLED_DIR
    from mien.service.detectors.haar import HaarFaceDetector
    from mien.service.detectors.mtcnn import MtcnnDetector
    from mien.service.detectors.yunet import YunetDetector
    from mien.service.pipeline import StageTimer, predict_faces

    cascade = files("fer") / "data" / "haarcascade_frontalface_default.xml"  # fer's own copy, passed explicitly
    fer = FER(cascade_file=str(cascade), mtcnn=False)
    session = settings.session_config()
    classifier = OnnxClassifier.from_path(model_dir / f"{settings.default_model}.onnx", settings.providers, session)
    mtcnn = MtcnnDetector.from_dir(BUNDLED_DIR, settings.providers, session)
    yunet = YunetDetector.from_dir(BUNDLED_DIR, settings.providers, session)
    haar = HaarFaceDetector()
    runners = {
        "fer (Haar + its TFLite CNN)": lambda image: len(fer.detect_emotions(image)),
        f"mien (YuNet + {classifier.model_id})": lambda image: len(
            predict_faces(image, classifier, yunet, StageTimer()).boxes
        ),
        f"mien (MTCNN + {classifier.model_id})": lambda image: len(
            predict_faces(image, classifier, mtcnn, StageTimer()).boxes
        ),
        f"mien (Haar + {classifier.model_id})": lambda image: len(
            predict_faces(image, classifier, haar, StageTimer()).boxes
        ),
    }
    images = photos()
    faces = {name: [run(image) for _, image in images] for name, run in runners.items()}
    # fer's OpenCV cascade and TFLite interpreter use every core they see, mien one onnxruntime thread per
    # model: each pipeline is timed on the whole machine and pinned to one core (sched_setaffinity).
    totals: dict[str, dict[str, float]] = {name: {} for name in runners}
    for cores in ("all", "one"):
        with pinned_to_one_core(cores == "one"):
            for name, run in tqdm(runners.items(), desc=f"fer comparison, {cores} core(s)", leave=False):
                per_photo = [median_ms(lambda r=run, i=image: r(i), repeats) for _, image in images]
                totals[name][cores] = sum(per_photo) / len(images)
    fer_name = next(iter(runners))
    lines = [
        f"| pipeline (in-process, decoded photo) | ms per photo, all {os.cpu_count()} cores | fer ÷ this "
        f"| ms per photo, pinned to one core | fer ÷ this | faces found ({', '.join(PHOTOS)}) |",
        "|---|---:|---:|---:|---:|---|",
    ]
    for name in runners:
        cells = " | ".join(
            f"{totals[name][c]:.1f} | {totals[fer_name][c] / totals[name][c]:.2f}×" for c in ("all", "one")
        )
        lines.append(f"| {name} | {cells} | {', '.join(map(str, faces[name]))} |")
    lines.append(f"\nMean of per-photo medians, {repeats} runs each.")
    return lines


@contextlib.contextmanager
def pinned_to_one_core(pin: bool) -> Iterator[None]:
    """This process (all its threads) on one CPU core while inside, when ``pin``; the affinity restored after."""
    if not pin or not hasattr(os, "sched_setaffinity"):
        yield
        return
    before = os.sched_getaffinity(0)
    os.sched_setaffinity(0, {min(before)})
    try:
        yield
    finally:
        os.sched_setaffinity(0, before)


# --- 2 and 3. the real server under load -----------------------------------------------------------


def bench_single_photos(url: str, per_photo: int) -> list[str]:
    """Concurrency 1, one photo at a time: the astronaut (512×512) and a 4000×3000 JPEG with one face; each
    row also says whether the face came back where it is."""
    phone = phone_photo()
    astronaut = real_photo("astronaut")
    rows = []
    for label, image, faces in [("astronaut 512×512", astronaut, [FACE_BOXES["astronaut"][0]]),
                                ("phone photo 4000×3000 (one face)", phone.image, phone.faces)]:  # fmt: skip
        body = jpeg(image)
        answer = httpx.post(f"{url}/predict", files={"file": ("photo.jpg", body, "image/jpeg")}, timeout=120).json()
        boxes = [[f["box"][k] for k in ("x", "y", "width", "height")] for f in answer["faces"]]
        found, false = match(np.array(boxes).reshape(-1, 4), faces)
        result = asyncio.run(load(url, [(label, body)], 1, per_photo, desc=label))
        rows.append(latency_row(f"{label}, concurrency 1 (found {found}/{len(faces)}, {false} false)", result))
    return rows


def bench_server(model_dir: Path, levels: list[int], per_level: int, soak: int, compare: bool, log: Path,
                 env: dict[str, str]) -> tuple:  # fmt: skip
    bodies = [(name, jpeg(image)) for name, image in photos()]
    header = [
        "| run | requests | p50 ms | p95 ms | p99 ms | requests/s | 200s (others) |",
        "|---|---:|---:|---:|---:|---:|---|",
    ]
    rows, soak_lines, soak_ok = list(header), [], True
    with server(model_dir, log, **env) as (url, pid):
        rows += bench_single_photos(url, max(20, per_level // 4))
        for concurrency in levels:
            result = asyncio.run(
                load(url, bodies, concurrency, max(per_level, 4 * concurrency), desc=f"c={concurrency}")
            )
            rows.append(latency_row(f"concurrency {concurrency}, micro-batching on", result))
        if soak:
            concurrency = max(levels)
            # Warm up at the soak's own concurrency first: the allocators' pools (onnxruntime's arena per run
            # shape, glibc's per-thread arenas) fill over the first few thousand requests and then stay flat,
            # so growth is measured from there; the trajectory is printed so a climb would show.
            warm = min(2000, soak // 2)
            asyncio.run(load(url, bodies, concurrency, warm, desc=f"soak warm-up c={concurrency}"))
            before = rss_mb(pid)
            result = asyncio.run(load(url, bodies, concurrency, soak, pid=pid, desc=f"soak c={concurrency}"))
            after = rss_mb(pid)
            server_errors = sum(n for k, n in result["statuses"].items() if isinstance(k, int) and k >= 500)
            failed = sum(n for k, n in result["statuses"].items() if not isinstance(k, int))
            growth = after - before
            peak = max([after, *result["rss"]])
            soak_ok = server_errors == 0 and failed == 0 and growth < MAX_RSS_GROWTH_MB
            soak_lines = [
                "| soak | value |", "|---|---|",
                f"| requests | {soak} at concurrency {concurrency} ({', '.join(PHOTOS)} in turn) |",
                f"| statuses | {dict(sorted(result['statuses'].items(), key=str))} |",
                f"| 5xx answers | {server_errors} (must be 0) |",
                f"| failed connections | {failed} |",
                f"| warm-up before the soak | {warm} requests at concurrency {concurrency} |",
                f"| server VmRSS before → after (peak) | {before:.1f} → {after:.1f} MB ({peak:.1f} MB) |",
                f"| VmRSS every 1000 requests | {', '.join(f'{mb:.0f}' for mb in result['rss'][3::4])} MB |",
                f"| resident memory growth | {growth:+.1f} MB (must stay under {MAX_RSS_GROWTH_MB:.0f} MB) |",
                f"| p50 / p99 latency, throughput | {percentile(result['latencies'], 50):.1f} / "
                f"{percentile(result['latencies'], 99):.1f} ms, {soak / result['wall']:.1f} requests/s |",
                f"| verdict | {'PASS' if soak_ok else 'FAIL'} |",
            ]  # fmt: skip
    if compare:
        concurrency = max(levels)
        with server(model_dir, log, **env, batching="false") as (url, _):
            result = asyncio.run(load(url, bodies, concurrency, max(per_level, 4 * concurrency), desc="no batching"))
            rows.append(latency_row(f"concurrency {concurrency}, micro-batching off", result))
    return rows, soak_lines, soak_ok


def bench_batching_ab(model_dir: Path, concurrency: int, per_run: int, rounds: int, log: Path) -> list[str]:
    """Micro-batching on and off in alternating rounds, each on a fresh server, so that a change in the
    machine's background load hits both alike; medians over the rounds."""
    bodies = [(name, jpeg(image)) for name, image in photos()]
    runs: dict[str, list[dict]] = {"on": [], "off": []}
    for round_ in range(rounds):
        for mode in ("on", "off"):
            with server(model_dir, log, batching="true" if mode == "on" else "false") as (url, _):
                result = asyncio.run(load(url, bodies, concurrency, per_run, desc=f"A/B {round_ + 1} {mode}"))
            runs[mode].append(result)
    lines = [
        "| micro-batching | rounds × requests | median p50 ms | median p95 ms | median requests/s | non-200 |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for mode, results in runs.items():
        p50 = statistics.median(percentile(r["latencies"], 50) for r in results)
        p95 = statistics.median(percentile(r["latencies"], 95) for r in results)
        rps = statistics.median(len(r["latencies"]) / r["wall"] for r in results)
        bad = sum(n for r in results for k, n in r["statuses"].items() if k != 200)
        lines.append(f"| {mode} | {rounds} × {per_run} | {p50:.1f} | {p95:.1f} | {rps:.1f} | {bad} |")
    return lines


def machine() -> str:
    load1, load5, _ = os.getloadavg()
    return (f"{describe_cpu()}; Python {platform.python_version()}, onnxruntime {ort.__version__} "
            f"({ort.get_device()} build); load average at start {load1:.2f} (1 min), {load5:.2f} (5 min)")  # fmt: skip


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", type=Path, default=ROOT / "models")
    parser.add_argument("--levels", default="1,8,32", help="client concurrency levels")
    parser.add_argument("--requests", type=int, default=400, help="requests per level (at least 4 × concurrency)")
    parser.add_argument("--soak", type=int, default=10_000, help="soak requests at the highest level; 0 = none")
    parser.add_argument("--fer-repeats", type=int, default=20)
    parser.add_argument("--no-compare", action="store_true", help="skip the run with micro-batching off")
    parser.add_argument("--ab-rounds", type=int, default=3, help="alternating batching on/off rounds; 0 = none")
    parser.add_argument("--ab-only", action="store_true", help="run only the batching on/off rounds")
    parser.add_argument("--fer-only", action="store_true", help="run only the comparison with the fer package")
    parser.add_argument("--quick", action="store_true", help="few repeats everywhere (a smoke run)")
    parser.add_argument("--out", type=Path, default=None, help="also write the tables to this markdown file")
    parser.add_argument("--server-log", type=Path, default=Path("/tmp/mien-bench-server.log"))
    parser.add_argument("--threads", type=int, default=1, help="onnxruntime intra-op threads per model (MIEN_THREADS)")
    parser.add_argument("--detectors", default="yunet,mtcnn", help="a server run per detector; the first is soaked")
    args = parser.parse_args()
    logging.getLogger("httpx").setLevel(logging.WARNING)  # not a line per request (fer's import enables INFO)
    if args.quick:
        args.requests, args.soak, args.fer_repeats = 40, min(args.soak, 500), 3
    settings = Settings(model_dir=args.models, threads=args.threads)  # the service's defaults (and MIEN_* overrides)
    levels = [int(n) for n in args.levels.split(",")]

    sections = [f"Machine: {machine()}", ""]
    print(sections[0], flush=True)

    def section(title: str, lines: list[str]) -> None:
        text = [f"### {title}", "", *lines, ""]
        print("\n".join(text), flush=True)
        sections.extend(text)

    soak_ok = True
    if args.fer_only:
        section("The fer package and mien on the same photos", bench_fer(args.models, settings, args.fer_repeats))
    elif not args.ab_only:
        section("Classifiers: ms per face (predict_crops on real face crops; resize and normalise included)",
                bench_classifiers(args.models, settings, args.quick))  # fmt: skip
        section("The fer package and mien on the same photos", bench_fer(args.models, settings, args.fer_repeats))
        for i, detector in enumerate(args.detectors.split(",")):
            first = i == 0
            env = {"detector": detector, "threads": str(args.threads)}
            rows, soak_lines, ok = bench_server(args.models, levels, args.requests, args.soak if first else 0,
                                                first and not args.no_compare, args.server_log, env)  # fmt: skip
            soak_ok = soak_ok and ok
            section(f"POST /predict on the real server (model {settings.default_model}, detector {detector}, "
                    f"{args.threads} onnxruntime thread(s) per model; the mixed rows send {', '.join(PHOTOS)} in "
                    "turn; httpx client on the same machine)", rows)  # fmt: skip
            if soak_lines:
                section(f"Soak (detector {detector})", soak_lines)
    if args.ab_rounds and not args.fer_only:
        ab = bench_batching_ab(args.models, max(levels), args.requests, args.ab_rounds, args.server_log)
        section(f"Micro-batching on and off, alternating rounds at concurrency {max(levels)}", ab)
    load1, load5, _ = os.getloadavg()
    sections.append(f"Load average at the end: {load1:.2f} (1 min), {load5:.2f} (5 min).")
    print(sections[-1])
    if args.out:
        args.out.write_text("\n".join(sections) + "\n", encoding="utf-8")
    return 0 if soak_ok else 1


if __name__ == "__main__":
    sys.exit(main())
