"""`mien export`: checkpoint → model → ONNX (dynamic batch) → onnx.checker → parity → model card.

The verdict is the exit code: when PyTorch and onnxruntime disagree by more than ``atol`` or on any
argmax, on real faces or on random input, the export fails and says by how much.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import platform
import time
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import torch

from mien.card import Card, Parity, card_path, history_totals, write_card
from mien.export.evaluate import eval_split, score_faces
from mien.paths import DEFAULT_DATA
from mien.preprocess import to_model_input
from mien.runtime import MODEL_ID_KEY, MODEL_VERSION_KEY, OnnxClassifier, make_session
from mien.spec import PreprocessSpec
from mien.training.checkpoint import load_model
from mien.training.tencrop import FACE_SIZE, NUM_VIEWS, ten_crop

log = logging.getLogger("mien.export")

INPUT_NAME, OUTPUT_NAME = "input", "logits"


@dataclass
class ExportConfig:
    checkpoint: str
    out: str | None = None  # default models/<model id>.onnx
    data: str = DEFAULT_DATA
    split: str = "public_test"  # the split the card's accuracy is measured on: the test split
    parity_faces: int = 512
    atol: float = 1e-4
    opset: int = 20  # the legacy exporter supports affine_grid (STN models) from opset 20
    flip_tta: bool = False  # average the logits of each face and its mirror image inside the graph
    ten_crop: int = 0  # crop size: average the logits of the ten crops (corners, centre, mirrored) in the graph
    shift_tta: int = 0  # pixels: average the logits of the face moved by these pixels (SHIFT_PATTERNS) in the graph
    shift_pattern: str = "grid"
    model_id: str | None = None  # the id it is served as; default the checkpoint's network (e.g. a second seed)


#: The parity verdict is the card's parity block, so the card records exactly what was checked.
ParityResult = Parity


class FlipAverage(torch.nn.Module):
    """Test-time augmentation in the graph: the mean of the logits for x and its horizontal mirror."""

    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return 0.5 * (self.model(x) + self.model(torch.flip(x, dims=[3])))


class TenCropAverage(torch.nn.Module):
    """Ten-crop test-time augmentation in the graph: the mean of the logits of the four corner crops and
    the centre crop of the face, and of their mirror images (for networks trained on random crops)."""

    def __init__(self, model: torch.nn.Module, size: int) -> None:
        super().__init__()
        self.model, self.size = model, size

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        views = ten_crop(x, self.size)  # 10 × N × C × size × size
        return self.model(views.flatten(0, 1)).view(NUM_VIEWS, x.shape[0], -1).mean(0)


#: The shifts of shift TTA, in units of its pixels: every (dx, dy) of a 3×3 grid, or the centre and the four
#: moves along the axes (plus) or along the diagonals (cross).
SHIFT_PATTERNS = {
    "grid": [(dx, dy) for dy in (-1, 0, 1) for dx in (-1, 0, 1)],
    "plus": [(0, 0), (1, 0), (-1, 0), (0, 1), (0, -1)],
    "cross": [(0, 0), (1, 1), (-1, -1), (1, -1), (-1, 1)],
}


class ShiftAverage(torch.nn.Module):
    """Shift test-time augmentation in the graph: the mean of the logits of the face moved by each (dx, dy) of
    ``shifts`` pixels (right and down for positive values), its edge pixels repeated into the border a move
    uncovers, as the training augmentation's small random shifts leave it (around a flip-averaging model, each
    view is also mirrored)."""

    def __init__(self, model: torch.nn.Module, shifts: list[tuple[int, int]]) -> None:
        super().__init__()
        self.model, self.shifts = model, [(int(dx), int(dy)) for dx, dy in shifts]
        self.pad = max(abs(v) for shift in self.shifts for v in shift)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pad, (height, width) = self.pad, x.shape[-2:]
        padded = torch.nn.functional.pad(x, (pad, pad, pad, pad), mode="replicate")
        views = torch.cat([padded[..., pad - dy : pad - dy + height, pad - dx : pad - dx + width]
                           for dx, dy in self.shifts])  # fmt: skip
        return self.model(views).view(len(self.shifts), x.shape[0], -1).mean(0)


def shift_views(pixels: int, pattern: str) -> list[tuple[int, int]]:
    """The (dx, dy) moves of ``--shift-tta pixels --shift-pattern pattern``."""
    if pattern not in SHIFT_PATTERNS:
        raise ValueError(f"unknown shift pattern {pattern!r} (one of {', '.join(SHIFT_PATTERNS)})")
    if pixels < 1:
        raise ValueError(f"--shift-tta needs at least 1 pixel, got {pixels}")
    return [(dx * pixels, dy * pixels) for dx, dy in SHIFT_PATTERNS[pattern]]


def test_time_augmentation(cfg: ExportConfig) -> str:
    """The name the ONNX metadata and the card give the graph's test-time augmentation: "none", "flip",
    "ten_crop_<size>", "shift_<pattern>_<pixels>" or "flip+shift_<pattern>_<pixels>"."""
    if cfg.ten_crop and (cfg.flip_tta or cfg.shift_tta):
        raise ValueError("--ten-crop excludes --flip-tta and --shift-tta (ten-crop already averages mirrored views)")
    if cfg.ten_crop:
        return f"ten_crop_{cfg.ten_crop}"
    shift = [f"shift_{cfg.shift_pattern}_{cfg.shift_tta}"] if cfg.shift_tta else []
    parts = (["flip"] if cfg.flip_tta else []) + shift
    return "+".join(parts) or "none"


def graph_spec(spec: PreprocessSpec, ten_crop_size: int = 0) -> PreprocessSpec:
    """The preprocessing of the exported graph's input, from the network's. Ten-crop cuts its views out of a face
    larger than them: a network whose input is larger than the crop (vgg_fer: 48×48, trained on 40×40 crops)
    keeps its spec; one whose input is the crop itself (dcnn: 42×42 views of the 48×48 FER2013 face) gets the
    face the views were cut from, 48×48, framed so that its central crop-sized part is the network's own framing
    (the margin m of a crop-sized face → ((1 + 2m)·48/crop − 1)/2: dcnn's 0.025 → 0.1, FER2013's framing)."""
    height, width = spec.input_size
    if not ten_crop_size or ten_crop_size < min(height, width):
        return spec
    if (height, width) != (ten_crop_size, ten_crop_size) or ten_crop_size >= FACE_SIZE:
        raise ValueError(f"--ten-crop {ten_crop_size}: the network's input is {height}×{width}; ten-crop needs a "
                         f"crop smaller than it, or its own size when that is under the {FACE_SIZE}×{FACE_SIZE} face "
                         "the views are cut from")  # fmt: skip
    margin = ((1 + 2 * spec.crop_margin) * FACE_SIZE / ten_crop_size - 1) / 2
    return replace(spec, input_size=(FACE_SIZE, FACE_SIZE), crop_margin=round(margin, 6))


def with_test_time_augmentation(model: torch.nn.Module, tta: str) -> torch.nn.Module:
    """``model`` wrapped in the test-time augmentation named by ``tta`` (``test_time_augmentation``'s names)."""
    for part in tta.split("+"):
        if part == "flip":
            model = FlipAverage(model).eval()
        elif part.startswith("ten_crop_"):
            model = TenCropAverage(model, int(part.removeprefix("ten_crop_"))).eval()
        elif part.startswith("shift_"):
            pattern, pixels = part.removeprefix("shift_").rsplit("_", 1)
            model = ShiftAverage(model, shift_views(int(pixels), pattern)).eval()
        elif part != "none":
            raise ValueError(f"unknown test-time augmentation {part!r}")
    return model


def count_macs(model: torch.nn.Module, example: torch.Tensor) -> int:
    """Multiply-accumulates of one forward pass at batch 1 (torch's FLOP counter counts 2 per MAC)."""
    from torch.utils.flop_counter import FlopCounterMode

    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model(example[:1])
    return counter.get_total_flops() // 2


def weights_version(model: torch.nn.Module) -> str:
    """A short, stable fingerprint of the weights: the model's version string."""
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()[:12]


def to_onnx(
    model: torch.nn.Module, example: torch.Tensor, path: Path, opset: int, metadata: dict[str, str],
    names: tuple[str, str] = (INPUT_NAME, OUTPUT_NAME), axes: dict[int, str] | None = None,
) -> None:  # fmt: skip
    """Write ``model`` to ``path`` with ``metadata`` in metadata_props and dynamic ``axes`` of its input and output
    (default: the batch axis), named ``names``; check it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    axes = axes or {0: "batch"}
    torch.onnx.export(
        model, (example,), str(path), dynamo=False, opset_version=opset,
        input_names=[names[0]], output_names=[names[1]], dynamic_axes={names[0]: axes, names[1]: axes},
    )  # fmt: skip
    proto = onnx.load(str(path))
    del proto.metadata_props[:]
    for key, value in metadata.items():
        entry = proto.metadata_props.add()
        entry.key, entry.value = key, value
    onnx.checker.check_model(proto, full_check=True)
    onnx.save(proto, str(path))


def toolchain() -> dict[str, str]:
    """What made an exported file, for its card's ``export`` block: the versions of the tools, and the date."""
    return {"torch": torch.__version__, "onnx": onnx.__version__, "onnxruntime": ort.__version__,
            "python": platform.python_version(), "date": time.strftime("%Y-%m-%d")}  # fmt: skip


def check_parity(
    model: torch.nn.Module, session: ort.InferenceSession, real: np.ndarray, atol: float, seed: int = 0
) -> ParityResult:
    """Compare PyTorch and onnxruntime on preprocessed real faces and on random input, at several batch sizes."""
    rng = np.random.default_rng(seed)
    random_inputs = rng.normal(0.0, 1.5, size=(32, *real.shape[1:])).astype(np.float32)
    batches = [real[:1], real[1:6], real, random_inputs[:1], random_inputs]
    worst, agree, total = 0.0, 0, 0
    for batch in batches:
        with torch.no_grad():
            expected = model(torch.from_numpy(batch)).numpy()
        got = session.run([OUTPUT_NAME], {INPUT_NAME: batch})[0]
        worst = max(worst, float(np.abs(expected - got).max()))
        agree += int((expected.argmax(1) == got.argmax(1)).sum())
        total += len(batch)
    agreement = agree / total
    return ParityResult(
        real_faces=len(real), random_inputs=len(random_inputs), max_abs_diff=worst, argmax_agreement=agreement,
        atol=atol, passed=worst <= atol and agreement == 1.0, batch_sizes=[len(b) for b in batches],
    )  # fmt: skip


def log_parity(parity: ParityResult, compared: str) -> None:
    """One log line for a parity verdict: INFO when it passed, ERROR when not."""
    level = logging.INFO if parity.passed else logging.ERROR
    log.log(level, "parity %s: max |%s| = %.2e (atol %.0e), argmax agreement %.4f over %d real + %d random",
            "passed" if parity.passed else "FAILED", compared, parity.max_abs_diff, parity.atol,
            parity.argmax_agreement, parity.real_faces, parity.random_inputs)  # fmt: skip


def export_checkpoint(cfg: ExportConfig) -> ParityResult:
    """Run the whole export; write the ONNX file and its card; return the parity verdict."""
    if cfg.parity_faces < 256:
        raise ValueError(f"--parity-faces must be at least 256 real faces, got {cfg.parity_faces}")
    model, network_spec, ckpt = load_model(cfg.checkpoint)
    model_id = cfg.model_id or ckpt["model_id"]
    tta = test_time_augmentation(cfg)
    model = with_test_time_augmentation(model, tta)
    spec = graph_spec(network_spec, cfg.ten_crop)  # what the file's input is: the network's, or the face ten-crop cuts
    out = Path(cfg.out or f"models/{model_id}.onnx")

    trained = ckpt.get("train_config", {})  # a FER+ model is scored on the FER+ labels it learnt
    label_source = trained.get("label_source", "fer2013")
    faces = eval_split(cfg.data, cfg.split, spec.labels, label_source, trained.get("ferplus_votes", ""))
    pick = np.random.default_rng(0).permutation(len(faces.images))[: cfg.parity_faces]
    if len(pick) < 256:
        raise ValueError(f"split {cfg.split!r} has only {len(pick)} faces; parity needs at least 256")
    real = to_model_input(list(faces.images[pick]), spec)

    version = weights_version(model)
    metadata = {**spec.to_metadata(), MODEL_ID_KEY: model_id, MODEL_VERSION_KEY: version,
                "mien.test_time_augmentation": tta}  # fmt: skip
    started = time.perf_counter()
    to_onnx(model, torch.from_numpy(real[:2]), out, cfg.opset, metadata)
    log.info("wrote %s (%.1f kB) in %.1f s", out, out.stat().st_size / 1024, time.perf_counter() - started)

    parity = check_parity(model, make_session(out, ("CPUExecutionProvider",)), real, cfg.atol)
    log_parity(parity, "torch - onnx")

    report = score_faces(OnnxClassifier.from_path(out, providers=("CPUExecutionProvider",)), faces)
    macs = count_macs(model, torch.from_numpy(real[:1]))
    card = model_card(cfg, out, ckpt, spec, version, sum(p.numel() for p in model.parameters()), macs, parity, report,
                      model_id, network_spec)  # fmt: skip
    write_card(card_path(out), card)
    log.info("%s accuracy of the ONNX file: %.4f; card %s", cfg.split, report["accuracy"], card_path(out))
    return parity


def model_card(
    cfg: ExportConfig,
    out: Path,
    ckpt: dict,
    spec: PreprocessSpec,
    version: str,
    parameters: int,
    macs: int,
    parity: Parity,
    report: dict,
    model_id: str | None = None,
    network_spec: PreprocessSpec | None = None,
) -> Card:
    """The card of an exported file: its identity, what it was scored and selected on, how it was trained.
    ``network_spec``: the network's own input, recorded when the graph's differs (ten-crop around a network whose
    input is the crop: :func:`graph_spec`), so the network can be rebuilt from the file (`mien recover`)."""
    label_source = ckpt.get("train_config", {}).get("label_source", "fer2013")
    history = ckpt.get("history", [])
    return Card(
        model_id=model_id or ckpt["model_id"],
        version=version,
        file=out.name,
        sha256=hashlib.sha256(out.read_bytes()).hexdigest(),
        labels=list(spec.labels),
        spec=spec.to_dict(),
        parameters=parameters,
        macs=macs,
        metrics={
            "split": cfg.split,
            "selected_on": selection_split(ckpt),
            "accuracy": report["accuracy"],
            "macro_f1": report["macro_f1"],
            "num_images": report["num_images"],
            "per_class": report["per_class"],
            "label_source": label_source,
            "measured_by": f"mien eval {out} --data {cfg.data} --split {cfg.split}"
            + (f" --label-source {label_source}" if label_source != "fer2013" else ""),
        },  # fmt: skip
        training={
            "command": ckpt.get("command", ""),
            "recipe": ckpt.get("recipe", ""),  # configs/<model>.toml when trained with `mien train --config`
            "config": ckpt.get("train_config", {}),
            "best": ckpt.get("metrics", {}),
            "epochs_run": len(history),
            "notes": ckpt.get("notes"),
            "seconds_per_epoch_median": _median([h["seconds"] for h in history]),
            "history": [  # per-epoch figures, for the training curves in docs/results.md
                {k: round(v, 5) if isinstance(v, float) else v for k, v in h.items()} for h in history
            ],
            # a recovered checkpoint has no run folder beside it: it carries the totals its card had
            **(
                {"run": run}
                if (run := run_totals(Path(cfg.checkpoint), ckpt.get("train_config", {})) or ckpt.get("run"))
                else {}
            ),
        },
        parity=parity,
        export={
            "command": f"mien export {cfg.checkpoint} --out {out} --data {cfg.data} --split {cfg.split}"
            + (" --flip-tta" if cfg.flip_tta else "")
            + (f" --ten-crop {cfg.ten_crop}" if cfg.ten_crop else "")
            + (f" --shift-tta {cfg.shift_tta} --shift-pattern {cfg.shift_pattern}" if cfg.shift_tta else "")
            + (f" --model-id {cfg.model_id}" if cfg.model_id else ""),
            "opset": cfg.opset,
            "flip_tta": cfg.flip_tta,
            **({"ten_crop": cfg.ten_crop} if cfg.ten_crop else {}),
            **({"shift_tta": cfg.shift_tta, "shift_pattern": cfg.shift_pattern} if cfg.shift_tta else {}),
            **({"network_spec": network_spec.to_dict()} if network_spec is not None and network_spec != spec else {}),
            **toolchain(),
        },  # fmt: skip
    )


def run_totals(checkpoint: Path, config: dict) -> dict:
    """What the whole run cost (:func:`mien.card.history_totals`), from the ``history.jsonl`` of the run folder the
    checkpoint is in (the checkpoint's own history ends at the epoch it kept; time lost to an interrupted epoch is
    not counted; threads 0, torch's default, counts this machine's cores; one process: a torchrun run spends that
    on each of its processes). {} when the checkpoint is not in a run folder."""
    path = checkpoint.parent / "history.jsonl"
    if not path.is_file():
        return {}
    entries = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return history_totals(entries, int(config.get("threads") or 0) or (os.cpu_count() or 1))


def selection_split(ckpt: dict) -> str | None:
    """The split that selected the checkpoint: the one its best metrics were measured on (``mien train``
    records it), else the validation split of its training config (checkpoints written before it did)."""
    return ckpt.get("metrics", {}).get("split") or ckpt.get("train_config", {}).get("val_split")


def _median(values: list[float]) -> float | None:
    """Median, not mean: a run paused or sharing the CPU for a while should not skew its epoch time."""
    return round(float(np.median(values)), 1) if values else None
