"""The service's subcommands of ``mien``: ``mien serve`` and ``mien analyze``.

uvicorn, the app and the analysis engine are imported inside the handlers, so that ``mien --help`` stays instant.
``mien analyze`` runs the service's pipeline in process (no server): docs/analyze.md.
"""

from __future__ import annotations

import argparse
import sys


def add_commands(sub: argparse._SubParsersAction) -> None:
    """Add ``serve`` and ``analyze`` to the ``mien`` command's subparsers."""
    p = sub.add_parser("serve", help="serve the ONNX models over HTTP (settings from MIEN_* variables)",
                       description="Start the FastAPI service. Every option can also be set by an environment "
                       "variable MIEN_<NAME> (e.g. MIEN_MODEL_DIR); flags win over the environment.")  # fmt: skip
    p.add_argument("--host", default=None)
    p.add_argument("--port", type=int, default=None)
    p.add_argument("--model-dir", default=None)
    p.add_argument("--default-model", default=None)
    p.set_defaults(func=run_serve)
    add_analyze(sub)


def run_serve(args: argparse.Namespace) -> int:
    """Settings from the environment with the flags over them, then uvicorn; 2 when the settings are invalid."""
    import uvicorn
    from pydantic import ValidationError

    from mien.service.config import Settings
    from mien.service.main import create_app

    overrides = {k: v for k, v in {"host": args.host, "port": args.port, "model_dir": args.model_dir,
                                   "default_model": args.default_model}.items() if v is not None}  # fmt: skip
    try:
        settings = Settings(**overrides)
    except ValidationError as exc:
        problems = "; ".join(f"MIEN_{'_'.join(map(str, e['loc'])).upper()}: {e['msg']}" for e in exc.errors())
        print(f"mien serve: invalid settings: {problems}", file=sys.stderr)
        return 2
    uvicorn.run(create_app(settings), host=settings.host, port=settings.port)
    return 0


def add_analyze(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("analyze", help="every face of an image, folder, video or camera, tracked over time (offline)",
                       description="Detect and classify every face of SOURCE in process (no server): an image, a "
                       "folder of images (recursively), a video file (mp4, webm, mov, avi, ... as OpenCV's FFmpeg "
                       "reads it) or a camera index. Faces of a video are tracked across frames. Defaults follow the "
                       "service's MIEN_* settings. Without --out, --annotate, --plot or --summary-json the summary "
                       "per track is printed. See docs/analyze.md.")  # fmt: skip
    p.add_argument("source", metavar="SOURCE", help="image, folder, video file, or camera index (0, 1, ...)")
    p.add_argument("--model", default=None, help="model id (default: MIEN_DEFAULT_MODEL, mini_xception)")
    p.add_argument("--model-dir", default=None, help="folder of the models (default: MIEN_MODEL_DIR, models)")
    p.add_argument("--detector", default=None, help="yunet, mtcnn, haar or onnx (default: MIEN_DETECTOR, yunet)")
    p.add_argument("--detector-dir", default=None, help="folder of the detector's ONNX files (default: as serve)")
    p.add_argument("--fps", type=float, default=None, help="frames sampled per second of video (default: every one)")
    p.add_argument("--batch-size", type=int, default=None, help="frames analysed at once; memory is bounded by it")
    p.add_argument("--min-face", type=int, default=None, help="smallest face searched, pixels")
    p.add_argument("--threshold", type=float, default=None, help="detector score a face needs")
    p.add_argument("--max-faces", type=int, default=None, help="faces classified per frame, largest first")
    p.add_argument("--no-align", action="store_true", help="crop faces with the spec's margin instead of aligning")
    p.add_argument("--detect-max-pixels", type=int, default=None, help="faces searched on a copy this small")
    p.add_argument("--max-missed", type=int, default=5, help="frames a track survives without its face (5)")
    p.add_argument("--iou", type=float, default=0.3, help="overlap a face needs with a track to join it (0.3)")
    p.add_argument(
        "--smooth",
        type=float,
        default=None,
        metavar="ALPHA",
        help="smooth each track's probabilities by an EMA, ALPHA the weight of the newest frame (off)",
    )
    p.add_argument("--out", default=None, help="rows to results.jsonl, .csv or .parquet ('-': jsonl on stdout)")
    p.add_argument("--annotate", default=None, metavar="VIDEO", help="write the frames with faces drawn (mp4)")
    p.add_argument("--plot", default=None, metavar="PNG", help="each track's probabilities over time (matplotlib)")
    p.add_argument("--summary", action="store_true", help="print the summary per track")
    p.add_argument("--summary-json", default=None, metavar="JSON", help="write the summary per track as JSON")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--ray", nargs="?", const="local", default=None, metavar="ADDRESS",
                   help="still images over Ray actors (pip install 'mien[scale]'): a local instance, or the cluster "
                   "at ADDRESS ('auto' on one of its nodes, or the head's 'host:6379'); SOURCE a folder, an image or "
                   "a .txt list of paths; docs/scale.md")  # fmt: skip
    p.add_argument("--workers", type=int, default=None,
                   help="Ray actors, one model each (default: 2 locally, one per CPU of a cluster)")  # fmt: skip
    p.set_defaults(func=run_analyze)


