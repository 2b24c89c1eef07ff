"""Read FER2013 in its public formats and return images, labels and split.

Supported: the Kaggle ``fer2013.csv`` (columns emotion, pixels, Usage), the image-folder layout
(``<root>/<split>/<emotion>/*.png|jpg``, e.g. ``train/`` and ``test/``) and the ``.npz`` in
``../shared/data`` (arrays images, labels, split, split_names); and CK+ in the CK+48 layout
(``<root>/<emotion>/*.png``, see :func:`load_ckplus`). :func:`load_dataset` tells the layouts apart;
:func:`select_labels` trains on a subset or remapping of the labels. Every error names the file, row
or folder that is wrong and what was expected.
"""

from __future__ import annotations

import csv
import logging
import re
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


#: CK+ label names: FER2013's names for the shared emotions (so subsets and ensembles line up across
#: data sets), plus contempt; in the alphabetical order of the CK+48 folders.
CKPLUS_LABELS: tuple[str, ...] = ("angry", "contempt", "disgust", "fear", "happy", "sad", "surprise")
CKPLUS_FOLDERS = ("anger", "contempt", "disgust", "fear", "happy", "sadness", "surprise")
_CKPLUS_ALIASES = {**{k: v for k, v in FOLDER_ALIASES.items() if v != "neutral"}, "contempt": "contempt"}
_CKPLUS_SUBJECT = re.compile(r"^(S\d+)_")  # CK+ file names start with the subject id, e.g. S010_004_00000017.png


#: The validation split carved out of Training (see :func:`carve_validation`): its name, the share of each
#: class it takes and the seed of the draw. The seed is fixed, not a run's seed, so every run, model and
#: evaluation sees the same split.
CARVED_SPLIT = "val"
VAL_FRACTION = 0.1
VAL_SEED = 2013


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
                images.append(_read_face(file, images[0] if images else None))
                labels.append(FER2013_LABELS.index(name))
                split.append(split_dir.name)
    if not images:
        raise DataError(f"{root}: no .png/.jpg images found under {[d.name for d in split_dirs]}")
    return FaceDataset(np.stack(images), np.array(labels, dtype=np.int64), np.array(split))


def _read_face(file: Path, first: np.ndarray | None) -> np.ndarray:
    """A grayscale face from an image file; every face of a data set must have the first one's size."""
    import cv2

    image = cv2.imread(str(file), cv2.IMREAD_GRAYSCALE)
    if image is None:
        raise DataError(f"{file}: cannot be decoded as an image")
    if first is not None and image.shape != first.shape:
        raise DataError(f"{file}: size {image.shape} differs from the first image's {first.shape}")
    return image


def _check_labels(labels: np.ndarray, num_classes: int, where: str) -> None:
    bad = np.flatnonzero((labels < 0) | (labels >= num_classes))
    if bad.size:
        raise DataError(f"{where}: label {labels[bad[0]]} at index {bad[0]} is outside 0..{num_classes - 1}")


def load_dataset(path: str | Path, val_fraction: float = 0.2, split_seed: int = 0) -> FaceDataset:
    """FER2013 (csv, npz, ``<split>/<emotion>/`` folders) or CK+48 (``<emotion>/`` folders), told apart by layout.

    A folder whose sub-folders are emotion names holding images directly is CK+48; any other folder
    is read as the FER2013 ``<split>/<emotion>/`` layout. ``val_fraction``/``split_seed`` only apply to CK+.
    """
    path = Path(path)
    if path.is_dir():
        subdirs = [p for p in path.iterdir() if p.is_dir()]
        flat = not any(q.is_dir() for d in subdirs for q in d.iterdir())
        if flat and any(d.name.lower() in _CKPLUS_ALIASES for d in subdirs):
            return load_ckplus(path, val_fraction, split_seed)
    return load_fer2013(path)


def load_ckplus(root: str | Path, val_fraction: float = 0.2, seed: int = 0) -> FaceDataset:
    """CK+ in the CK+48 layout: ``<root>/{anger,contempt,disgust,fear,happy,sadness,surprise}/*.png``.

    Labels are :data:`CKPLUS_LABELS` (all seven, even when a folder is absent, so every CK+ model has
    the same outputs). CK+48 has no split, so one is made: ``val_fraction`` of the faces go to split
    ``val`` and the rest to ``train``, deterministically from ``seed``. CK+48 holds the last frames of
    each subject's sequence, near-duplicates; when every file name starts with a subject id (``S010_``),
    whole subjects go to one side so validation never sees a training subject's face. Otherwise the
    split is stratified by class.
    """

    root = Path(root)
    if not root.is_dir():
        raise DataError(f"{root}: no such folder; CK+48 is a folder with {', '.join(CKPLUS_FOLDERS)} sub-folders")
    if not 0.0 < val_fraction < 1.0:
        raise DataError(f"val_fraction must be in (0, 1), got {val_fraction}")
    images, labels, names = [], [], []
    for class_dir in sorted(p for p in root.iterdir() if p.is_dir()):
        label = _CKPLUS_ALIASES.get(class_dir.name.lower())
        if label is None:
            raise DataError(
                f"{class_dir}: unknown CK+ emotion folder {class_dir.name!r}; expected {list(CKPLUS_FOLDERS)}"
            )
        files = sorted(f for f in class_dir.iterdir() if f.suffix.lower() in IMAGE_SUFFIXES)
        if not files:
            raise DataError(f"{class_dir}: no .png/.jpg images in this emotion folder")
        for file in files:
            images.append(_read_face(file, images[0] if images else None))
            labels.append(CKPLUS_LABELS.index(label))
            names.append(file.name)
    if not images:
        raise DataError(f"{root}: no emotion folders; expected {', '.join(CKPLUS_FOLDERS)} holding *.png faces")
    labels_arr = np.array(labels, dtype=np.int64)
    is_val = _ckplus_val_mask(labels_arr, names, val_fraction, seed)
    if is_val.all() or not is_val.any():
        raise DataError(f"{root}: {len(images)} faces are too few to split {val_fraction:.0%} off for validation")
    return FaceDataset(np.stack(images), labels_arr, np.where(is_val, "val", "train"), CKPLUS_LABELS)


