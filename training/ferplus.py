"""FER+ labels for the FER2013 faces: ten annotators' votes per image, as hard (majority) or soft targets.

The FER+ votes file (``fer2013new.csv`` of microsoft/FERPlus, or ``ferplus_votes.csv`` beside the npz)
has one line per FER2013 image, in the same order, with the votes for neutral, happiness, surprise,
sadness, anger, disgust, fear, contempt, unknown and NF (not a face). What this module does with them,
following the FER+ paper's own processing (Barsoum et al., 2016):

* a class with a single vote is an outlier and its vote is dropped;
* the **majority** label is the class holding more than half of the remaining votes. An image without
  one, or whose majority is ``unknown`` or ``NF``, has no FER+ label and is left out of training and
  evaluation alike (249 unknown/NF and 3,790 without majority of the 32,298 images);
* the **soft** target is the distribution of the remaining emotion votes (unknown/NF votes left out),
  on the same images as the majority label, which is still what validation accuracy is measured on.

Classes: ``ferplus`` is the 8 FER+ emotions, named as FER2013 names them and in FER2013's order with
``contempt`` last, so a FER+ model's first seven outputs line up with every FER2013 model.
``ferplus7`` maps to FER2013's 7 classes: contempt votes are discarded (FER2013 has no contempt), so an
image whose majority was contempt (132 images) is left out and a soft target renormalises over seven.
"""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np

from mien.spec import FER2013_LABELS
from mien.training.data import DataError, FaceDataset

#: The vote columns of the FER+ file, in its order.
VOTE_COLUMNS = ("neutral", "happiness", "surprise", "sadness", "anger", "disgust", "fear", "contempt", "unknown", "NF")
#: FER+ emotion → FER2013 name (contempt keeps its own; CK+ calls it that too).
_NAMES = {"happiness": "happy", "sadness": "sad", "anger": "angry"}
FERPLUS_LABELS: tuple[str, ...] = (*FER2013_LABELS, "contempt")
LABEL_SOURCES = ("fer2013", "ferplus", "ferplus7")
TARGETS = ("majority", "soft")


def default_votes_path(data: str | Path) -> Path:
    """``ferplus_votes.csv`` in the folder of the FER2013 file."""
    return Path(data).with_name("ferplus_votes.csv")


def load_votes(path: str | Path) -> np.ndarray:
    """(N, 10) int votes in :data:`VOTE_COLUMNS` order; a missing file or column is a DataError naming it."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: no FER+ votes file (fer2013new.csv of microsoft/FERPlus, one line per FER2013 image)")
    with path.open(newline="") as fh:
        reader = csv.DictReader(fh)
        missing = [c for c in VOTE_COLUMNS if c not in (reader.fieldnames or [])]
        if missing:
            raise DataError(f"{path}: not a FER+ votes file, columns {missing} missing (has {reader.fieldnames})")
        return np.array([[int(row[c] or 0) for c in VOTE_COLUMNS] for row in reader], dtype=np.int64)


def vote_targets(votes: np.ndarray, classes: tuple[str, ...]) -> tuple[np.ndarray, np.ndarray]:
    """(majority label per image, -1 where none; soft target distribution (N, len(classes)))."""
    votes = np.where(votes <= 1, 0, votes)  # single votes are outliers (FER+ paper)
    kept = [VOTE_COLUMNS.index(c) for c in VOTE_COLUMNS if _NAMES.get(c, c) in classes]
    names = [_NAMES.get(VOTE_COLUMNS[i], VOTE_COLUMNS[i]) for i in kept]
    order = [names.index(c) for c in classes]  # the votes' columns in the model's class order
    emotion = votes[:, kept][:, order].astype(np.float64)
    top = votes.argmax(1)
    majority = votes.max(1) > 0.5 * votes.sum(1)
    top_name = np.array([_NAMES.get(c, c) for c in VOTE_COLUMNS])[top]
    labels = np.array([classes.index(n) if n in classes else -1 for n in top_name])
    labels = np.where(majority, labels, -1)
    total = emotion.sum(1, keepdims=True)
    soft = np.divide(emotion, total, out=np.zeros_like(emotion), where=total > 0).astype(np.float32)
    return labels, soft


def ferplus_dataset(
    data: FaceDataset, votes_path: str | Path, source: str = "ferplus"
) -> tuple[FaceDataset, np.ndarray]:
    """FER2013 faces relabelled by FER+ majority vote, and their soft targets; images without a label dropped.

    ``data`` must be FER2013 in its original row order (the npz or csv), as the votes file is.
    """
    if source not in ("ferplus", "ferplus7"):
        raise ValueError(f"FER+ label source must be ferplus or ferplus7, got {source!r}")
    votes = load_votes(votes_path)
    if len(votes) != len(data):
        raise DataError(
            f"{votes_path}: {len(votes)} vote rows for {len(data)} images; the FER+ votes must be aligned line by "
            "line with FER2013 (Training and PublicTest rows, in the original order)"
        )
    classes = FERPLUS_LABELS if source == "ferplus" else FER2013_LABELS
    labels, soft = vote_targets(votes, classes)
    keep = labels >= 0
    return FaceDataset(data.images[keep], labels[keep], data.split[keep], classes), soft[keep]
