"""An ensemble: a served model id that averages the probabilities of several bundled ONNX models.

Defined by a small JSON file beside the models, ``models/<id>.ensemble.json``::

    {"model_id": "ensemble", "members": ["mini_xception", "dcnn"], "flip": true, "weights": [0.6, 0.4]}

Each member preprocesses the face crops by its own spec (sizes and normalisation may differ); the
ensemble averages their class probabilities, weighted by ``weights`` (optional, one non-negative number
per member, normalised to sum to 1; equal weights when absent; ``mien ensemble --weights fit`` fits them
on the validation split), and with ``"flip": true`` also those of the mirrored crops (horizontal-flip
test-time augmentation). An optional ``"temperature"`` (written by ``mien calibrate``, fitted on the
validation split) calibrates the averaged probabilities: ``softmax(log p / T)``, with an optional
``"entropy_slope"`` b (and ``"entropy_curve"`` c) making the temperature ``T · exp(b · h + c · h²)`` per face
(h: the entropy of p over log of the number of classes, 0 for a certain face, 1 for a uniform one), applied
here and nowhere else (an ensemble has no graph of its own to put it in). The ensemble serves the labels every
member has, in the first member's order (at least two): a member with more (a FER+ model's eighth output,
contempt, in a FER2013 ensemble) contributes its probabilities of those labels, renormalised to sum to 1.
The ensemble quacks like :class:`mien.runtime.OnnxClassifier` where the service and ``mien eval`` use it
(``spec``, ``model_id``, ``version``, ``provider``, ``predict_crops``), so it is served, listed and
evaluated like any other model. ``mien ensemble`` writes the file and its card.
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import replace
from pathlib import Path

import numpy as np

from mien.runtime import DEFAULT_PROVIDERS, OnnxClassifier, SessionConfig

ENSEMBLE_SUFFIX = ".ensemble.json"

log = logging.getLogger(__name__)


def normalised_entropy(probs: np.ndarray) -> np.ndarray:
    """Each row's entropy over log(number of classes): 0 for a one-hot row, 1 for a uniform one (N × 1)."""
    probs = np.asarray(probs, dtype=np.float64)
    probs = probs / probs.sum(axis=1, keepdims=True)
    entropy = -(probs * np.log(np.clip(probs, 1e-12, 1.0))).sum(axis=1, keepdims=True)
    return entropy / np.log(probs.shape[1])


def temper(probs: np.ndarray, temperature: float, entropy_slope: float = 0.0, entropy_curve: float = 0.0) -> np.ndarray:
    """``softmax(log p / T)`` row by row: probabilities made sharper (T < 1) or softer (T > 1); argmax unchanged.

    With ``entropy_slope`` b (and ``entropy_curve`` c) each row gets its own temperature ``T · exp(b · h + c · h²)``,
    h its :func:`normalised_entropy` (b > 0: uncertain faces are softened more than confident ones; c bends that
    line); still positive, so argmax is unchanged."""
    if entropy_slope or entropy_curve:
        h = normalised_entropy(probs)
        temperature = temperature * np.exp(entropy_slope * h + entropy_curve * h * h)
    logits = np.log(np.clip(probs, 1e-12, 1.0)) / temperature
    logits -= logits.max(axis=1, keepdims=True)
    out = np.exp(logits)
    return out / out.sum(axis=1, keepdims=True)


def calibration_suffix(temperature: float | None, entropy_slope: float = 0.0, entropy_curve: float = 0.0) -> str:
    """What a calibrated model's version gets appended (its probabilities changed, its argmax did not):
    ``-t<T>``, ``-e<b>`` with an entropy slope, ``-c<c>`` with an entropy curve; nothing uncalibrated."""
    if temperature is None:
        return ""
    return (f"-t{temperature:.3f}" + (f"-e{entropy_slope:.3f}" if entropy_slope else "")
            + (f"-c{entropy_curve:.3f}" if entropy_curve else ""))  # fmt: skip


def select_columns(probs: np.ndarray, columns: list[int]) -> np.ndarray:
    """The probabilities of ``columns`` only, renormalised to sum to 1 per row (the distribution conditioned on
    the answer being one of those classes)."""
    kept = np.asarray(probs)[:, columns]
    return kept / np.clip(kept.sum(axis=1, keepdims=True), 1e-12, None)


class EnsembleError(ValueError):
    """An ensemble file that cannot be served: unreadable, or members missing or disagreeing."""


