"""`mien results`: every bundled model measured on one split, written to ``docs/results.md`` with figures.

For each ``models/*.onnx`` and ``models/*.ensemble.json`` (through the same classes the service
serves them with): accuracy and macro-F1 on the split, accuracy with a grey patch over 25% of each
face at a random place (the same patches for every model), parameters and MACs (from the card),
milliseconds per face on the onnxruntime CPU provider at batch 1 and 32 (preprocessing included),
epochs and seconds per epoch (from the card). Figures: a confusion matrix and training curves per
model, what each spatial transformer does to faces (its warp, read from the ONNX graph), and a
t-SNE map of the triplet model's embeddings. Also the STN/SR ablation in the form of the paper's
Table 2 and the targets of the issue next to the measured figures.
"""

from __future__ import annotations

import json
import logging
import os
import platform
import statistics
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from mien.service.registry import read_card
from mien.training.evaluate import classification_report, plot_confusion, split_for_labels

from mien.ensemble import ENSEMBLE_SUFFIX, load_classifier
from mien.machine import describe_cpu
from mien.preprocess import to_model_input

log = logging.getLogger("mien.results")

#: The STN/SR paper's Table 2 (FER2013 test accuracy, %), for the ablation rows.
PAPER_ABLATION = {"base_cnn": 66.5, "stn_cnn": 71.4, "sr_cnn": 72.7, "stn_sr_cnn": 73.4}
ABLATION_ROWS = {"base_cnn": "Base", "stn_cnn": "+STN", "sr_cnn": "+SR", "stn_sr_cnn": "+STN+SR"}
#: PublicTest accuracy targets set for the bundled models (issue 4), in %.
TARGETS = {"mini_xception": 66.0, "se_sepconv": 65.2, "dcnn": 66.0, "stn_sr_cnn": 70.0, "ensemble": 74.0}
BEST_SINGLE_TARGET = 72.0


@dataclass
class ResultsConfig:
    model_dir: str = "models"
    data: str = "../shared/data/fer2013.npz"
    split: str = "public_test"
    out: str = "docs/results.md"
    figures: str = "docs/figures/results"
    occlusion_area: float = 0.25
    seed: int = 0
    threads: int = 1  # onnxruntime intra-op threads for the timing (1 = one core, comparable across machines)
    repeats: int = 30  # timed calls per batch size; the median is reported
    tsne_faces: int = 1500


def model_files(model_dir: Path) -> list[Path]:
    """The servable files in ``model_dir``: ONNX models first (by name), then ensembles."""
    return sorted(model_dir.glob("*.onnx")) + sorted(model_dir.glob(f"*{ENSEMBLE_SUFFIX}"))


def occlude(images: np.ndarray, area: float, seed: int) -> np.ndarray:
    """The faces with one mid-grey square over ``area`` of each, at a seeded random place."""
    import torch
    from mien.training.occlusion import random_occlusion

    generator = torch.Generator().manual_seed(seed)
    return random_occlusion(torch.from_numpy(images), area, 128.0, generator).numpy()


def ms_per_face(classifier, faces: np.ndarray, batch: int, repeats: int) -> float:
    """Median milliseconds per face of ``predict_crops`` on ``batch`` faces (after two warm-up calls)."""
    crops = list(faces[:batch])
    for _ in range(2):
        classifier.predict_crops(crops)
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        classifier.predict_crops(crops)
        times.append(time.perf_counter() - started)
    return 1000 * statistics.median(times) / batch


def intermediate(path: Path, tensor: str, inputs: np.ndarray) -> np.ndarray:
    """The value of the named tensor of an ONNX graph for ``inputs``.

    Used to look inside a bundled model without its checkpoint: the STN's warped faces (a GridSample
    output) and the triplet model's embedding (the classifier's input); see :func:`node_tensor`.
    """
    import onnx
    import onnxruntime as ort

    proto = onnx.load(str(path))
    proto.graph.output.append(onnx.helper.make_tensor_value_info(tensor, onnx.TensorProto.FLOAT, None))
    session = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run([tensor], {session.get_inputs()[0].name: inputs})[0]


