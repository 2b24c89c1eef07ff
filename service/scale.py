"""``mien analyze --ray``: the still images of a folder or of a list, analysed by a pool of Ray actors.

The work per batch is the single-process one, :meth:`mien.service.analysis.Analyzer.analyze_batch`, run as a
Ray Data ``map_batches`` over a dataset of (index, source, path) items: each actor (:class:`BatchAnalyzer`)
loads one model and one detector (one ONNX session each, one onnxruntime thread by default) when it starts,
then reads its batch's images with :func:`mien.service.frames.read_image` (EXIF orientation applied, size
checked, exactly as a folder is read in process) and returns the faces' flat records
(:meth:`FaceRow.record`) as an Arrow table. Ray keeps the order of the items (``preserve_order``), so the rows
come back in the order the single-process run yields them; a file that cannot be decoded is skipped with a
warning, as in process.

Only still images are distributed: a video is one sequence whose faces are tracked from frame to frame, so it
is refused here (and so is a camera). Ray is imported lazily: without it, ``--ray`` says which extra to install.
docs/scale.md tells how to run it on a cluster.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlparse

from mien.runtime import DEFAULT_PROVIDERS
from mien.service.analysis import AnalyzeError, AnalyzeOptions, Analyzer, FaceRow, record_schema
from mien.service.frames import BadSource, Frame, folder_images, read_image, source_kind

__all__ = ["LOCAL", "BatchAnalyzer", "ImageItem", "RayAnalyzer", "connected", "image_items", "row_from_record"]

log = logging.getLogger(__name__)

#: ``--ray`` without an address: start a Ray instance on this machine.
LOCAL = "local"
#: Actors of a local instance when ``--workers`` is not given.
DEFAULT_LOCAL_WORKERS = 2
#: A SOURCE with one of these extensions is a list of images (one path or file:// URI a line) under ``--ray``.
LIST_SUFFIXES = frozenset({".txt", ".lst", ".list"})
INSTALL = "pip install 'mien[scale]'"


@dataclass(frozen=True)
class ImageItem:
    """One image to analyse: its position in the source (the row's ``frame``), the name its rows carry
    (``source``), and the local path an actor reads it from."""

    index: int
    source: str
    path: str


def _local_path(entry: str, base: Path) -> Path:
    """The file a list entry names: a path (relative ones from the list's folder) or a file:// URI. Other
    schemes are refused: the actors read local files only."""
    parsed = urlparse(entry)
    if parsed.scheme == "file":
        if parsed.netloc not in ("", "localhost"):
            raise AnalyzeError(f"{entry}: a file:// URI names a file of this machine (file:///path)")
        return Path(unquote(parsed.path))
    if len(parsed.scheme) > 1:  # one letter is a Windows drive, not a scheme
        raise AnalyzeError(
            f"{entry}: --ray reads local paths and file:// URIs only (put {parsed.scheme}:// data on a filesystem "
            "every node mounts)"
        )
    path = Path(entry)
    return path if path.is_absolute() else base / path


def image_items(source: str | Path | Sequence[str | Path]) -> list[ImageItem]:
    """The images a ``--ray`` SOURCE names, in the order the single-process run reads them.

    A folder: every image below it, sorted as :func:`mien.service.frames.folder_images` sorts them (an item's
    index is its position there, its source ``str(path)``, as in process). One image: itself. A text file
    (``.txt``, ``.lst``, ``.list``): one image path or ``file://`` URI a line, blank lines and ``#`` comments
    skipped, relative paths from the list's folder. A sequence of paths or URIs: those. A video or a camera:
    AnalyzeError (a video is a sequence whose faces are tracked; it is not split across Ray).
    """
    if not isinstance(source, str | Path):
        return [ImageItem(i, str(entry), str(_local_path(str(entry), Path.cwd()))) for i, entry in enumerate(source)]
    path = Path(source)
    if path.suffix.lower() in LIST_SUFFIXES and path.is_file():
        lines = [line.strip() for line in path.read_text(encoding="utf-8").splitlines()]
        entries = [line for line in lines if line and not line.startswith("#")]
        if not entries:
            raise AnalyzeError(f"{path}: the list names no image")
        base = path.parent
        return [ImageItem(i, entry, str(_local_path(entry, base).absolute())) for i, entry in enumerate(entries)]
    kind = source_kind(source)  # BadSource for a missing path or an unknown extension
    if kind in ("video", "camera"):
        raise AnalyzeError(
            f"{source}: --ray analyses still images (a folder, an image or a list of them); a {kind} is one "
            "sequence whose faces are tracked frame to frame, so it is not split across Ray: run it without --ray"
        )
    if kind == "image":
        return [ImageItem(0, str(path), str(path.absolute()))]
    paths = folder_images(path)
    if not paths:
        raise BadSource(f"{path}: no image in this folder or below")
    return [ImageItem(i, str(p), str(p.absolute())) for i, p in enumerate(paths)]


class BatchAnalyzer:
    """The callable class of ``map_batches``: one per Ray actor, so one model and one detector per actor,
    loaded once. A batch is columns ``index``, ``source``, ``path``; the answer is the faces' records."""

    def __init__(
        self,
        model_dir: str,
        options: AnalyzeOptions,
        providers: tuple[str, ...] = DEFAULT_PROVIDERS,
        detector_dir: str | None = None,
    ) -> None:
        self.options = options
        self.analyzer = Analyzer.load(Path(model_dir), options, providers,
                                      None if detector_dir is None else Path(detector_dir))  # fmt: skip
        self.labels = self.analyzer.labels
        self.schema = record_schema(self.labels)

    def __call__(self, batch: dict[str, Any]):
        import pyarrow as pa

        frames = []
        for index, source, path in zip(batch["index"], batch["source"], batch["path"], strict=True):
            try:
                image = read_image(Path(str(path)), self.options.max_pixels)
            except BadSource as exc:
                log.warning("skipping %s", exc.message)  # as folder_frames does: one bad file must not stop it
                continue
            frames.append(Frame(str(source), int(index), None, image))
        rows = self.analyzer.analyze_batch(frames)
        return pa.Table.from_pylist([row.record(self.labels) for row in rows], schema=self.schema)


def row_from_record(record: dict[str, Any], labels: Iterable[str]) -> FaceRow:
    """The :class:`FaceRow` a flat record (:meth:`FaceRow.record`) came from."""
    box = (record["x"], record["y"], record["width"], record["height"])
    return FaceRow(
        record["source"], record["frame"], record["timestamp"], record["track"], box, record["landmarks"],
        record["label"], record["score"], {label: record[f"p_{label}"] for label in labels},
        record["detection_score"], bool(record["smoothed"]),
    )  # fmt: skip


def import_ray():
    """``ray`` and ``ray.data``, or AnalyzeError naming the extra to install."""
    try:
        import ray
        import ray.data
    except ImportError:
        raise AnalyzeError(f"--ray needs Ray Data: {INSTALL}") from None
    return ray


@contextlib.contextmanager
def connected(address: str = LOCAL, workers: int | None = None, threads: int = 1) -> Iterator[Any]:
    """Ray, connected: to the instance already initialised in this process if there is one (left running),
    else a new local instance of ``workers × threads`` CPUs (``address`` "local"), else the cluster at
    ``address`` ("auto", "host:6379"; "ray://host:10001" is Ray Client, untested); what this call started or
    joined is shut down on exit. Usage statistics are off (no network at start) and so is the dashboard."""
    ray = import_ray()
    if ray.is_initialized():
        yield ray
        return
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    if address == LOCAL:
        cpus = (workers or DEFAULT_LOCAL_WORKERS) * threads
        ray.init(num_cpus=cpus, include_dashboard=False, configure_logging=False)
    else:
        try:
            ray.init(address=address)
        except (ConnectionError, ValueError, RuntimeError) as exc:
            raise AnalyzeError(
                f"cannot reach the Ray cluster at {address}: {exc} (a cluster with token authentication also needs "
                "RAY_AUTH_MODE=token and its token in ~/.ray/auth_token or RAY_AUTH_TOKEN)"
            ) from None
    try:
        yield ray
    finally:
        ray.shutdown()


class RayAnalyzer:
    """:class:`Analyzer`'s ``analyze`` for still images, spread over Ray actors. Loading it loads the model and
    the detector once on the driver (the options and the names are checked, the labels known, before any actor
    starts); each actor then loads its own."""

    def __init__(
        self,
        model_dir: str | Path,
        options: AnalyzeOptions,
        providers: tuple[str, ...] = DEFAULT_PROVIDERS,
        detector_dir: str | Path | None = None,
        workers: int | None = None,
    ) -> None:
        if workers is not None and workers < 1:
            raise AnalyzeError(f"--workers must be at least 1, got {workers}")
        # An actor is one CPU: onnxruntime's own choice (0) would start a thread per core in every actor.
        self.options = replace(options, threads=options.threads or 1)
        self.model_dir = str(model_dir)
        self.providers = tuple(providers)
        self.detector_dir = None if detector_dir is None else str(detector_dir)
        local = Analyzer.load(Path(self.model_dir), self.options, self.providers,
                              None if detector_dir is None else Path(detector_dir))  # fmt: skip
        self.labels = local.labels
        self.model_id = local.model_id
        self.detector_name = local.detector_name
        self.requested_workers = workers
        self.workers = 0  # the actors of the last run

    def pool_size(self, ray, images: int) -> int:
        """``workers`` when given, else one actor per ``threads`` CPUs of the cluster (no more than batches)."""
        if self.requested_workers is not None:
            return self.requested_workers
        cpus = int(ray.cluster_resources().get("CPU", 1))
        return max(1, min(cpus // self.options.threads, math.ceil(images / self.options.batch_size)))

    def analyze(
        self, source: str | Path | Sequence[ImageItem] | Sequence[str], progress: bool = False
    ) -> Iterator[FaceRow]:
        """Every face of the source's images as rows, in the order of the single-process run (a folder, an
        image, a list file, or :class:`ImageItem` s from :func:`image_items`). Ray must be connected
        (:func:`connected`)."""
        if isinstance(source, str | Path) or not all(isinstance(item, ImageItem) for item in source):
            items: Sequence[ImageItem] = image_items(source)  # type: ignore[arg-type]
        else:
            items = source  # type: ignore[assignment]
        ray = import_ray()
        if not ray.is_initialized():
            raise AnalyzeError("Ray is not connected: use mien.service.scale.connected()")
        if not items:
            return
        self.workers = workers = self.pool_size(ray, len(items))
        options = self.options
        context = ray.data.DataContext.get_current()
        saved = (context.execution_options.preserve_order, context.enable_progress_bars)
        context.execution_options.preserve_order = True  # the items' order, whichever actor finishes first
        context.enable_progress_bars = progress
        try:
            blocks = min(len(items), max(workers, math.ceil(len(items) / options.batch_size)))
            dataset = ray.data.from_items(
                [{"index": item.index, "source": item.source, "path": item.path} for item in items],
                override_num_blocks=blocks,
            ).map_batches(
                BatchAnalyzer,
                fn_constructor_kwargs={"model_dir": self.model_dir, "options": options, "providers": self.providers,
                                       "detector_dir": self.detector_dir},
                batch_size=options.batch_size,
                batch_format="numpy",
                compute=ray.data.ActorPoolStrategy(size=workers),
                num_cpus=options.threads,
            )  # fmt: skip
            for table in dataset.iter_batches(batch_size=None, batch_format="pyarrow"):
                for record in table.to_pylist():
                    yield row_from_record(record, self.labels)
        finally:
            context.execution_options.preserve_order, context.enable_progress_bars = saved