def run_analyze(args: argparse.Namespace) -> int:
    """Check every option and output first, load the model and detector, then stream the source once through
    the writers; 2 with a one-line message for bad input (a missing file, an unreadable video, an unknown
    output format, an unknown model, invalid settings)."""
    from pydantic import ValidationError

    from mien.service.config import Settings
    from mien.service.exceptions import MienError

    try:
        settings = Settings()
    except ValidationError as exc:
        problems = "; ".join(f"MIEN_{'_'.join(map(str, e['loc'])).upper()}: {e['msg']}" for e in exc.errors())
        print(f"mien analyze: invalid settings: {problems}", file=sys.stderr)
        return 2
    try:
        return _analyze(args, settings)
    except MienError as exc:
        print(f"mien analyze: {exc.message}", file=sys.stderr)
        return 2


def _pick(value, default):
    return default if value is None else value


def _analyze(args: argparse.Namespace, settings) -> int:
    import contextlib
    import json
    from pathlib import Path

    from mien.service.analysis import (
        AnalyzeError,
        AnalyzeOptions,
        Analyzer,
        SummaryBuilder,
        TimelineBuilder,
        VideoAnnotator,
        check_annotate,
        check_output,
        check_plot,
        format_summary,
        open_writer,
        plot_timeline,
    )
    from mien.service.frames import probe

    options = AnalyzeOptions(
        model=_pick(args.model, settings.default_model), detector=_pick(args.detector, settings.detector),
        fps=args.fps, batch_size=_pick(args.batch_size, settings.batch_max_size),
        min_face=_pick(args.min_face, settings.min_face), threshold=_pick(args.threshold, settings.face_threshold),
        max_faces=_pick(args.max_faces, settings.max_faces), align=not args.no_align,
        detect_max_pixels=_pick(args.detect_max_pixels, settings.detect_max_pixels), max_pixels=settings.max_pixels,
        max_missed=args.max_missed, iou=args.iou, smooth=args.smooth, threads=settings.threads,
    )  # fmt: skip
    if args.ray is not None:
        return _analyze_ray(args, settings, options)
    if args.workers is not None:
        raise AnalyzeError("--workers is the number of Ray actors: it needs --ray")
    info = probe(args.source, options.fps)  # BadSource now for a missing path or an unreadable video
    if args.out is not None:
        check_output(args.out)
    if args.annotate is not None:
        check_annotate(args.annotate)
    if args.plot is not None:
        if info.kind in ("image", "folder"):
            raise AnalyzeError("--plot draws tracked faces over time: it needs a video or a camera")
        check_plot(args.plot)
    if args.summary_json is not None and Path(args.summary_json).suffix.lower() != ".json":
        raise AnalyzeError(f"{args.summary_json}: --summary-json writes a .json file")
    show_summary = args.summary or not any((args.out, args.annotate, args.plot, args.summary_json))

    model_dir = Path(_pick(args.model_dir, settings.model_dir))
    detector_folder = _pick(args.detector_dir, settings.detector_dir)
    analyzer = Analyzer.load(model_dir, options, settings.providers,
                             None if detector_folder is None else Path(detector_folder))  # fmt: skip
    labels = analyzer.labels
    summary = SummaryBuilder(labels, None if not info.fps else 1.0 / info.fps)
    plotted = TimelineBuilder(labels) if args.plot else None
    fps = info.fps or (1.0 if info.kind in ("image", "folder") else 25.0)
    frames = faces = 0
    with contextlib.ExitStack() as stack:
        writer = stack.enter_context(open_writer(args.out, labels)) if args.out else None
        video = stack.enter_context(VideoAnnotator(args.annotate, fps, labels)) if args.annotate else None
        try:
            for frame, rows in analyzer.analyze_frames(args.source, progress=not args.no_progress):
                frames += 1
                faces += len(rows)
                if writer is not None:
                    writer.write(rows)
                if video is not None:
                    video.write(frame, rows)
                summary.add_all(rows)
                if plotted is not None:
                    plotted.add_all(rows)
        except KeyboardInterrupt:  # a camera runs until Ctrl-C: what was seen is still written
            print("mien analyze: interrupted; writing what was analysed", file=sys.stderr)
    summaries = summary.result()
    if plotted is not None:
        plot_timeline(plotted, args.plot, labels)
    if args.summary_json is not None:
        document = {"source": str(args.source), "model": analyzer.model_id, "detector": analyzer.detector_name,
                    "frames": frames, "faces": faces, "smoothed": options.smooth is not None,
                    "tracks": [s.to_dict() for s in summaries]}  # fmt: skip
        Path(args.summary_json).write_text(json.dumps(document, indent=2) + "\n", encoding="utf-8")
    report = sys.stderr if args.out == "-" else sys.stdout
    stages = ", ".join(f"{name} {ms / max(frames, 1):.1f}" for name, ms in analyzer.timer.ms.items())
    print(f"{frames} frames, {faces} faces ({analyzer.model_id}, {analyzer.detector_name}); ms per frame: {stages}",
          file=sys.stderr)  # fmt: skip
    if show_summary:
        print(format_summary(summaries, labels), file=report)
    return 0


