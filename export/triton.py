"""Write a Triton Inference Server model repository from the bundled classifiers: ``mien export triton``.

For every ``<model-dir>/*.onnx`` that mien would serve (a valid preprocessing spec in its metadata), this
writes::

    <repo>/<model id>/config.pbtxt     platform onnxruntime_onnx, batching, GPU instances, tensors
    <repo>/<model id>/labels.txt       one label per line (Triton's classification extension)
    <repo>/<model id>/1/model.onnx     the file itself, metadata (spec, version) included

Input and output names, data types and dims come from the ONNX file (dims without the batch axis;
``-1`` for any other dynamic axis). The face detector (``<model-dir>/detector/``) and ensembles
(``*.ensemble.json``, which mien averages in Python) are not classifiers Triton can run as one ONNX
graph and are left out. Triton returns the graph's raw output: logits for models whose spec says
``"output": "logits"`` (apply a softmax), which the config's header comment states per model.

Only onnxruntime is needed (no torch, no onnx package), so this runs wherever ``mien serve`` runs.
"""

from __future__ import annotations

import logging
import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import onnxruntime as ort

from mien.runtime import OnnxClassifier

log = logging.getLogger(__name__)

DEFAULT_REPO = "triton_repo"
SAFE_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]*")
PLATFORM = "onnxruntime_onnx"
MODEL_FILE = "model.onnx"
LABELS_FILE = "labels.txt"
VERSION = "1"
DEFAULT_MAX_BATCH_SIZE = 64
DEFAULT_MAX_QUEUE_DELAY_US = 500

# onnxruntime's type strings -> Triton's model_config DataType names.
TRITON_TYPES = {
    "tensor(float)": "TYPE_FP32",
    "tensor(float16)": "TYPE_FP16",
    "tensor(bfloat16)": "TYPE_BF16",
    "tensor(double)": "TYPE_FP64",
    "tensor(int8)": "TYPE_INT8",
    "tensor(int16)": "TYPE_INT16",
    "tensor(int32)": "TYPE_INT32",
    "tensor(int64)": "TYPE_INT64",
    "tensor(uint8)": "TYPE_UINT8",
    "tensor(uint16)": "TYPE_UINT16",
    "tensor(uint32)": "TYPE_UINT32",
    "tensor(uint64)": "TYPE_UINT64",
    "tensor(bool)": "TYPE_BOOL",
    "tensor(string)": "TYPE_STRING",
}


class TritonExportError(ValueError):
    """An ONNX file whose tensors Triton's config cannot describe."""


def _quote(text: str) -> str:
    """A protobuf text-format string literal."""
    escaped = text.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")
    return f'"{escaped}"'


@dataclass(frozen=True)
class TensorConfig:
    name: str
    data_type: str  # TYPE_FP32, ...
    dims: tuple[int, ...]  # without the batch axis when the model batches
    label_filename: str | None = None


@dataclass(frozen=True)
class ModelConfig:
    name: str
    max_batch_size: int  # 0: the graph has no dynamic batch axis, dims are the full shape
    inputs: tuple[TensorConfig, ...]
    outputs: tuple[TensorConfig, ...]
    preferred_batch_sizes: tuple[int, ...] = ()
    max_queue_delay_us: int = DEFAULT_MAX_QUEUE_DELAY_US
    instance_count: int = 1
    comment: tuple[str, ...] = ()

    def to_pbtxt(self) -> str:
        """The config in protobuf text format (what Triton reads from config.pbtxt)."""
        lines = [f"# {line}" for line in self.comment]
        lines += [f"name: {_quote(self.name)}", f'platform: "{PLATFORM}"', f"max_batch_size: {self.max_batch_size}"]
        for kind, tensors in (("input", self.inputs), ("output", self.outputs)):
            for tensor in tensors:
                lines += [f"{kind} {{", f"  name: {_quote(tensor.name)}", f"  data_type: {tensor.data_type}"]
                lines.append(f"  dims: [ {', '.join(str(d) for d in tensor.dims)} ]")
                if tensor.label_filename:
                    lines.append(f"  label_filename: {_quote(tensor.label_filename)}")
                lines.append("}")
        if self.max_batch_size > 0:
            lines.append("dynamic_batching {")
            lines += [f"  preferred_batch_size: {size}" for size in self.preferred_batch_sizes]
            lines += [f"  max_queue_delay_microseconds: {self.max_queue_delay_us}", "}"]
        lines += ["instance_group {", f"  count: {self.instance_count}", "  kind: KIND_GPU", "}"]
        return "\n".join(lines) + "\n"


@dataclass
class TritonExport:
    repo: Path
    exported: dict[str, Path] = field(default_factory=dict)  # model id -> its folder in the repo
    refused: dict[str, str] = field(default_factory=dict)  # file name -> why it was left out


def preferred_batch_sizes(max_batch_size: int) -> tuple[int, ...]:
    """Powers of two from 4 up to ``max_batch_size`` (and that size itself): what the batcher aims for."""
    sizes = [size for size in (4, 8, 16, 32, 64, 128, 256, 512, 1024) if size < max_batch_size]
    return tuple(sizes[-3:] + [max_batch_size]) if max_batch_size > 0 else ()