def node_tensor(path: Path, op_type: str, outputs: int | None = None, take_input: bool = False) -> str:
    """Name of the output (or first input) of the first ``op_type`` node, in graph order.

    With ``outputs``, only Gemm nodes whose weight has that many output rows count: the classifier
    (``num_classes`` outputs), not the spatial transformer's localisation layer (6 outputs).
    """
    import onnx

    proto = onnx.load(str(path))
    weights = {init.name: tuple(init.dims) for init in proto.graph.initializer}
    for node in proto.graph.node:
        if node.op_type != op_type:
            continue
        if outputs is not None:
            trans_b = next((a.i for a in node.attribute if a.name == "transB"), 0)
            dims = weights.get(node.input[1])
            if dims is None or dims[0 if trans_b else 1] != outputs:
                continue
        return node.input[0] if take_input else node.output[0]
    raise ValueError(f"{path.name} has no {op_type} node" + (f" with {outputs} outputs" if outputs else ""))


def has_op(path: Path, op_type: str) -> bool:
    import onnx

    return path.suffix == ".onnx" and any(n.op_type == op_type for n in onnx.load(str(path)).graph.node)


def plot_stn(path: Path, classifier, faces: np.ndarray, out: Path) -> None:
    """Faces before (top row) and after (bottom row) the learned spatial transform."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    spec = classifier.spec
    x = to_model_input(list(faces), spec)
    warped = intermediate(path, node_tensor(path, "GridSample"), x)
    mean, std = np.array(spec.mean)[:, None, None], np.array(spec.std)[:, None, None]
    fig, axes = plt.subplots(2, len(faces), figsize=(1.3 * len(faces), 2.9))
    for i in range(len(faces)):
        for row, image in enumerate((x[i], warped[i])):
            axes[row, i].imshow(((image * std + mean)[0]).clip(0, 1), cmap="gray", vmin=0, vmax=1)
            axes[row, i].axis("off")
    axes[0, 0].set_title("input", loc="left", fontsize=9)
    axes[1, 0].set_title("after the STN", loc="left", fontsize=9)
    fig.suptitle(f"{classifier.model_id}: what the spatial transformer does", fontsize=10)
    fig.tight_layout()
    fig.savefig(out, dpi=100)
    plt.close(fig)


def plot_tsne(path: Path, classifier, faces: np.ndarray, labels: np.ndarray, out: Path, seed: int) -> None:
    """A 2-D t-SNE map of the L2-normalised embeddings, coloured by true class."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from sklearn.manifold import TSNE

    x = to_model_input(list(faces), classifier.spec)
    emb = intermediate(path, node_tensor(path, "Gemm", outputs=classifier.spec.num_classes, take_input=True), x)
    emb /= np.linalg.norm(emb, axis=1, keepdims=True) + 1e-12
    points = TSNE(n_components=2, init="pca", random_state=seed, perplexity=30).fit_transform(emb)
    fig, ax = plt.subplots(figsize=(7, 6))
    for c, name in enumerate(classifier.spec.labels):
        keep = labels == c
        ax.scatter(points[keep, 0], points[keep, 1], s=6, alpha=0.7, label=f"{name} ({keep.sum()})")
    ax.legend(markerscale=3, fontsize=8)
    ax.set(title=f"{classifier.model_id}: t-SNE of {len(faces)} PublicTest embeddings", xticks=[], yticks=[])
    fig.tight_layout()
    fig.savefig(out, dpi=100)
    plt.close(fig)


def plot_card_curves(card: dict, out: Path) -> bool:
    history = card.get("training", {}).get("history") or []
    if not history:
        return False
    from mien.training.train import plot_curves

    plot_curves(history, out)
    return True


