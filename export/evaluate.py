"""`mien eval`: accuracy, per-class precision/recall/F1, a confusion matrix and calibration (ECE, NLL, Brier,
a reliability diagram) on one split.

Works on a training checkpoint (.pt, run with torch) or an exported ONNX file (run with
onnxruntime, preprocessed by the spec stored in the file), so the figure in a model card is the
figure of the file that is served. :func:`score_classifier` (:func:`eval_split` then :func:`score_faces`)
is the one way a model is scored on a split: the cards of ``mien export`` and ``mien ensemble``,
``mien results``, ``mien eval`` and the ensemble search all go through it.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import NamedTuple, Protocol

import numpy as np

from mien.ensemble import select_columns
from mien.export.calibration import calibration_report, plot_coverage, plot_reliability
from mien.spec import PreprocessSpec
from mien.training.data import CARVED_SPLIT, DataError, FaceDataset, load_dataset, load_with_validation, select_labels

log = logging.getLogger("mien.eval")


class Classifier(Protocol):
    """What scoring needs of a model: its spec and class probabilities for raw uint8 face crops
    (:class:`mien.runtime.OnnxClassifier`, :class:`mien.ensemble.EnsembleClassifier`, a checkpoint)."""

    spec: PreprocessSpec

    def predict_crops(self, crops: list[np.ndarray], batch_size: int = 256) -> np.ndarray: ...


class SplitFaces(NamedTuple):
    """The faces of a split a model is scored on, with their truth in the model's terms."""

    images: np.ndarray
    truth: np.ndarray
    names: tuple[str, ...]  # the classes scored: the model's classes that the label set has
    columns: list[int]  # the model outputs that are those classes, in that order


def classification_report(labels: np.ndarray, predictions: np.ndarray, names: tuple[str, ...]) -> dict:
    """Accuracy, macro-F1, per-class precision/recall/F1/support and the confusion matrix (rows = truth)."""
    k = len(names)
    confusion = np.bincount(labels * k + predictions, minlength=k * k).reshape(k, k)
    true_pos = np.diag(confusion).astype(float)
    predicted, actual = confusion.sum(0), confusion.sum(1)
    precision = np.divide(true_pos, predicted, out=np.zeros(k), where=predicted > 0)
    recall = np.divide(true_pos, actual, out=np.zeros(k), where=actual > 0)
    denom = precision + recall
    f1 = np.divide(2 * precision * recall, denom, out=np.zeros(k), where=denom > 0)
    per_class = {
        name: {
            "precision": float(precision[i]),
            "recall": float(recall[i]),
            "f1": float(f1[i]),
            "support": int(actual[i]),
        }
        for i, name in enumerate(names)
    }
    return {
        "accuracy": float(true_pos.sum() / max(1, len(labels))),
        "macro_f1": float(f1[actual > 0].mean()) if (actual > 0).any() else 0.0,
        "num_images": int(len(labels)),
        "per_class": per_class,
        "confusion_matrix": confusion.tolist(),
        "labels": list(names),
    }


