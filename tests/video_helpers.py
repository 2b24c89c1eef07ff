"""Generated inputs for the tests of ``mien analyze``: scikit-image's astronaut's head pasted onto grey frames,
written as mp4/avi videos, and the rows ``mien analyze`` writes, read back (the fixtures are in conftest.py)."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import cv2
import numpy as np

from mien.service.analysis import FaceRow

ROOT = Path(__file__).resolve().parents[1]
MODELS = ROOT / "models"
CPU = ("CPUExecutionProvider",)
SIDE = 100  # the pasted head's side, pixels


def head(side: int = SIDE, flip: bool = False) -> np.ndarray:
    """The astronaut's head (hair to chin), BGR, ``side`` pixels square."""
    from skimage import data

    image = cv2.cvtColor(data.astronaut(), cv2.COLOR_RGB2BGR)[20:220, 125:325]
    image = cv2.resize(image, (side, side), interpolation=cv2.INTER_AREA)
    return image[:, ::-1].copy() if flip else image


def canvas(width: int, height: int, heads: list[tuple[int, int, np.ndarray]]) -> np.ndarray:
    """A grey frame with each (x, y, head) pasted, later ones on top."""
    frame = np.full((height, width, 3), 110, np.uint8)
    for x, y, face in heads:
        h, w = face.shape[:2]
        x0, y0, x1, y1 = max(x, 0), max(y, 0), min(x + w, width), min(y + h, height)
        if x1 > x0 and y1 > y0:
            frame[y0:y1, x0:x1] = face[y0 - y : y1 - y, x0 - x : x1 - x]
    return frame


def write_video(path: Path, frames, fps: float = 10.0) -> Path:
    """Frames to ``path`` (.mp4: mp4v, .avi: MJPG), at ``fps``."""
    writer = None
    for frame in frames:
        if writer is None:
            fourcc = cv2.VideoWriter_fourcc(*("MJPG" if path.suffix == ".avi" else "mp4v"))
            writer = cv2.VideoWriter(str(path), fourcc, fps, (frame.shape[1], frame.shape[0]))
            assert writer.isOpened()
        writer.write(frame)
    assert writer is not None
    writer.release()
    return path


def moving_face(path: Path, count: int = 30, fps: float = 10.0) -> Path:
    """One head moving right by 5 pixels a frame over a 320×240 frame."""
    face = head()
    return write_video(path, (canvas(320, 240, [(10 + 5 * i, 60, face)]) for i in range(count)), fps)


def centre_x(row: FaceRow) -> float:
    return row.box[0] + row.box[2] / 2


def read_back(path: Path) -> list[dict]:
    """The rows of a jsonl, csv or parquet file as comparable dicts."""
    if path.suffix == ".jsonl":
        return [json.loads(line) for line in path.read_text().splitlines()]
    if path.suffix == ".parquet":
        import pyarrow.parquet as pq

        return pq.read_table(path).to_pylist()
    out = []
    with path.open(newline="") as stream:
        for record in csv.DictReader(stream):
            parsed = {}
            for key, value in record.items():
                if value == "":
                    parsed[key] = None
                elif key in ("source", "label"):
                    parsed[key] = value
                elif key == "smoothed":
                    parsed[key] = value == "True"
                else:
                    parsed[key] = json.loads(value)
            out.append(parsed)
    return out