def measure(cfg: ResultsConfig) -> list[dict]:
    """One row per servable model in ``cfg.model_dir``, with figures written to ``cfg.figures``."""
    figures = Path(cfg.figures)
    figures.mkdir(parents=True, exist_ok=True)
    rows = []
    for path in model_files(Path(cfg.model_dir)):
        classifier = load_classifier(path, providers=("CPUExecutionProvider",), threads=cfg.threads)
        card = read_card(path) or {}
        model_id = classifier.model_id
        images, labels = split_for_labels(cfg.data, cfg.split, classifier.spec.labels)
        report = classification_report(labels, classifier.predict_crops(list(images)).argmax(1), classifier.spec.labels)
        occluded = occlude(images, cfg.occlusion_area, cfg.seed)
        occluded_acc = float((classifier.predict_crops(list(occluded)).argmax(1) == labels).mean())
        plot_confusion(report, figures / f"{model_id}_confusion.png",
                       f"{model_id} on {cfg.split}: accuracy {report['accuracy']:.3f}")  # fmt: skip
        training = card.get("training", {})
        row = {
            "model_id": model_id,
            "file": path.name,
            "accuracy": report["accuracy"],
            "macro_f1": report["macro_f1"],
            "occluded_accuracy": occluded_acc,
            "num_images": report["num_images"],
            "parameters": card.get("parameters"),
            "macs": card.get("macs"),
            "ms_per_face_b1": ms_per_face(classifier, images, 1, cfg.repeats),
            "ms_per_face_b32": ms_per_face(classifier, images, 32, max(5, cfg.repeats // 3)),
            "epochs": training.get("epochs_run"),
            "seconds_per_epoch": training.get("seconds_per_epoch_median"),
            "train_command": training.get("command"),
            "notes": training.get("notes"),
            "flip_tta": card.get("export", {}).get("flip_tta", card.get("flip")),
            "members": [m["model_id"] for m in card.get("members", [])] or None,
            "figures": {"confusion": f"{model_id}_confusion.png"},
        }
        if plot_card_curves(card, figures / f"{model_id}_curves.png"):
            row["figures"]["curves"] = f"{model_id}_curves.png"
        if has_op(path, "GridSample"):
            pick = np.random.default_rng(cfg.seed).permutation(len(images))[:10]
            plot_stn(path, classifier, images[pick], figures / f"{model_id}_stn.png")
            row["figures"]["stn"] = f"{model_id}_stn.png"
        if card.get("training", {}).get("config", {}).get("model") == "stn_resnet10_triplet" or "triplet" in model_id:
            pick = np.random.default_rng(cfg.seed).permutation(len(images))[: cfg.tsne_faces]
            plot_tsne(path, classifier, images[pick], labels[pick], figures / f"{model_id}_tsne.png", cfg.seed)
            row["figures"]["tsne"] = f"{model_id}_tsne.png"
        log.info("%s: accuracy %.4f, occluded %.4f, %.2f ms/face", model_id, row["accuracy"], occluded_acc,
                 row["ms_per_face_b1"])  # fmt: skip
        rows.append(row)
    return rows


def _pct(value: float | None) -> str:
    return "" if value is None else f"{100 * value:.2f}"


def _count(value: int | None, unit: float, suffix: str) -> str:
    return "" if not value else f"{value / unit:.2f} {suffix}"


def machine() -> str:
    import onnxruntime as ort

    python = platform.python_version()
    return f"{describe_cpu()}, onnxruntime {ort.__version__} CPU provider, Python {python}"


def render(rows: list[dict], cfg: ResultsConfig, command: str) -> str:
    """docs/results.md from the measured rows."""
    figures_rel = Path(os.path.relpath(cfg.figures, Path(cfg.out).parent)).as_posix()
    by_id = {r["model_id"]: r for r in rows}
    ranked = sorted(rows, key=lambda r: -r["accuracy"])
    lines = [
        "# Results: every bundled model on FER2013 " + cfg.split,
        "",
        f"Written by `{command}` on {time.strftime('%Y-%m-%d')}; do not edit by hand. Every figure below is",
        f"measured by that command from the files in `{cfg.model_dir}/` (the ones the service serves), on the "
        f"{rows[0]['num_images'] if rows else 0:,} faces of {cfg.split}, except parameters, MACs, epochs and",
        "seconds per epoch, which come from each model's card (written by `mien train` / `mien export`).",
        "",
        f"Machine: {machine()}; timing with {cfg.threads} onnxruntime thread(s), preprocessing included, median "
        f"of {cfg.repeats} calls.",
        "",
        "MACs: one forward pass as torch's FLOP counter sees it (twice for flip TTA); it does not count LSTM "
        "cells, so `row_lstm`'s figure is its fully connected layer only. Epoch kept: the epoch of the "
        "checkpoint selected on the split; s/epoch: median training seconds per epoch.",
        "",
        f"Occluded: accuracy when a mid-grey square covering {cfg.occlusion_area:.0%} of each face is pasted at a "
        f"random place (seed {cfg.seed}; the same patches for every model).",
        "",
        "| model | accuracy % | macro-F1 % | occluded % | parameters | MACs / face | ms/face b1 | ms/face b32 "
        "| epoch kept | s/epoch |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in ranked:
        lines.append(
            f"| `{r['model_id']}` | {_pct(r['accuracy'])} | {_pct(r['macro_f1'])} | {_pct(r['occluded_accuracy'])} "
            f"| {_count(r['parameters'], 1e6, 'M')} | {_count(r['macs'], 1e6, 'M')} | {r['ms_per_face_b1']:.2f} "
            f"| {r['ms_per_face_b32']:.3f} | {r['epochs'] or ''} | {r['seconds_per_epoch'] or ''} |"
        )
    if all(m in by_id for m in ABLATION_ROWS):
        lines += [
            "",
            "## STN / SR ablation (the paper's Table 2)",
            "",
            "The same classifier (`base_cnn`) alone, with a spatial transformer, with the super-resolution front "
            "end, and with both.",
            "",
            f"| | model | {cfg.split} accuracy % (ours) | paper, FER2013 test % | occluded % (ours) |",
            "|---|---|---|---|---|",
        ]
        for model_id, name in ABLATION_ROWS.items():
            r = by_id[model_id]
            lines.append(f"| {name} | `{model_id}` | {_pct(r['accuracy'])} | {PAPER_ABLATION[model_id]} "
                         f"| {_pct(r['occluded_accuracy'])} |")  # fmt: skip
    singles = [r for r in rows if not r["members"]]
    lines += ["", "## Targets", "", "| target | % | measured % | met |", "|---|---|---|---|"]
    for model_id, target in TARGETS.items():
        if model_id in by_id:
            acc = 100 * by_id[model_id]["accuracy"]
            lines.append(f"| `{model_id}` | {target} | {acc:.2f} | {'yes' if acc >= target else 'no'} |")
    if singles:
        best = max(singles, key=lambda r: r["accuracy"])
        acc = 100 * best["accuracy"]
        lines.append(f"| best single model (`{best['model_id']}`) | {BEST_SINGLE_TARGET} | {acc:.2f} "
                     f"| {'yes' if acc >= BEST_SINGLE_TARGET else 'no'} |")  # fmt: skip
    lines += ["", "## How each model was trained", ""]
    for r in rows:
        extra = f"; members {', '.join(r['members'])}" if r["members"] else ""
        flip = ", flip TTA" if r["flip_tta"] else ""
        notes = f". {r['notes']}" if r["notes"] else ""
        lines.append(f"- `{r['model_id']}` ({r['file']}{flip}{extra}): `{r['train_command'] or 'see its card'}`{notes}")
    lines += ["", "## Figures", ""]
    for r in rows:
        lines.append(f"### `{r['model_id']}`")
        lines.append("")
        for kind, name in r["figures"].items():
            lines.append(f"![{r['model_id']} {kind}]({figures_rel}/{name})")
        lines.append("")
    return "\n".join(lines) + "\n"


def write_results(cfg: ResultsConfig, command: str = "mien results") -> list[dict]:
    rows = measure(cfg)
    if not rows:
        raise FileNotFoundError(f"no .onnx or {ENSEMBLE_SUFFIX} file in {cfg.model_dir}")
    out = Path(cfg.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(render(rows, cfg, command))
    (Path(cfg.figures) / "results.json").write_text(json.dumps(rows, indent=1) + "\n")
    log.info("wrote %s and %d figures in %s", out, sum(len(r["figures"]) for r in rows), cfg.figures)
    return rows
