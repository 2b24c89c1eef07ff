"""Faces followed across the frames of a video: a track id per person, and the probabilities smoothed per track.

:class:`Tracker` matches each frame's faces to the tracks alive so far. A track's box is predicted one frame
ahead from its recent motion (a constant velocity, so that two faces crossing paths keep heading where they
were going); a face may join a track when its box overlaps the track's predicted (or last) box by at least
``min_iou``. Among the allowed pairs, the assignment that costs least in total is taken (the Hungarian
algorithm, ``scipy.optimize.linear_sum_assignment``), the cost of a pair being ``1 - IoU`` plus
``distance_weight`` times the distance between the predicted and the found landmarks (or box centres, when a
detector gives no landmarks) in units of the box's diagonal. Taking the best pairs one at a time (greedy)
can steal a face from the track it belongs to; the joint assignment does not. A track that finds no face is
kept for ``max_missed`` frames and then ends; a face that joins no track starts a new one.

:class:`Smoother` is an exponential moving average of the probabilities per track (off unless asked for).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

import numpy as np
from scipy.optimize import linear_sum_assignment

#: The cost of a pair that may not be matched: larger than any allowed pair's.
_FORBIDDEN = 1e6


def iou_matrix(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Intersection over union of every box of ``a`` (N×4 x, y, w, h) with every box of ``b`` (M×4): N×M."""
    a = np.asarray(a, np.float64).reshape(-1, 4)
    b = np.asarray(b, np.float64).reshape(-1, 4)
    left = np.maximum(a[:, None, 0], b[None, :, 0])
    top = np.maximum(a[:, None, 1], b[None, :, 1])
    right = np.minimum(a[:, None, 0] + a[:, None, 2], b[None, :, 0] + b[None, :, 2])
    bottom = np.minimum(a[:, None, 1] + a[:, None, 3], b[None, :, 1] + b[None, :, 3])
    inter = np.clip(right - left, 0, None) * np.clip(bottom - top, 0, None)
    union = (a[:, 2] * a[:, 3])[:, None] + (b[:, 2] * b[:, 3])[None, :] - inter
    return np.divide(inter, union, out=np.zeros_like(inter), where=union > 0)


def centres(boxes: np.ndarray) -> np.ndarray:
    boxes = np.asarray(boxes, np.float64).reshape(-1, 4)
    return boxes[:, :2] + boxes[:, 2:] / 2


def assign(cost: np.ndarray, allowed: np.ndarray) -> list[tuple[int, int]]:
    """The (row, column) pairs of least total cost among the allowed ones (Hungarian algorithm); a row or
    column left without an allowed partner stays unmatched."""
    if cost.size == 0:
        return []
    rows, cols = linear_sum_assignment(np.where(allowed, cost, _FORBIDDEN))
    return [(int(r), int(c)) for r, c in zip(rows, cols, strict=True) if allowed[r, c]]


@dataclass
class Track:
    """One followed face: its last box and landmarks, its motion per frame, frames since it was last seen."""

    id: int
    box: np.ndarray  # x, y, w, h (float64)
    landmarks: np.ndarray | None  # 5×2, or None
    velocity: np.ndarray = field(default_factory=lambda: np.zeros(2))  # centre displacement per frame
    missed: int = 0
    hits: int = 1

    def predicted(self) -> tuple[np.ndarray, np.ndarray | None]:
        """Box and landmarks moved on by the velocity to the frame being matched (``missed + 1`` frames on)."""
        shift = self.velocity * (self.missed + 1)
        box = self.box.copy()
        box[:2] += shift
        return box, None if self.landmarks is None else self.landmarks + shift

    def see(self, box: np.ndarray, landmarks: np.ndarray | None) -> None:
        step = (centres(box)[0] - centres(self.box)[0]) / (self.missed + 1)
        self.velocity = step if self.hits == 1 else 0.5 * self.velocity + 0.5 * step
        self.box, self.landmarks = box, landmarks
        self.missed = 0
        self.hits += 1