def read_ensemble_config(path: str | Path) -> dict:
    """The validated contents of a ``*.ensemble.json`` file."""
    path = Path(path)
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise EnsembleError(f"{path}: unreadable ensemble file: {exc}") from None
    members = config.get("members") if isinstance(config, dict) else None
    if not isinstance(members, list) or len(members) < 2 or not all(isinstance(m, str) and m for m in members):
        raise EnsembleError(f"{path}: 'members' must list at least two model ids, got {members!r}")
    if len(set(members)) != len(members):
        raise EnsembleError(f"{path}: a member is listed twice: {members}")
    flip = config.get("flip", False)
    if not isinstance(flip, bool):
        raise EnsembleError(f"{path}: 'flip' must be true or false, got {flip!r}")
    model_id = config.get("model_id") or path.name.removesuffix(ENSEMBLE_SUFFIX)
    weights = config.get("weights")
    if weights is not None:
        try:
            weights = normalised_weights(weights, len(members))
        except ValueError as exc:
            raise EnsembleError(f"{path}: {exc}") from None
    temperature = config.get("temperature")
    if temperature is not None and not (
        isinstance(temperature, int | float) and not isinstance(temperature, bool) and 0 < temperature < 1e3
    ):
        raise EnsembleError(f"{path}: 'temperature' must be a positive number, got {temperature!r}")
    shape = {}
    for key in ("entropy_slope", "entropy_curve"):
        value = config.get(key, 0.0)
        if not (isinstance(value, int | float) and not isinstance(value, bool) and abs(value) < 1e3):
            raise EnsembleError(f"{path}: {key!r} must be a number, got {value!r}")
        if value and temperature is None:
            raise EnsembleError(f"{path}: an {key!r} needs a 'temperature'")
        shape[key] = float(value)
    temperature = None if temperature is None else float(temperature)
    return {"model_id": str(model_id), "members": members, "flip": flip, "weights": weights,
            "temperature": temperature, **shape}  # fmt: skip


def normalised_weights(weights: list, count: int) -> list[float]:
    """``weights`` scaled to sum to 1, after checking there is one non-negative number per member."""
    if not isinstance(weights, list) or len(weights) != count:
        raise ValueError(f"'weights' must list one number per member ({count}), got {weights!r}")
    if not all(isinstance(w, int | float) and not isinstance(w, bool) and w >= 0 for w in weights):
        raise ValueError(f"'weights' must be non-negative numbers, got {weights!r}")
    total = float(sum(weights))
    if total <= 0:
        raise ValueError(f"'weights' must not all be zero, got {weights!r}")
    return [float(w) / total for w in weights]


