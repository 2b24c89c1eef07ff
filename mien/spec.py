"""The preprocessing spec: how a face crop becomes the tensor a model was trained on.

It is defined once here and travels with every model: training stores it in the checkpoint, export
writes it into the ONNX file's ``metadata_props``, and the service reads it back with
:meth:`PreprocessSpec.from_metadata` and refuses a model without a valid one. This module depends only
on the standard library so that the service can use it without torch.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, fields

#: FER2013's label order; every model trained on FER2013 uses it.
FER2013_LABELS: tuple[str, ...] = ("angry", "disgust", "fear", "happy", "sad", "surprise", "neutral")

#: Key of the ONNX ``metadata_props`` entry that holds the spec as JSON.
METADATA_KEY = "mien.preprocess_spec"

OUTPUT_KINDS = ("logits", "probabilities")


class SpecError(ValueError):
    """A preprocessing spec is missing, malformed or inconsistent."""


@dataclass(frozen=True)
class PreprocessSpec:
    """Everything needed to turn a face crop into model input.

    ``pixel = (raw * scale - mean) / std`` per channel, on an image resized to
    ``input_size`` (height, width) after cropping the face box enlarged by ``crop_margin``
    (a fraction of the box's size added on every side).
    """

    input_size: tuple[int, int] = (48, 48)
    channels: int = 1  # 1 = grayscale, 3 = RGB
    scale: float = 1.0 / 255.0
    mean: tuple[float, ...] = (0.5,)
    std: tuple[float, ...] = (0.5,)
    crop_margin: float = 0.1
    labels: tuple[str, ...] = field(default=FER2013_LABELS)
    output: str = "logits"  # what the model's output holds before the service's softmax
    layout: str = "NCHW"

    def __post_init__(self) -> None:
        # Coerce JSON lists back to tuples so that specs compare and hash equal after a round trip.
        for name in ("input_size", "mean", "std", "labels"):
            object.__setattr__(self, name, tuple(getattr(self, name)))
        self.validate()

    def validate(self) -> None:
        """Raise :class:`SpecError` naming the first field that is wrong."""
        h_w = self.input_size
        if len(h_w) != 2 or any(not isinstance(v, int) or v < 8 or v > 1024 for v in h_w):
            raise SpecError(f"input_size must be two integers in [8, 1024], got {h_w!r}")
        if self.channels not in (1, 3):
            raise SpecError(f"channels must be 1 or 3, got {self.channels!r}")
        if not self.scale > 0:
            raise SpecError(f"scale must be positive, got {self.scale!r}")
        if len(self.mean) != self.channels or len(self.std) != self.channels:
            raise SpecError(
                f"mean and std need one value per channel ({self.channels}), got mean={self.mean!r} std={self.std!r}"
            )
        if any(not s > 0 for s in self.std):
            raise SpecError(f"std values must be positive, got {self.std!r}")
        if not 0.0 <= self.crop_margin <= 1.0:
            raise SpecError(f"crop_margin must be in [0, 1], got {self.crop_margin!r}")
        if len(self.labels) < 2 or len(set(self.labels)) != len(self.labels):
            raise SpecError(f"labels must be at least two distinct names, got {self.labels!r}")
        if any(not isinstance(label, str) or not label for label in self.labels):
            raise SpecError(f"labels must be non-empty strings, got {self.labels!r}")
        if self.output not in OUTPUT_KINDS:
            raise SpecError(f"output must be one of {OUTPUT_KINDS}, got {self.output!r}")
        if self.layout != "NCHW":
            raise SpecError(f"layout must be 'NCHW', got {self.layout!r}")

    @property
    def num_classes(self) -> int:
        return len(self.labels)

    def to_dict(self) -> dict:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)

    @classmethod
    def from_dict(cls, data: dict) -> PreprocessSpec:
        if not isinstance(data, dict):
            raise SpecError(f"a spec must be a JSON object, got {type(data).__name__}")
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise SpecError(f"unknown spec fields {unknown}; known fields are {sorted(known)}")
        try:
            return cls(**data)
        except TypeError as exc:  # e.g. a number where a list belongs
            raise SpecError(f"malformed spec: {exc}") from exc

    @classmethod
    def from_json(cls, text: str) -> PreprocessSpec:
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise SpecError(f"spec is not valid JSON: {exc}") from exc
        return cls.from_dict(data)

    def to_metadata(self) -> dict[str, str]:
        """The ``metadata_props`` entries export writes into the ONNX file."""
        return {METADATA_KEY: self.to_json()}

    @classmethod
    def from_metadata(cls, metadata: dict[str, str]) -> PreprocessSpec:
        """Read the spec back from ONNX metadata (``session.get_modelmeta().custom_metadata_map``)."""
        if METADATA_KEY not in metadata:
            raise SpecError(
                f"no '{METADATA_KEY}' entry in the model's metadata; export the model with "
                "`mien export` so that it carries its preprocessing spec"
            )
        return cls.from_json(metadata[METADATA_KEY])