def _ckplus_val_mask(labels: np.ndarray, names: list[str], val_fraction: float, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    subjects = [_CKPLUS_SUBJECT.match(n) for n in names]
    if all(subjects):
        ids = np.array([m.group(1) for m in subjects])
        unique = np.unique(ids)
        held_out = rng.permutation(unique)[: max(1, round(val_fraction * len(unique)))]
        return np.isin(ids, held_out)
    mask = np.zeros(len(labels), dtype=bool)
    for c in np.unique(labels):
        members = rng.permutation(np.flatnonzero(labels == c))
        mask[members[: round(val_fraction * len(members))]] = True
    return mask


def select_labels(
    data: FaceDataset, labels: list[str] | tuple[str, ...] | None = None, label_map: dict[str, str] | None = None
) -> FaceDataset:
    """Train on a subset or remapping of the labels: the DCNN paper's 5 classes, FER2013 without disgust…

    ``label_map`` first renames labels (``{"surprise": "happy"}`` merges surprise into happy; a new
    name makes a new class); then ``labels`` picks the classes, in its order, which becomes the
    model's output order. Faces of other classes are dropped. Without ``labels`` every (renamed)
    class is kept, in order of first appearance.
    """
    label_map = dict(label_map or {})
    unknown = sorted(set(label_map) - set(data.label_names))
    if unknown:
        raise DataError(f"label map names {unknown}, not labels of this data set: {list(data.label_names)}")
    renamed = [label_map.get(name, name) for name in data.label_names]
    chosen = tuple(labels) if labels is not None else tuple(dict.fromkeys(renamed))
    missing = [name for name in chosen if name not in renamed]
    if missing:
        after = f" after the label map {label_map}" if label_map else ""
        known = list(dict.fromkeys(renamed))
        raise DataError(f"label(s) {missing} not in this data set; its labels{after} are {known}")
    if len(set(chosen)) != len(chosen) or len(chosen) < 2:
        raise DataError(f"labels must be at least two distinct names, got {list(chosen)}")
    lookup = np.array([chosen.index(name) if name in chosen else -1 for name in renamed])
    new = lookup[data.labels]
    keep = new >= 0
    return FaceDataset(data.images[keep], new[keep], data.split[keep], chosen)


def carve_validation(
    data: FaceDataset, fraction: float, seed: int, source: str = "train", name: str = CARVED_SPLIT
) -> FaceDataset:
    """Move a stratified ``fraction`` of split ``source`` into a new split ``name``.

    Each class gives round(fraction · its count) faces, drawn by a NumPy generator seeded with ``seed``
    in label order, so the same data, fraction and seed give the same split on every run and machine.
    The remaining ``source`` faces are what training fits; the two never overlap.
    """
    if not 0.0 < fraction < 1.0:
        raise ValueError(f"the validation fraction must be in (0, 1), got {fraction}")
    rng = np.random.default_rng(seed)
    split = data.split.astype(object)  # room for a name longer than the existing ones
    for label in range(len(data.label_names)):
        pool = np.flatnonzero((data.split == source) & (data.labels == label))
        split[rng.permutation(pool)[: round(fraction * len(pool))]] = name
    if not (split == name).any():
        raise DataError(f"split {source!r} has no faces to carve a validation split from; splits: {data.splits}")
    return FaceDataset(data.images, data.labels, split.astype(str), data.label_names)


def load_with_validation(
    path: str | Path, fraction: float = VAL_FRACTION, seed: int = VAL_SEED, source: str = "train"
) -> FaceDataset:
    """:func:`load_dataset` with the validation split carved from ``source`` (unless the data has one).

    The carve comes first, on the file's own labels, so that every later relabelling (FER+ votes, a
    subset of classes, merged classes) keeps the same faces out of training: the split belongs to the
    data file, not to a label set.
    """
    data = load_dataset(path)
    return data if CARVED_SPLIT in data.splits else carve_validation(data, fraction, seed, source)
