"""Read FER2013 in its public formats and return images, labels and split.

Supported: the Kaggle ``fer2013.csv`` (columns emotion, pixels, Usage), the image-folder layout
(``<root>/<split>/<emotion>/*.png|jpg``, e.g. ``train/`` and ``test/``) and the ``.npz`` in
``../shared/data`` (arrays images, labels, split, split_names). Every error names the file, row or
folder that is wrong and what was expected.
"""

from __future__ import annotations

import csv
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from mien.spec import FER2013_LABELS

log = logging.getLogger(__name__)

#: FER2013 ``Usage`` values → split names used throughout mien.
USAGE_TO_SPLIT = {"Training": "train", "PublicTest": "public_test", "PrivateTest": "private_test"}
IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp"}
# Folder names seen in public copies of FER2013 for each label.
FOLDER_ALIASES = {
    "angry": "angry", "anger": "angry",
    "disgust": "disgust", "disgusted": "disgust",
    "fear": "fear", "fearful": "fear",
    "happy": "happy", "happiness": "happy",
    "sad": "sad", "sadness": "sad",
    "surprise": "surprise", "surprised": "surprise",
    "neutral": "neutral",
}  # fmt: skip


class DataError(ValueError):
    """The data set on disk is missing or not in a format mien reads."""


@dataclass(frozen=True)
class FaceDataset:
    """Grayscale faces (N×H×W uint8), integer labels into ``label_names``, and a split name per image."""

    images: np.ndarray
    labels: np.ndarray
    split: np.ndarray
    label_names: tuple[str, ...] = FER2013_LABELS

    def __len__(self) -> int:
        return len(self.labels)

    @property
    def splits(self) -> list[str]:
        return sorted(set(self.split.tolist()))

    def subset(self, split: str) -> tuple[np.ndarray, np.ndarray]:
        """Images and labels of one split; an unknown split fails naming the ones present."""
        mask = self.split == split
        if not mask.any():
            raise DataError(f"no images in split {split!r}; this data set has splits {self.splits}")
        return self.images[mask], self.labels[mask]


def load_fer2013(path: str | Path) -> FaceDataset:
    """Load FER2013 from a ``.csv``, a ``.npz`` or an image-folder root."""
    path = Path(path)
    if not path.exists():
        raise DataError(
            f"{path}: no such file or folder. Pass FER2013 as fer2013.csv (Kaggle), as an image folder "
            "(train/<emotion>/*.png, test/<emotion>/*.png) or as the fer2013.npz of ../shared/data"
        )
    if path.is_dir():
        return _load_folder(path)
    if path.suffix == ".csv":
        return _load_csv(path)
    if path.suffix == ".npz":
        return _load_npz(path)
    raise DataError(f"{path}: unsupported file type {path.suffix!r}; expected .csv, .npz or a folder")


def _load_npz(path: Path) -> FaceDataset:
    try:
        archive = np.load(path, allow_pickle=False)
    except (OSError, ValueError) as exc:
        raise DataError(f"{path}: not a readable .npz archive ({exc})") from exc
    with archive:
        missing = [k for k in ("images", "labels", "split") if k not in archive.files]
        if missing:
            raise DataError(f"{path}: missing array(s) {missing}; found {sorted(archive.files)}")
        images, labels, split_ids = archive["images"], archive["labels"], archive["split"]
        names = archive["split_names"] if "split_names" in archive.files else np.array(["train", "public_test"])
        label_names = tuple(archive["label_names"].tolist()) if "label_names" in archive.files else FER2013_LABELS
    if images.ndim != 3 or images.dtype != np.uint8:
        raise DataError(f"{path}: 'images' must be uint8 N×H×W, got {images.dtype} {images.shape}")
    if not len(images) == len(labels) == len(split_ids):
        raise DataError(
            f"{path}: arrays differ in length: images {len(images)}, labels {len(labels)}, split {len(split_ids)}"
        )
    _check_labels(labels, len(label_names), str(path))
    split = np.asarray([str(n) for n in names])[split_ids.astype(np.int64)]
    return FaceDataset(images, labels.astype(np.int64), split, label_names)