def _analyze_ray(args: argparse.Namespace, settings, options) -> int:
    """``--ray``: the still images of SOURCE analysed by Ray actors, written as the single-process run writes them
    (rows in the same order); options about sequences (--annotate, --plot) are refused. docs/scale.md."""
    import contextlib
    import json
    from pathlib import Path

    from mien.service.analysis import AnalyzeError, SummaryBuilder, check_output, format_summary, open_writer
    from mien.service.scale import RayAnalyzer, connected, image_items, import_ray

    for flag, value in (("--annotate", args.annotate), ("--plot", args.plot)):
        if value is not None:
            raise AnalyzeError(f"{flag} needs the frames of a video in order: it is not available with --ray")
    items = image_items(args.source)  # a video or a camera is refused here
    if args.out is not None:
        check_output(args.out)
    if args.summary_json is not None and Path(args.summary_json).suffix.lower() != ".json":
        raise AnalyzeError(f"{args.summary_json}: --summary-json writes a .json file")
    import_ray()  # the extra to install, before anything is loaded
    show_summary = args.summary or not any((args.out, args.summary_json))
    detector_folder = _pick(args.detector_dir, settings.detector_dir)
    analyzer = RayAnalyzer(_pick(args.model_dir, settings.model_dir), options, settings.providers, detector_folder,
                           args.workers)  # fmt: skip
    labels = analyzer.labels
    summary = SummaryBuilder(labels)
    faces = 0
    with connected(args.ray, args.workers, analyzer.options.threads), contextlib.ExitStack() as stack:
        writer = stack.enter_context(open_writer(args.out, labels)) if args.out else None
        for row in analyzer.analyze(items, progress=not args.no_progress):
            faces += 1
            if writer is not None:
                writer.write([row])
            summary.add(row)
    summaries = summary.result()
    if args.summary_json is not None:
        document = {"source": str(args.source), "model": analyzer.model_id, "detector": analyzer.detector_name,
                    "images": len(items), "faces": faces, "smoothed": False, "workers": analyzer.workers,
                    "tracks": [s.to_dict() for s in summaries]}  # fmt: skip
        Path(args.summary_json).write_text(json.dumps(document, indent=2) + "\n", encoding="utf-8")
    print(f"{len(items)} images, {faces} faces ({analyzer.model_id}, {analyzer.detector_name}); "
          f"{analyzer.workers} Ray actors", file=sys.stderr)  # fmt: skip
    if show_summary:
        print(format_summary(summaries, labels), file=sys.stderr if args.out == "-" else sys.stdout)
    return 0