def plot_confusion(report: dict, path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    matrix = np.asarray(report["confusion_matrix"], dtype=float)
    rates = matrix / np.maximum(1, matrix.sum(1, keepdims=True))
    names = report["labels"]
    fig, ax = plt.subplots(figsize=(6.5, 5.5))
    im = ax.imshow(rates, cmap="Blues", vmin=0, vmax=1)
    ax.set(xticks=range(len(names)), yticks=range(len(names)), xticklabels=names, yticklabels=names,
           xlabel="predicted", ylabel="true", title=title)  # fmt: skip
    plt.setp(ax.get_xticklabels(), rotation=45, ha="right")
    for i in range(len(names)):
        for j in range(len(names)):
            ax.text(j, i, f"{rates[i, j]:.2f}\n{int(matrix[i, j])}", ha="center", va="center", fontsize=7,
                    color="white" if rates[i, j] > 0.5 else "black")  # fmt: skip
    fig.colorbar(im, ax=ax, fraction=0.046, label="share of the true class")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def labelled_dataset(
    data: str | Path, label_source: str = "fer2013", votes: str | Path = "", split: str = ""
) -> FaceDataset:
    """The data set with FER2013's own labels or the FER+ majority labels (see training/ferplus.py); for
    ``split="val"``, with the validation split carved from Training as training carves it (training/data.py)."""
    dataset = load_with_validation(data) if split == CARVED_SPLIT else load_dataset(data)
    if label_source == "fer2013":
        return dataset
    from mien.training.ferplus import default_votes_path, ferplus_dataset

    return ferplus_dataset(dataset, votes or default_votes_path(data), label_source)[0]


def eval_split(
    data: str | Path, split: str, model_labels: tuple[str, ...], label_source: str = "fer2013", votes: str | Path = ""
) -> SplitFaces:
    """The faces of ``split`` and their truth for scoring a model with ``model_labels`` on a label set.

    A model is scored on the classes it shares with the label set: faces of classes the model lacks are
    left out, and outputs the label set lacks are ignored (an 8-class FER+ model on FER2013's labels
    predicts the most likely of the seven FER2013 classes; its contempt output is not a possible answer).
    """
    dataset = labelled_dataset(data, label_source, votes, split)
    shared = tuple(name for name in model_labels if name in dataset.label_names)
    if len(shared) < 2:
        raise DataError(
            f"the model's labels {list(model_labels)} share fewer than two classes with the {label_source} labels "
            f"{list(dataset.label_names)}"
        )
    if tuple(dataset.label_names) != shared:
        dataset = select_labels(dataset, shared)
    images, truth = dataset.subset(split)
    return SplitFaces(images, truth, shared, [model_labels.index(name) for name in shared])


def score_faces(classifier: Classifier, faces: SplitFaces, batch_size: int = 256) -> dict:
    """The classification report of ``classifier`` on ``faces``: its most likely scored class against the truth."""
    probs = select_columns(classifier.predict_crops(list(faces.images), batch_size), faces.columns)
    report = classification_report(faces.truth, probs.argmax(1), faces.names)
    # Calibration of the scored classes (renormalised when the model has classes the label set lacks).
    report["calibration"] = calibration_report(probs, faces.truth)
    return report


def score_classifier(
    classifier: Classifier,
    data: str | Path,
    split: str,
    label_source: str = "fer2013",
    votes: str | Path = "",
    batch_size: int = 256,
) -> tuple[dict, SplitFaces]:
    """``classifier`` scored on ``split`` of ``data`` against ``label_source``'s truth (see :func:`eval_split`):
    the report, and the faces it was scored on."""
    faces = eval_split(data, split, tuple(classifier.spec.labels), label_source, votes)
    return score_faces(classifier, faces, batch_size), faces


class CheckpointClassifier:
    """A training checkpoint behind the classifier interface, run with torch (for ``mien eval`` on a .pt)."""

    def __init__(self, path: str | Path) -> None:
        from mien.training.checkpoint import load_model
        from mien.training.transforms import build_transforms

        self.model, self.spec, _ = load_model(path)
        self._transform = build_transforms(self.spec, train=False)

    def predict_crops(self, crops: list[np.ndarray], batch_size: int = 256) -> np.ndarray:
        import torch

        from mien.training.objectives import predict_logits

        logits = predict_logits(self.model, torch.from_numpy(np.stack(crops)), self._transform, batch_size)
        return torch.softmax(logits, 1).numpy()


def load_any(path: str | Path) -> Classifier:
    """A .pt checkpoint, an exported .onnx file or an .ensemble.json file, on the CPU."""
    if Path(path).suffix in (".onnx", ".json"):
        from mien.ensemble import load_classifier

        return load_classifier(path, providers=("CPUExecutionProvider",))
    return CheckpointClassifier(path)


def evaluate_path(
    model_path: str,
    data: str,
    split: str,
    out: str | None = None,
    batch_size: int = 256,
    label_source: str = "fer2013",
    votes: str = "",
) -> dict:
    """Evaluate a .pt or .onnx on ``split`` of ``data``; write report.json and confusion.png to ``out``.

    ``label_source``: score against FER2013's labels or the FER+ majority votes (``ferplus``: 8 classes,
    ``ferplus7``: FER2013's 7); see :func:`eval_split` for models whose classes differ from the set's."""
    model_path = Path(model_path)
    if not model_path.is_file():
        raise FileNotFoundError(
            f"{model_path}: no such model file (expected a .pt checkpoint, an .onnx file or an .ensemble.json file)"
        )
    report, _ = score_classifier(load_any(model_path), data, split, label_source, votes, batch_size)
    report.update({"model": str(model_path), "data": str(data), "split": split, "label_source": label_source})
    out_dir = Path(out) if out else Path("reports") / f"{model_path.stem}-{split}"
    out_dir.mkdir(parents=True, exist_ok=True)
    report["report_path"] = str(out_dir / "report.json")
    plot_confusion(
        report,
        out_dir / "confusion.png",
        f"{model_path.name} on {split} ({label_source}): accuracy {report['accuracy']:.3f}",
    )
    calibration = report["calibration"]
    plot_reliability(calibration, out_dir / "reliability.png", f"{model_path.name} on {split} ({label_source})")
    plot_coverage(calibration, out_dir / "coverage.png", f"{model_path.name} on {split}: accuracy vs coverage")
    (out_dir / "report.json").write_text(json.dumps(report, indent=2))
    log.info("%s on %s: accuracy %.4f, macro-F1 %.4f; ECE %.4f, NLL %.4f, Brier %.4f", model_path, split,
             report["accuracy"], report["macro_f1"], *(calibration[k] for k in ("ece", "nll", "brier")))  # fmt: skip
    c = calibration
    log.info("a calibrated model would score ECE %.4f on these faces (95%%: %.4f); p(calibrated) %.3f; mean top "
             "probability %.4f, %+.4f against the accuracy", c["ece_floor"], c["ece_floor_95"],
             c["ece_p_calibrated"], c["mean_confidence"], c["overconfidence"])  # fmt: skip
    return report