def _load_csv(path: Path) -> FaceDataset:
    images, labels, split = [], [], []
    with path.open(newline="") as handle:
        reader = csv.DictReader(handle)
        header = reader.fieldnames or []
        missing = [c for c in ("emotion", "pixels", "Usage") if c not in header]
        if missing:
            raise DataError(f"{path}: missing column(s) {missing}; the header has {header}")
        side = None
        for line, row in enumerate(reader, start=2):  # line 1 is the header
            where = f"{path}, line {line}"
            try:
                label = int(row["emotion"])
            except (TypeError, ValueError):
                raise DataError(f"{where}: emotion {row['emotion']!r} is not an integer") from None
            if not 0 <= label < len(FER2013_LABELS):
                raise DataError(f"{where}: emotion {label} is outside 0..{len(FER2013_LABELS) - 1}")
            try:
                pixels = np.array((row["pixels"] or "").split(), dtype=np.int64)
            except ValueError:
                raise DataError(f"{where}: pixels must be space-separated integers") from None
            side = side or int(round(len(pixels) ** 0.5))
            if len(pixels) != side * side or side == 0:
                raise DataError(f"{where}: {len(pixels)} pixel values; expected {side * side} ({side}×{side})")
            if pixels.min() < 0 or pixels.max() > 255:
                raise DataError(f"{where}: pixel values must lie in 0..255")
            usage = row["Usage"]
            if usage not in USAGE_TO_SPLIT:
                raise DataError(f"{where}: Usage {usage!r} is not one of {sorted(USAGE_TO_SPLIT)}")
            images.append(pixels.astype(np.uint8).reshape(side, side))
            labels.append(label)
            split.append(USAGE_TO_SPLIT[usage])
    if not images:
        raise DataError(f"{path}: the file has a header but no rows")
    return FaceDataset(np.stack(images), np.array(labels, dtype=np.int64), np.array(split))


def _load_folder(root: Path) -> FaceDataset:
    import cv2

    split_dirs = sorted(p for p in root.iterdir() if p.is_dir())
    if not split_dirs:
        raise DataError(f"{root}: no split folders; expected e.g. {root}/train/happy/*.png and {root}/test/...")
    images, labels, split = [], [], []
    for split_dir in split_dirs:
        for class_dir in sorted(p for p in split_dir.iterdir() if p.is_dir()):
            name = FOLDER_ALIASES.get(class_dir.name.lower())
            if name is None:
                raise DataError(
                    f"{class_dir}: unknown emotion folder {class_dir.name!r}; expected one of {list(FER2013_LABELS)}"
                )
            for file in sorted(class_dir.iterdir()):
                if file.suffix.lower() not in IMAGE_SUFFIXES:
                    continue
                image = cv2.imread(str(file), cv2.IMREAD_GRAYSCALE)
                if image is None:
                    raise DataError(f"{file}: cannot be decoded as an image")
                if images and image.shape != images[0].shape:
                    raise DataError(f"{file}: size {image.shape} differs from the first image's {images[0].shape}")
                images.append(image)
                labels.append(FER2013_LABELS.index(name))
                split.append(split_dir.name)
    if not images:
        raise DataError(f"{root}: no .png/.jpg images found under {[d.name for d in split_dirs]}")
    return FaceDataset(np.stack(images), np.array(labels, dtype=np.int64), np.array(split))


def _check_labels(labels: np.ndarray, num_classes: int, where: str) -> None:
    bad = np.flatnonzero((labels < 0) | (labels >= num_classes))
    if bad.size:
        raise DataError(f"{where}: label {labels[bad[0]]} at index {bad[0]} is outside 0..{num_classes - 1}")
