"""Load every ``*.onnx`` in the model folder once, refusing (and logging) each that cannot be served.

A model is served only when its metadata carries a valid preprocessing spec; its model card
(``<stem>.card.json`` beside it) is optional and only adds the reported accuracy.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np

from mien.card import Card, CardError, card_for, card_path
from mien.ensemble import ENSEMBLE_SUFFIX, EnsembleClassifier
from mien.runtime import DEFAULT_PROVIDERS, OnnxClassifier, SessionConfig
from mien.service.batching import MicroBatcher
from mien.service.exceptions import ModelNotFound

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class LoadedModel:
    """A classifier ready to serve, with what /models reports about it."""

    classifier: OnnxClassifier | EnsembleClassifier
    path: Path
    card: Card | None = None
    batcher: MicroBatcher | None = None  # set by ModelRegistry.start_batching

    @property
    def runner(self) -> OnnxClassifier | EnsembleClassifier | MicroBatcher:
        """What /predict hands its face crops to: the shared micro-batcher, or the classifier itself."""
        return self.batcher if self.batcher is not None else self.classifier

    @property
    def model_id(self) -> str:
        return self.classifier.model_id

    @property
    def version(self) -> str:
        card_version = self.card.version if self.card else None
        return card_version if self.classifier.version == "unknown" and card_version else self.classifier.version

    @property
    def provider(self) -> str:
        return self.classifier.provider

    @property
    def accuracy(self) -> float | None:
        return self.card.accuracy if self.card else None

    @property
    def accuracy_split(self) -> str | None:
        """The split the card's accuracy was measured on."""
        return self.card.tested_on if self.card else None

    @property
    def calibration(self) -> dict | None:
        """What /models says of the calibration the card records (None: uncalibrated or no card): its method, the
        split it was fitted on, and ECE before and after on the held-out split the card reports."""
        block = self.card.calibration if self.card else None
        if block is None:
            return None
        held_out = [split for split in block.after if split != block.fitted_on]
        tested_on = self.accuracy_split if self.accuracy_split in held_out else (held_out[0] if held_out else None)
        return {
            "method": block.method,
            "fitted_on": block.fitted_on,
            "tested_on": tested_on,
            "ece_before": block.before.get(tested_on, {}).get("ece") if tested_on else None,
            "ece_after": block.after.get(tested_on, {}).get("ece") if tested_on else None,
        }


def load_card(model_path: Path) -> Card | None:
    """The model card beside ``model_path``, or None (logged) when it is absent or invalid: a card only adds
    what /models reports, so a bad one must not keep the model from being served."""
    try:
        card = card_for(model_path)
    except (CardError, OSError) as exc:
        log.warning("ignoring model card %s: %s", card_path(model_path), exc)
        return None
    if card is None:
        log.info("no model card %s; accuracy will be reported as null", card_path(model_path))
    return card


