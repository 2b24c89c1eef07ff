"""A model's probabilities on a set of faces, kept on disk under the content of both.

``mien results`` scores every bundled model on the test split (clean and occluded faces), which takes most of
its time, and a session that adds one model would otherwise score all the others again. With a cache folder,
a model file whose bytes (an ensemble's: its JSON and every member's) and onnxruntime version are unchanged,
asked for the same faces, gets the probabilities it gave before; anything else is computed and stored. Timings
are never cached: they are measured on the classifier itself.
"""

from __future__ import annotations

import hashlib
import logging
import os
from pathlib import Path

import numpy as np

from mien.ensemble import ENSEMBLE_SUFFIX, read_ensemble_config

log = logging.getLogger("mien.prob_cache")


def fingerprint(path: str | Path) -> str:
    """A digest of what a servable file computes: its bytes, an ensemble's members' bytes, onnxruntime's version."""
    import onnxruntime

    path = Path(path)
    digest = hashlib.sha256(f"onnxruntime {onnxruntime.__version__}\n".encode())
    files = [path]
    if path.name.endswith(ENSEMBLE_SUFFIX):
        files += [path.with_name(f"{member}.onnx") for member in read_ensemble_config(path)["members"]]
    for file in files:
        digest.update(file.name.encode() + b"\0" + file.read_bytes())
    return digest.hexdigest()


class CachedClassifier:
    """``classifier`` with ``predict_crops`` answered from ``folder`` when the same model saw the same crops
    before; every other attribute is the classifier's. ``hits`` and ``misses`` count the calls."""

    def __init__(self, classifier, model_fingerprint: str, folder: str | Path) -> None:
        self.classifier, self.model_fingerprint, self.folder = classifier, model_fingerprint, Path(folder)
        self.hits = self.misses = 0

    def __getattr__(self, name: str):
        return getattr(self.classifier, name)

    def key(self, crops: list[np.ndarray]) -> str:
        digest = hashlib.sha256(self.model_fingerprint.encode())
        for crop in crops:
            crop = np.ascontiguousarray(crop)
            digest.update(f"{crop.dtype.str}{crop.shape}".encode() + crop.tobytes())
        return digest.hexdigest()

    def predict_crops(self, crops: list[np.ndarray], batch_size: int = 256) -> np.ndarray:
        file = self.folder / f"{self.key(crops)}.npy"
        if file.is_file():
            try:
                probs = np.load(file)
            except (OSError, ValueError) as exc:  # a truncated or foreign file: computed again and replaced
                log.warning("recomputing %s: %s", file.name, exc)
            else:
                if probs.ndim == 2 and len(probs) == len(crops):
                    self.hits += 1
                    return probs
        probs = self.classifier.predict_crops(crops, batch_size)
        self.misses += 1
        self.folder.mkdir(parents=True, exist_ok=True)
        partial = file.with_name(f"{file.stem}.{os.getpid()}.partial.npy")
        np.save(partial, probs)
        os.replace(partial, file)  # whole or absent, even if interrupted
        return probs


def cached(classifier, path: str | Path, folder: str | Path | None):
    """``classifier`` itself without a ``folder``, else a :class:`CachedClassifier` of the file at ``path``."""
    return classifier if folder is None else CachedClassifier(classifier, fingerprint(path), folder)