def _is_dynamic(dim: object) -> bool:
    return not isinstance(dim, int) or dim < 0


def _tensor(arg: ort.NodeArg, batched: bool, label_filename: str | None = None) -> TensorConfig:
    if arg.type not in TRITON_TYPES:
        raise TritonExportError(f"tensor {arg.name!r} has type {arg.type}, which Triton's config cannot name")
    shape = list(arg.shape)
    dims = tuple(-1 if _is_dynamic(d) else int(d) for d in (shape[1:] if batched else shape))
    if not dims:
        raise TritonExportError(f"tensor {arg.name!r} has no dims besides the batch axis")
    return TensorConfig(arg.name, TRITON_TYPES[arg.type], dims, label_filename)


def model_config(
    classifier: OnnxClassifier,
    max_batch_size: int = DEFAULT_MAX_BATCH_SIZE,
    max_queue_delay_us: int = DEFAULT_MAX_QUEUE_DELAY_US,
    instance_count: int = 1,
) -> ModelConfig:
    """The Triton config of one classifier, its tensors read from its ONNX session."""
    if max_batch_size < 1:
        raise ValueError(f"max_batch_size must be at least 1, got {max_batch_size}")
    if not SAFE_NAME.fullmatch(classifier.model_id):
        raise TritonExportError(f"model id {classifier.model_id!r} cannot name a folder of the repository")
    session = classifier.session
    inputs, outputs = session.get_inputs(), session.get_outputs()
    # Triton batches along the first axis only when every input and output has a dynamic one there.
    batched = all(arg.shape and _is_dynamic(arg.shape[0]) for arg in (*inputs, *outputs))
    labels = classifier.spec.num_classes
    spec = classifier.spec
    comment = (
        f"mien model {classifier.model_id} version {classifier.version}, written by `mien export triton`.",
        f"input: faces cropped with margin {spec.crop_margin}, resized to {spec.input_size[0]}x{spec.input_size[1]}, "
        f"{'gray' if spec.channels == 1 else 'RGB'}, (pixel * {spec.scale:.6g} - mean {list(spec.mean)}) / std "
        f"{list(spec.std)}, NCHW float32.",
        f"output {outputs[0].name}: {spec.output} over labels.txt"
        + (" (apply a softmax for probabilities)." if spec.output == "logits" else "."),
    )
    return ModelConfig(
        name=classifier.model_id,
        max_batch_size=max_batch_size if batched else 0,
        inputs=tuple(_tensor(arg, batched) for arg in inputs),
        outputs=tuple(
            _tensor(arg, batched, LABELS_FILE if i == 0 and arg.shape and arg.shape[-1] == labels else None)
            for i, arg in enumerate(outputs)
        ),
        preferred_batch_sizes=preferred_batch_sizes(max_batch_size) if batched else (),
        max_queue_delay_us=max_queue_delay_us,
        instance_count=instance_count,
        comment=comment,
    )


def export_triton(
    out: str | Path = DEFAULT_REPO,
    model_dir: str | Path = "models",
    max_batch_size: int = DEFAULT_MAX_BATCH_SIZE,
    max_queue_delay_us: int = DEFAULT_MAX_QUEUE_DELAY_US,
    instance_count: int = 1,
) -> TritonExport:
    """Write ``<out>/<model id>/{config.pbtxt,labels.txt,1/model.onnx}`` for every classifier in ``model_dir``."""
    if max_batch_size < 1:
        raise ValueError(f"max_batch_size must be at least 1, got {max_batch_size}")
    repo, model_dir = Path(out), Path(model_dir)
    if not model_dir.is_dir():
        raise FileNotFoundError(f"model folder {model_dir} does not exist (use --model-dir)")
    result = TritonExport(repo)
    for path in sorted(model_dir.glob("*.onnx")):  # not detector/ (a subfolder), not *.ensemble.json
        try:
            classifier = OnnxClassifier.from_path(path, providers=("CPUExecutionProvider",), threads=1)
            config = model_config(classifier, max_batch_size, max_queue_delay_us, instance_count)
        except Exception as exc:  # a file mien would refuse to serve is left out, with the reason
            result.refused[path.name] = f"{type(exc).__name__}: {exc}"
            log.error("leaving %s out of the Triton repository: %s", path, exc)
            continue
        if config.name in result.exported:
            result.refused[path.name] = f"duplicate model id {config.name!r}"
            log.error("leaving %s out of the Triton repository: %s", path, result.refused[path.name])
            continue
        folder = repo / config.name
        (folder / VERSION).mkdir(parents=True, exist_ok=True)
        shutil.copyfile(path, folder / VERSION / MODEL_FILE)
        (folder / LABELS_FILE).write_text("\n".join(classifier.spec.labels) + "\n", encoding="utf-8")
        (folder / "config.pbtxt").write_text(config.to_pbtxt(), encoding="utf-8")
        result.exported[config.name] = folder
        log.info("wrote Triton model %s (max_batch_size %d) to %s", config.name, config.max_batch_size, folder)
    return result
