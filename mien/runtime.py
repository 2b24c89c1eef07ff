"""A small onnxruntime wrapper for mien's classifiers, shared by the service, export and evaluation.

The session's providers are asked for in order (CUDA first by default) and the one that really
runs is read back from the session: onnxruntime-gpu lists CUDA as available on machines where it
cannot load, and then silently runs on CPU; a provider that failed to load once is not asked for again in
the same process (onnxruntime prints its loading errors each time it tries). Session options are chosen in
:class:`SessionConfig`; sessions on CUDA run through IO binding (:func:`run_io_bound`).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnxruntime as ort

from mien.preprocess import to_model_input
from mien.spec import PreprocessSpec

log = logging.getLogger(__name__)

DEFAULT_PROVIDERS = ("CUDAExecutionProvider", "CPUExecutionProvider")
MODEL_ID_KEY = "mien.model_id"
MODEL_VERSION_KEY = "mien.model_version"


OPTIMIZATION_LEVELS = {
    "disabled": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
    "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,  # constant folding, redundant node removal
    "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,  # + fusions (Conv+BN+ReLU, Gemm+activation)
    "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,  # + layout optimisations (NCHWc blocking on CPU)
}
IO_BINDING_DEVICES = {"CUDAExecutionProvider": "cuda"}  # providers whose sessions run through IO binding
#: Providers onnxruntime offered but could not load in this process (see :func:`make_session`).
_UNLOADABLE: set[str] = set()


@dataclass(frozen=True)
class SessionConfig:
    """The onnxruntime session options mien chooses, in one place (the service sets them from MIEN_* settings).

    ``intra_op_threads`` parallelise one operator (a convolution) and are what matters for these CNNs;
    0 lets onnxruntime pick one per physical core. ``inter_op_threads`` only run independent branches of
    the graph in parallel, which needs the parallel execution mode; mien's graphs are chains, so the
    mode is sequential and one inter-op thread is enough. ``spinning``: onnxruntime's pool threads
    busy-wait for the next operator by default, which lowers latency when a core is free for each of
    them but burns CPU that the service's other threads (decoding, detection, other models) need when
    cores are few; off by default.
    """

    intra_op_threads: int = 0
    inter_op_threads: int = 1
    optimization: str = "all"
    spinning: bool = False
    memory_arena: bool = True

    def __post_init__(self) -> None:
        if self.optimization not in OPTIMIZATION_LEVELS:
            raise ValueError(f"optimization must be one of {', '.join(OPTIMIZATION_LEVELS)}, got {self.optimization!r}")
        if self.intra_op_threads < 0 or self.inter_op_threads < 0:
            raise ValueError("thread counts must be >= 0 (0 = onnxruntime's choice)")

    def session_options(self) -> ort.SessionOptions:
        options = ort.SessionOptions()
        options.graph_optimization_level = OPTIMIZATION_LEVELS[self.optimization]
        # Sequential: operators run one after another (each itself multi-threaded); see the class docstring.
        options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        options.intra_op_num_threads = self.intra_op_threads
        options.inter_op_num_threads = self.inter_op_threads
        options.add_session_config_entry("session.intra_op.allow_spinning", "1" if self.spinning else "0")
        options.add_session_config_entry("session.inter_op.allow_spinning", "1" if self.spinning else "0")
        # Memory pattern: after the first run at an input shape, onnxruntime plans every intermediate
        # tensor into one block for that shape and reuses the plan on later runs of the same shape; the
        # service sees a handful of batch sizes (1 .. MIEN_BATCH_MAX_SIZE), so the plans stay few.
        options.enable_mem_pattern = True
        # CPU arena: freed tensors go back to onnxruntime's arena instead of malloc/free on every run. It
        # grows to the largest batch seen and does not shrink, so memory is bounded by the largest batch
        # (the micro-batcher caps it) rather than growing with the number of requests (the soak checks).
        options.enable_cpu_mem_arena = self.memory_arena
        options.log_severity_level = 3  # CUDA load failures on CPU-only machines are expected, not errors
        return options


def make_session(
    path: str | Path, providers: tuple[str, ...] = DEFAULT_PROVIDERS, threads: int | SessionConfig = 0
) -> ort.InferenceSession:
    """An InferenceSession with the requested providers that onnxruntime offers, in order.

    ``threads`` is the intra-op thread count (0 = onnxruntime's choice) or a whole :class:`SessionConfig`.
    """
    config = threads if isinstance(threads, SessionConfig) else SessionConfig(intra_op_threads=threads)
    available = set(ort.get_available_providers()) - _UNLOADABLE
    chosen = [p for p in providers if p in available] or ["CPUExecutionProvider"]
    session = ort.InferenceSession(str(path), sess_options=config.session_options(), providers=chosen)
    if chosen[0] != session.get_providers()[0]:
        # onnxruntime-gpu offers CUDA wherever it is installed and falls back silently when it cannot load,
        # printing its loading errors every time: try once per process, then ask for what does load.
        _UNLOADABLE.add(chosen[0])
        log.warning("%s: %s was requested but could not load (driver, CUDA or cuDNN libraries missing); "
                    "running on %s, and every later session of this process too",
                    Path(path).name, chosen[0], session.get_providers()[0])  # fmt: skip
    return session


def run_io_bound(
    session: ort.InferenceSession, input_name: str, output_name: str, batch: np.ndarray, device: str, device_id: int = 0
) -> np.ndarray:
    """One run with the input copied to ``device`` up front and the output allocated there by onnxruntime.

    Plain ``session.run`` on a GPU provider stages the numpy input into device memory inside the run and
    allocates the output on the CPU; binding both to the device makes the host-to-device copy explicit
    (one ``OrtValue``) and keeps onnxruntime's device allocator for the output, copied back once at the end.
    Works with ``device="cpu"`` as well, which is how it is tested on machines without a GPU.
    """
    binding = session.io_binding()
    binding.bind_ortvalue_input(input_name, ort.OrtValue.ortvalue_from_numpy(batch, device, device_id))
    binding.bind_output(output_name, device, device_id)
    session.run_with_iobinding(binding)
    return binding.copy_outputs_to_cpu()[0]


def softmax(logits: np.ndarray) -> np.ndarray:
    shifted = logits - logits.max(axis=1, keepdims=True)
    exp = np.exp(shifted)
    return exp / exp.sum(axis=1, keepdims=True)


class OnnxClassifier:
    """A face classifier exported by ``mien export``: spec and identity come from its metadata."""

    def __init__(self, session: ort.InferenceSession, name: str = "", io_binding: bool | None = None) -> None:
        """``io_binding``: run through :func:`run_io_bound`; by default only when the session runs on CUDA."""
        self.session = session
        meta = session.get_modelmeta().custom_metadata_map
        self.spec = PreprocessSpec.from_metadata(meta)  # raises SpecError without a valid spec
        self.model_id = meta.get(MODEL_ID_KEY) or name
        self.version = meta.get(MODEL_VERSION_KEY, "unknown")
        self.metadata = dict(meta)
        self.input_name = session.get_inputs()[0].name
        self.output_name = session.get_outputs()[0].name
        provider = session.get_providers()[0]
        self.io_device = IO_BINDING_DEVICES.get(provider, "cpu")
        self.io_device_id = int(session.get_provider_options().get(provider, {}).get("device_id", 0))
        self.io_binding = provider in IO_BINDING_DEVICES if io_binding is None else io_binding
        num_out = session.get_outputs()[0].shape[-1]
        if isinstance(num_out, int) and num_out != self.spec.num_classes:
            raise ValueError(f"model outputs {num_out} classes but its spec names {self.spec.num_classes} labels")

    @classmethod
    def from_path(
        cls, path: str | Path, providers: tuple[str, ...] = DEFAULT_PROVIDERS, threads: int | SessionConfig = 0
    ) -> OnnxClassifier:
        return cls(make_session(path, providers, threads), name=Path(path).stem)

    @property
    def provider(self) -> str:
        """The provider that actually runs this session (first in the session's own list)."""
        return self.session.get_providers()[0]

    def __call__(self, batch: np.ndarray) -> np.ndarray:
        """Probabilities (N × labels) for a preprocessed float32 N×C×H×W batch."""
        batch = np.ascontiguousarray(batch, dtype=np.float32)
        if self.io_binding:
            device = (self.io_device, self.io_device_id)
            out = run_io_bound(self.session, self.input_name, self.output_name, batch, *device)
        else:
            out = self.session.run([self.output_name], {self.input_name: batch})[0]
        return softmax(out) if self.spec.output == "logits" else out

    def predict_crops(self, crops: list[np.ndarray], batch_size: int = 256) -> np.ndarray:
        """Probabilities for raw uint8 face crops (gray or BGR), preprocessed per the spec."""
        if not crops:
            return np.zeros((0, self.spec.num_classes), dtype=np.float32)
        parts = [self(to_model_input(crops[i : i + batch_size], self.spec)) for i in range(0, len(crops), batch_size)]
        return np.concatenate(parts)