class Tracker:
    """Track ids for the faces of consecutive frames (see the module docstring).

    ``max_missed``: frames a track survives without a face; ``min_iou``: the overlap a face needs with a
    track's predicted or last box to join it; ``distance_weight``: how much landmark (or centre) distance adds
    to a pair's cost beside ``1 - IoU``. Ids count up from ``first_id`` and are never reused, also across
    :meth:`reset`.
    """

    def __init__(
        self, max_missed: int = 5, min_iou: float = 0.3, distance_weight: float = 0.5, first_id: int = 1
    ) -> None:
        if max_missed < 0:
            raise ValueError(f"max_missed must be >= 0, got {max_missed}")
        if not 0.0 < min_iou <= 1.0:
            raise ValueError(f"min_iou must be in (0, 1], got {min_iou}")
        if distance_weight < 0:
            raise ValueError(f"distance_weight must be >= 0, got {distance_weight}")
        self.max_missed = max_missed
        self.min_iou = min_iou
        self.distance_weight = distance_weight
        self.tracks: list[Track] = []
        self.next_id = first_id
        self.ended: list[int] = []  # the ids that ended at the last update (or reset)

    @property
    def active(self) -> list[int]:
        return [track.id for track in self.tracks]

    def reset(self) -> None:
        """End every track (a new video starts); ids keep counting."""
        self.ended = self.active
        self.tracks = []

    def cost(self, boxes: np.ndarray, landmarks: np.ndarray | None) -> tuple[np.ndarray, np.ndarray]:
        """The cost of every (track, face) pair and whether the pair is allowed (both tracks × faces)."""
        predicted = [track.predicted() for track in self.tracks]
        ahead = np.array([box for box, _ in predicted]).reshape(-1, 4)
        last = np.array([track.box for track in self.tracks]).reshape(-1, 4)
        iou_ahead = iou_matrix(ahead, boxes)
        iou = np.maximum(iou_ahead, iou_matrix(last, boxes))
        allowed = iou >= self.min_iou
        diagonal = np.hypot(ahead[:, 2], ahead[:, 3])[:, None]
        distance = np.linalg.norm(centres(ahead)[:, None] - centres(boxes)[None], axis=2)
        if landmarks is not None:
            for row, (_, points) in enumerate(predicted):
                if points is not None:
                    distance[row] = np.linalg.norm(points[None] - landmarks, axis=2).mean(axis=1)
        cost = (1.0 - iou_ahead) + self.distance_weight * distance / np.maximum(diagonal, 1e-9)
        return cost, allowed

    def update(self, boxes: np.ndarray, landmarks: np.ndarray | None = None) -> list[int]:
        """The track id of each face of the next frame (``boxes`` N×4 x, y, w, h; ``landmarks`` N×5×2 or None),
        in the order given. Tracks that found no face age by one frame; those past ``max_missed`` end (their ids
        are in :attr:`ended` until the next update)."""
        boxes = np.asarray(boxes, np.float64).reshape(-1, 4)
        if landmarks is not None:
            landmarks = np.asarray(landmarks, np.float64).reshape(len(boxes), -1, 2)
        ids: list[int | None] = [None] * len(boxes)
        matched_tracks: set[int] = set()
        if self.tracks and len(boxes):
            cost, allowed = self.cost(boxes, landmarks)
            for row, col in assign(cost, allowed):
                track = self.tracks[row]
                track.see(boxes[col], None if landmarks is None else landmarks[col])
                ids[col] = track.id
                matched_tracks.add(row)
        self.ended = []
        kept = []
        for row, track in enumerate(self.tracks):
            if row not in matched_tracks:
                track.missed += 1
                if track.missed > self.max_missed:
                    self.ended.append(track.id)
                    continue
            kept.append(track)
        self.tracks = kept
        for col, track_id in enumerate(ids):
            if track_id is None:
                points = None if landmarks is None else landmarks[col]
                self.tracks.append(Track(self.next_id, boxes[col].copy(), points))
                ids[col] = self.next_id
                self.next_id += 1
        return [int(i) for i in ids]  # type: ignore[arg-type]


class Smoother:
    """Probabilities smoothed per track by an exponential moving average: ``alpha`` × the new frame's + (1 −
    ``alpha``) × the average so far. A track's first frame is its own average; ``alpha`` 1 is no smoothing."""

    def __init__(self, alpha: float) -> None:
        if not 0.0 < alpha <= 1.0:
            raise ValueError(f"the smoothing factor must be in (0, 1], got {alpha}")
        self.alpha = alpha
        self.state: dict[int, np.ndarray] = {}

    def __call__(self, track: int, probabilities: np.ndarray) -> np.ndarray:
        probabilities = np.asarray(probabilities, np.float64)
        previous = self.state.get(track)
        smoothed = probabilities if previous is None else self.alpha * probabilities + (1 - self.alpha) * previous
        self.state[track] = smoothed
        return smoothed

    def forget(self, tracks: Iterable[int]) -> None:
        """Drop the averages of tracks that ended (memory stays bounded by the tracks alive)."""
        for track in tracks:
            self.state.pop(track, None)
