"""A small onnxruntime wrapper for mien's classifiers, shared by the service, export and evaluation.

The session's providers are asked for in order (CUDA first by default) and the one that really
runs is read back from the session: onnxruntime-gpu lists CUDA as available on machines where it
cannot load, and then silently runs on CPU.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import onnxruntime as ort

from mien.preprocess import to_model_input
from mien.spec import PreprocessSpec

log = logging.getLogger(__name__)

DEFAULT_PROVIDERS = ("CUDAExecutionProvider", "CPUExecutionProvider")
MODEL_ID_KEY = "mien.model_id"
MODEL_VERSION_KEY = "mien.model_version"


def make_session(
    path: str | Path, providers: tuple[str, ...] = DEFAULT_PROVIDERS, threads: int = 0
) -> ort.InferenceSession:
    """An InferenceSession with the requested providers that onnxruntime offers, in order."""
    available = set(ort.get_available_providers())
    chosen = [p for p in providers if p in available] or ["CPUExecutionProvider"]
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    if threads:
        options.intra_op_num_threads = threads
    options.log_severity_level = 3  # CUDA load failures on CPU-only machines are expected, not errors
    session = ort.InferenceSession(str(path), sess_options=options, providers=chosen)
    if chosen[0] != session.get_providers()[0]:
        # onnxruntime-gpu offers CUDA wherever it is installed and falls back silently when it cannot load.
        log.warning("%s: %s was requested but could not load (driver, CUDA or cuDNN libraries missing); "
                    "running on %s", Path(path).name, chosen[0], session.get_providers()[0])  # fmt: skip
    return session


def softmax(logits: np.ndarray) -> np.ndarray:
    shifted = logits - logits.max(axis=1, keepdims=True)
    exp = np.exp(shifted)
    return exp / exp.sum(axis=1, keepdims=True)


class OnnxClassifier:
    """A face classifier exported by ``mien export``: spec and identity come from its metadata."""

    def __init__(self, session: ort.InferenceSession, name: str = "") -> None:
        self.session = session
        meta = session.get_modelmeta().custom_metadata_map
        self.spec = PreprocessSpec.from_metadata(meta)  # raises SpecError without a valid spec
        self.model_id = meta.get(MODEL_ID_KEY) or name
        self.version = meta.get(MODEL_VERSION_KEY, "unknown")
        self.metadata = dict(meta)
        self.input_name = session.get_inputs()[0].name
        self.output_name = session.get_outputs()[0].name
        num_out = session.get_outputs()[0].shape[-1]
        if isinstance(num_out, int) and num_out != self.spec.num_classes:
            raise ValueError(f"model outputs {num_out} classes but its spec names {self.spec.num_classes} labels")

    @classmethod
    def from_path(cls, path: str | Path, providers: tuple[str, ...] = DEFAULT_PROVIDERS, threads: int = 0):
        return cls(make_session(path, providers, threads), name=Path(path).stem)

    @property
    def provider(self) -> str:
        """The provider that actually runs this session (first in the session's own list)."""
        return self.session.get_providers()[0]

    def __call__(self, batch: np.ndarray) -> np.ndarray:
        """Probabilities (N × labels) for a preprocessed float32 N×C×H×W batch."""
        out = self.session.run([self.output_name], {self.input_name: batch.astype(np.float32, copy=False)})[0]
        return softmax(out) if self.spec.output == "logits" else out

    def predict_crops(self, crops: list[np.ndarray], batch_size: int = 256) -> np.ndarray:
        """Probabilities for raw uint8 face crops (gray or BGR), preprocessed per the spec."""
        if not crops:
            return np.zeros((0, self.spec.num_classes), dtype=np.float32)
        parts = [self(to_model_input(crops[i : i + batch_size], self.spec)) for i in range(0, len(crops), batch_size)]
        return np.concatenate(parts)