@dataclass
class ModelRegistry:
    """The models loaded at start-up, by id, plus the files that were refused and why."""

    models: dict[str, LoadedModel]
    default_id: str
    model_dir: Path
    refused: dict[str, str] = field(default_factory=dict)
    warm: bool = False  # set by warm_up: /ready waits for it
    warmup_ms: dict[str, float] = field(default_factory=dict)

    @classmethod
    def load(
        cls,
        model_dir: Path,
        default_id: str,
        providers: tuple[str, ...] = DEFAULT_PROVIDERS,
        threads: int | SessionConfig = 0,
    ) -> ModelRegistry:
        models: dict[str, LoadedModel] = {}
        refused: dict[str, str] = {}
        if not model_dir.is_dir():
            log.error("model directory %s does not exist; no model will be served (set MIEN_MODEL_DIR)", model_dir)
            return cls(models, default_id, model_dir, refused)
        loaded: list[tuple[Path, OnnxClassifier]] = []
        for path in sorted(model_dir.glob("*.onnx")):
            try:
                loaded.append((path, OnnxClassifier.from_path(path, providers=providers, threads=threads)))
            except Exception as exc:  # a bad file must not stop the others from being served
                refused[path.name] = f"{type(exc).__name__}: {exc}"
                log.error("refusing model %s: %s", path, exc)
        # When two files carry the same model id, the one named <id>.onnx wins, then the first by name.
        loaded.sort(key=lambda item: (item[0].stem != item[1].model_id, item[0].name))
        for path, classifier in loaded:
            if classifier.model_id in models:
                other = models[classifier.model_id].path.name
                refused[path.name] = f"duplicate model id {classifier.model_id!r}, already served from {other}"
                log.error("refusing model %s: %s", path, refused[path.name])
                continue
            models[classifier.model_id] = LoadedModel(classifier, path, load_card(path))
            log.info(
                "loaded model %s version %s from %s on %s",
                classifier.model_id,
                models[classifier.model_id].version,
                path,
                classifier.provider,
            )
        for path in sorted(model_dir.glob(f"*{ENSEMBLE_SUFFIX}")):  # after the ONNX files: built from them
            try:
                ensemble = EnsembleClassifier.from_config(path, {i: m.classifier for i, m in models.items()})
            except Exception as exc:
                refused[path.name] = f"{type(exc).__name__}: {exc}"
                log.error("refusing ensemble %s: %s", path, exc)
                continue
            if ensemble.model_id in models:
                refused[path.name] = f"duplicate model id {ensemble.model_id!r}"
                log.error("refusing ensemble %s: %s", path, refused[path.name])
                continue
            models[ensemble.model_id] = LoadedModel(ensemble, path, load_card(path))
            log.info("loaded ensemble %s of %s from %s", ensemble.model_id, ", ".join(ensemble.member_ids), path)
        if not models:
            log.error("no servable model in %s; /ready will answer 503", model_dir)
        elif default_id not in models:
            log.error(
                "default model %r is not among the loaded models (%s); set MIEN_DEFAULT_MODEL",
                default_id,
                ", ".join(models),
            )
        return cls(models, default_id, model_dir, refused)

    @property
    def ids(self) -> list[str]:
        return sorted(self.models)

    @property
    def ready(self) -> bool:
        """Ready when the default model is loaded (requests that name no model must work) and warmed up."""
        return self.default_id in self.models and self.warm

    def not_ready_reason(self) -> str:
        if self.default_id in self.models:
            return "the models are warming up; retry in a moment"
        if not self.models:
            refused = "; ".join(f"{name}: {why}" for name, why in self.refused.items())
            return f"no model loaded from {self.model_dir}" + (f" (refused: {refused})" if refused else "")
        return (
            f"the default model {self.default_id!r} is not loaded; loaded models: {', '.join(self.ids)} "
            "(set MIEN_DEFAULT_MODEL)"
        )

    def warm_up(self, batch_sizes: tuple[int, ...] = (1,)) -> dict[str, float]:
        """Classify a grey dummy face at each batch size with every model, so that onnxruntime's first-run
        work (memory plans per input shape, kernel set-up) is not paid by the first request. Milliseconds
        per model, also kept in ``warmup_ms``."""
        for model_id, loaded in self.models.items():
            spec = loaded.classifier.spec
            face = np.full((*spec.input_size, 3), 128, np.uint8)
            start = time.perf_counter()
            for size in batch_sizes:
                loaded.classifier.predict_crops([face] * size)
            self.warmup_ms[model_id] = (time.perf_counter() - start) * 1000.0
        self.warm = True
        return dict(self.warmup_ms)

    def start_batching(
        self, max_size: int, max_wait_ms: float, on_batch: Callable[[str, int], None] | None = None
    ) -> None:
        """One :class:`MicroBatcher` per served model; ``on_batch(model_id, faces)`` after every call."""
        for model_id, loaded in list(self.models.items()):
            record = None if on_batch is None else (lambda n, model_id=model_id: on_batch(model_id, n))
            batcher = MicroBatcher(loaded.classifier, max_size, max_wait_ms, record, name=model_id)
            self.models[model_id] = replace(loaded, batcher=batcher)

    def close(self) -> None:
        """Stop every batcher (waiting requests are answered first)."""
        for model_id, loaded in list(self.models.items()):
            if loaded.batcher is not None:
                loaded.batcher.close()
                self.models[model_id] = replace(loaded, batcher=None)

    def get(self, model_id: str) -> LoadedModel:
        try:
            return self.models[model_id]
        except KeyError:
            raise ModelNotFound(model_id, self.ids) from None
