"""The model card: what export measured about a served file, beside it as ``<id>.card.json``.

One schema, one path rule, one reader and one writer. Export writes cards (``mien export`` for an ONNX
model, ``mien ensemble`` for an ensemble); the service, ``mien results`` and the recipes read them.
The service trusts only the ONNX metadata for serving; a card adds what a user is told (accuracy, on
which split, how the model was trained).

Cards are read leniently: every block except the identity is optional, because cards written by
earlier versions lack blocks (an ensemble has no ``training``, older cards no ``label_source``), and
unknown keys are kept and written back in place, so a card a newer version wrote survives a round trip
through an older one. :func:`write_card` writes what was set, so read-then-write leaves a file as it was.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, ValidationError, field_validator

from mien.ensemble import ENSEMBLE_SUFFIX
from mien.spec import PreprocessSpec, SpecError

CARD_SUFFIX = ".card.json"
#: A card that describes no classifier but a pre-trained SR front end (``mien export`` of a ``mien pretrain-sr``
#: checkpoint), and the folder of the model directory that keeps them, which the service does not serve.
SR_FRONT_END_KIND = "sr_front_end"
FRONT_ENDS_DIR = "frontends"


class CardError(ValueError):
    """A card file that exists but cannot be read as a model card."""


class _Block(BaseModel):
    # extra="allow": keys this version does not know are kept, and written back after the known ones.
    model_config = ConfigDict(extra="allow")


class ClassScores(_Block):
    precision: float
    recall: float
    f1: float
    support: int


class Metrics(_Block):
    """The served file measured on one split (by the same code as ``mien eval``)."""

    split: str  # the split that tested the file: these figures are measured on it
    # The split that selected the checkpoint (best epoch, early stopping). When it equals ``split``, the
    # figures are optimistic: the bundled models trained before issue 14 were selected on public_test.
    selected_on: str | None = None
    accuracy: float
    macro_f1: float | None = None
    num_images: int | None = None
    per_class: dict[str, ClassScores] | None = None
    label_source: str | None = None  # fer2013 (absent on older cards), ferplus or ferplus7
    measured_by: str | None = None  # the command that gives the same figures


class Training(_Block):
    """How the checkpoint was trained, copied from it by export."""

    command: str | None = None  # the `mien train` command line
    recipe: str | None = None  # configs/<model id>.toml when trained from a recipe
    config: dict[str, Any] = {}  # TrainConfig as a dict: training owns its fields
    best: dict[str, Any] = {}  # the checkpoint's metrics (val_acc, val_loss, epoch, split, ...)
    epochs_run: int | None = None
    notes: str | None = None
    seconds_per_epoch_median: float | None = None
    history: list[dict[str, Any]] = []  # per-epoch figures, for the training curves
    # the whole run (not only up to the kept epoch): epochs, seconds, threads, cpu_hours; absent on
    # older cards and for a checkpoint exported outside its run folder
    run: dict[str, Any] = {}


def history_totals(entries: Iterable[dict[str, Any]], threads: int) -> dict[str, Any]:
    """What the epochs of a training history cost: their number (an epoch written twice, by a resume after a crash,
    counts once), their training seconds (wall clock, validation included), the torch threads, and CPU-hours: the
    process's CPU time when every epoch recorded it (``cpu_seconds``: all its threads, never time the run spent
    paused), else seconds × threads / 3600, an upper bound for those epochs. ``cpu_hours_from`` says which."""
    epochs = {int(e["epoch"]): e for e in entries}
    seconds = sum(float(e.get("seconds", 0.0)) for e in epochs.values())
    measured = all("cpu_seconds" in e for e in epochs.values())
    cpu = sum(float(e["cpu_seconds"]) for e in epochs.values()) if measured else seconds * threads
    return {"epochs": len(epochs), "seconds": round(seconds, 1), "threads": threads,
            "cpu_hours": round(cpu / 3600, 3),
            "cpu_hours_from": "process CPU time" if measured else "seconds x threads"}  # fmt: skip


class Parity(_Block):
    """PyTorch against onnxruntime on real faces and random input (export's verdict)."""

    real_faces: int
    random_inputs: int
    max_abs_diff: float
    argmax_agreement: float
    atol: float
    passed: bool
    batch_sizes: list[int] = []


class ExportInfo(_Block):
    """The command that wrote the file and the versions it ran with (an ensemble's: command and date only)."""

    command: str
    opset: int | None = None
    flip_tta: bool | None = None
    ten_crop: int | None = None  # crop size of ten-crop test-time augmentation in the graph
    torch: str | None = None
    onnx: str | None = None
    onnxruntime: str | None = None
    python: str | None = None
    date: str


class Calibration(_Block):
    """The temperature inside the served graph (``mien calibrate``) and what it changed."""

    temperature: float
    # per face T · exp(entropy_slope · h + entropy_curve · h²), h its normalised entropy (mien.ensemble.temper);
    # both 0: one temperature
    entropy_slope: float = 0.0
    entropy_curve: float = 0.0
    # "temperature" (T alone), "entropy" (T and entropy_slope, by NLL) or "top-label" (T, slope and curve, by the
    # top label's log loss: see mien.export.calibration.fit_calibration)
    method: str = "temperature"
    fitted_on: str | None = None  # the split the calibration is fitted on (val: carved from Training)
    label_source: str | None = None  # the labels it is fitted and measured on (the model's card's; None: fer2013)
    before: dict[str, dict[str, float]] = {}  # split -> ece, nll, brier of the uncalibrated file
    after: dict[str, dict[str, float]] = {}  # the same, calibrated
    measured_by: str | None = None


class Member(_Block):
    """One model of an ensemble, with its own accuracy from its card (None when it has none)."""

    model_id: str
    version: str
    accuracy: float | None = None


class Card(_Block):
    """A model card. Field order is the order written to disk."""

    model_id: str
    version: str
    file: str  # the served file's name, beside the card
    kind: Literal["ensemble"] | None = None  # absent for a single ONNX model
    members: list[Member] | None = None  # ensemble only
    flip: bool | None = None  # ensemble only: mirrored faces averaged too
    weights: list[float] | None = None  # ensemble only: each member's weight (None: equal)
    weights_fitted_on: str | None = None  # ensemble only: the split whose NLL the weights minimise
    sha256: str | None = None
    labels: list[str]
    spec: dict[str, Any] | None = None  # PreprocessSpec.to_dict(); the ONNX metadata holds the served copy
    parameters: int | None = None
    macs: int | None = None  # multiply-accumulates per face (twice with flip TTA)
    metrics: Metrics | None = None
    training: Training | None = None
    parity: Parity | None = None
    calibration: Calibration | None = None
    export: ExportInfo | None = None

    @field_validator("spec")
    @classmethod
    def _valid_spec(cls, value: dict[str, Any] | None) -> dict[str, Any] | None:
        if value is not None:
            try:
                PreprocessSpec.from_dict(value)
            except SpecError as exc:
                raise ValueError(f"invalid spec: {exc}") from None
        return value

    @property
    def accuracy(self) -> float | None:
        return self.metrics.accuracy if self.metrics else None

    @property
    def tested_on(self) -> str | None:
        """The split the card's figures were measured on."""
        return self.metrics.split if self.metrics else None

    @property
    def selected_on(self) -> str | None:
        """The split that selected the checkpoint (None when the card does not say)."""
        return self.metrics.selected_on if self.metrics else None

    @property
    def label_source(self) -> str:
        """The labels the model learnt and is scored on: fer2013 unless the card says otherwise (FER+)."""
        return (self.metrics.label_source if self.metrics else None) or "fer2013"

    def to_dict(self) -> dict[str, Any]:
        """The card as written to disk (JSON types; fields never set are left out)."""
        return self.model_dump(mode="json", exclude_unset=True)


def card_path(model_path: str | Path) -> Path:
    """``models/<id>.onnx`` (or ``<id>.ensemble.json``) -> ``models/<id>.card.json``."""
    model_path = Path(model_path)
    stem = model_path.name.removesuffix(ENSEMBLE_SUFFIX).removesuffix(".onnx")
    return model_path.with_name(stem + CARD_SUFFIX)


def read_card(path: str | Path) -> Card:
    """The card in the file ``path``; FileNotFoundError when there is none, CardError when it is invalid."""
    path = Path(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CardError(f"{path}: unreadable model card: {exc}") from None
    if not isinstance(data, dict):
        raise CardError(f"{path}: a model card is a JSON object, got {type(data).__name__}")
    try:
        return Card.model_validate(data)
    except ValidationError as exc:
        problems = "; ".join(f"{'.'.join(map(str, e['loc'])) or 'card'}: {e['msg']}" for e in exc.errors())
        raise CardError(f"{path}: invalid model card: {problems}") from None


def card_for(model_path: str | Path) -> Card | None:
    """The card beside a model file, or None when it has none (CardError when it has an invalid one)."""
    path = card_path(model_path)
    return read_card(path) if path.is_file() else None


def write_card(path: str | Path, card: Card | dict[str, Any]) -> Path:
    """Validate ``card`` and write it to ``path`` (indented JSON, as the bundled cards are); returns the path."""
    if not isinstance(card, Card):
        card = Card.model_validate(card)
    path = Path(path)
    path.write_text(json.dumps(card.to_dict(), indent=2) + "\n", encoding="utf-8")
    return path