class EnsembleClassifier:
    """Weighted mean of the members' probabilities (and of their mirrored crops with ``flip``), tempered by
    ``temperature`` (and ``entropy_slope``, ``entropy_curve``, see :func:`temper`) when one is given."""

    def __init__(
        self,
        model_id: str,
        members: list[OnnxClassifier],
        flip: bool = False,
        weights: list[float] | None = None,
        temperature: float | None = None,
        entropy_slope: float = 0.0,
        entropy_curve: float = 0.0,
    ) -> None:
        if len(members) < 2:
            raise EnsembleError(f"ensemble {model_id!r} needs at least two members, got {len(members)}")
        labels = tuple(name for name in members[0].spec.labels if all(name in m.spec.labels for m in members))
        if len(labels) < 2:
            names = ", ".join(f"{m.model_id}: {list(m.spec.labels)}" for m in members)
            raise EnsembleError(f"ensemble {model_id!r}: the members share fewer than two labels ({names})")
        # per member: the columns of the shared labels, None when they are all of its outputs in the same order
        self._columns = [None if m.spec.labels == labels else [m.spec.labels.index(n) for n in labels] for m in members]
        for m in members:
            if dropped := [n for n in m.spec.labels if n not in labels]:
                log.info("ensemble %s: member %s's %s left out (not every member has them); its probabilities of the "
                         "%d shared labels are renormalised", model_id, m.model_id, dropped, len(labels))  # fmt: skip
        self.members, self.flip, self.model_id = members, flip, model_id
        self.weights = normalised_weights(list(weights), len(members)) if weights is not None else None
        if temperature is not None and not temperature > 0:
            raise EnsembleError(f"ensemble {model_id!r}: a temperature must be positive, got {temperature}")
        if (entropy_slope or entropy_curve) and temperature is None:
            raise EnsembleError(f"ensemble {model_id!r}: an entropy slope or curve needs a temperature")
        self.temperature = temperature
        self.entropy_slope, self.entropy_curve = float(entropy_slope), float(entropy_curve)
        # The crop the service cuts for the ensemble: the first member's framing, probabilities as output.
        self.spec = replace(members[0].spec, output="probabilities", labels=labels)
        identity = [[m.model_id, m.version] for m in members] + [flip]
        digest = hashlib.sha256(json.dumps(identity + ([self.weights] if self.weights else [])).encode())
        # equal weights keep the version they had before weights existed; a temperature marks it as calibrated files
        # are marked (their probabilities changed, their argmax did not)
        self.version = digest.hexdigest()[:12] + calibration_suffix(temperature, self.entropy_slope, self.entropy_curve)
        members_text = ",".join(m.model_id for m in members)
        self.metadata = {"mien.ensemble.members": members_text, "mien.ensemble.flip": str(flip)}
        if self.weights:
            self.metadata["mien.ensemble.weights"] = ",".join(f"{w:.6g}" for w in self.weights)
        if temperature is not None:
            self.metadata["mien.temperature"] = f"{temperature:.6g}"
        if self.entropy_slope:
            self.metadata["mien.entropy_slope"] = f"{self.entropy_slope:.6g}"
        if self.entropy_curve:
            self.metadata["mien.entropy_curve"] = f"{self.entropy_curve:.6g}"

    @property
    def provider(self) -> str:
        return self.members[0].provider

    @property
    def member_ids(self) -> list[str]:
        return [m.model_id for m in self.members]

    def predict_crops(self, crops: list[np.ndarray], batch_size: int = 256) -> np.ndarray:
        """Averaged probabilities (N × labels) for raw uint8 face crops (gray or BGR)."""
        if not crops:
            return np.zeros((0, self.spec.num_classes), dtype=np.float32)
        views = [crops, [np.ascontiguousarray(c[:, ::-1]) for c in crops]] if self.flip else [crops]
        weights = self.weights or [1.0 / len(self.members)] * len(self.members)
        total = sum(
            w * self._member_probabilities(i, view, batch_size) for i, w in enumerate(weights) for view in views
        )
        averaged = total / len(views)
        if self.temperature is not None:
            averaged = temper(averaged, self.temperature, self.entropy_slope, self.entropy_curve)
        return averaged.astype(np.float32)

    def _member_probabilities(self, index: int, crops: list[np.ndarray], batch_size: int) -> np.ndarray:
        """Member ``index``'s probabilities of the ensemble's labels (renormalised when it has others too)."""
        probs = self.members[index].predict_crops(crops, batch_size)
        columns = self._columns[index]
        return probs if columns is None else select_columns(probs, columns)

    @classmethod
    def from_config(cls, path: str | Path, available: dict[str, OnnxClassifier]) -> EnsembleClassifier:
        """Build from a ``*.ensemble.json`` file, taking the members from already loaded models."""
        config = read_ensemble_config(path)
        missing = [m for m in config["members"] if m not in available]
        if missing:
            raise EnsembleError(
                f"{Path(path).name}: member(s) {', '.join(missing)} not among the loaded models "
                f"({', '.join(sorted(available)) or 'none'})"
            )
        members = [available[m] for m in config["members"]]
        return cls(config["model_id"], members, config["flip"], config["weights"], config["temperature"],
                   config["entropy_slope"], config["entropy_curve"])  # fmt: skip

    @classmethod
    def from_path(
        cls, path: str | Path, providers: tuple[str, ...] = DEFAULT_PROVIDERS, threads: int | SessionConfig = 0
    ) -> EnsembleClassifier:
        """Build from a ``*.ensemble.json`` file, loading each member from ``<folder>/<member>.onnx``."""
        path = Path(path)
        config = read_ensemble_config(path)
        available = {}
        for member in config["members"]:
            onnx_path = path.with_name(f"{member}.onnx")
            if not onnx_path.is_file():
                raise EnsembleError(f"{path.name}: member {member!r} has no file {onnx_path}")
            available[member] = OnnxClassifier.from_path(onnx_path, providers=providers, threads=threads)
        return cls.from_config(path, available)


def load_classifier(
    path: str | Path, providers: tuple[str, ...] = DEFAULT_PROVIDERS, threads: int | SessionConfig = 0
) -> OnnxClassifier | EnsembleClassifier:
    """An :class:`OnnxClassifier` for ``*.onnx``, an :class:`EnsembleClassifier` for ``*.ensemble.json``."""
    if str(path).endswith(ENSEMBLE_SUFFIX):
        return EnsembleClassifier.from_path(path, providers=providers, threads=threads)
    return OnnxClassifier.from_path(path, providers=providers, threads=threads)
