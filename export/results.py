"""`mien results`: every bundled model measured on one split, written to ``docs/results.md`` with figures.

For each ``models/*.onnx`` and ``models/*.ensemble.json`` (through the same classes the service
serves them with): accuracy and macro-F1 on the split, accuracy with a grey patch over 25% of each
face at a random place (the same patches for every model), parameters and MACs (from the card),
milliseconds per face on the onnxruntime CPU provider at batch 1 and 32 (preprocessing included),
epochs and seconds per epoch (from the card), and calibration: ECE (15 bins, top label), NLL and Brier
score with a reliability diagram per model, and the temperature each was calibrated with. Figures: a
confusion matrix and training curves per model, what each spatial transformer does to faces (its warp,
read from the ONNX graph, with the mean scale and rotation it learnt), and a t-SNE map of the triplet model's
embeddings. Also the STN/SR ablation in the form of the paper's Table 2, with a bootstrap interval of each
arm's accuracy and McNemar's test of each arm against Base on the same faces, each arm again for every further
seed of it in ``models/seeds/`` (files measured, never served), and the SR front end against bicubic upsampling
(compared and rendered by :mod:`mien.export.ablation`), the variants in ``models/variants/`` trained on a subset of
the classes (dcnn's 5-class setup; measured on the faces of their classes, never served), and the targets of the
issue next to the measured figures. This module measures; :mod:`mien.export.results_page` writes the page.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from mien.card import Card, CardError, card_for, history_totals
from mien.ensemble import ENSEMBLE_SUFFIX, load_classifier
from mien.export.ablation import (
    ABLATION_ROWS,
    ALPHA,
    ablation_cells,
    over_seeds,
)
from mien.export.calibration import plot_coverage, plot_reliability
from mien.export.evaluate import plot_confusion, score_classifier
from mien.export.figures import has_op, plot_card_curves, plot_speed_accuracy, plot_stn, plot_tsne, stn_stats
from mien.export.prob_cache import cached
from mien.export.readme import blocks as readme_blocks
from mien.export.readme import headline_reference, replace_blocks, update_readme
from mien.export.results_page import SPEED_FIGURE, render
from mien.export.stats import bootstrap_ci
from mien.machine import median_ms
from mien.paths import DEFAULT_DATA

log = logging.getLogger("mien.results")

#: The ablation table's cells and the verdict over seeds, saved beside results.json (README's ablation table).
ABLATION_JSON = "ablation.json"
#: Row fields kept in memory only (not written to results.json): each face's correctness, for the paired tests.
IN_MEMORY = ("correct", "train_config")


@dataclass
class ResultsConfig:
    model_dir: str = "models"
    data: str = DEFAULT_DATA
    split: str = "public_test"
    out: str = "docs/results.md"
    figures: str = "docs/figures/results"
    occlusion_area: float = 0.25
    seed: int = 0
    threads: int = 1  # onnxruntime intra-op threads for the timing (1 = one core, comparable across machines)
    score_threads: int = 0  # onnxruntime intra-op threads for scoring the faces (0 = onnxruntime's default: every core)
    repeats: int = 30  # timed calls per batch size; the median is reported
    tsne_faces: int = 1500
    default_model: str = "mini_xception"  # the model served by default: its reliability diagram is shown first
    # another package's figures on the same faces, drawn beside ours (benchmarks/fer_package_accuracy.py)
    reference: str = "docs/figures/fer_package.json"
    # further seeds of the ablation's arms (`<arm>_seed<N>.onnx` with cards): in the ablation's table, not served;
    # None: the folder `seeds` in model_dir
    seed_dir: str | None = None
    # models trained on a subset of the classes (``models/variants/*.onnx`` with cards): measured on the faces of their
    # classes, in a table of their own, never served; None: the folder `variants` in model_dir
    variant_dir: str | None = None
    # the README whose generated tables (between `<!-- mien results: NAME -->` markers) are rewritten; None: none
    readme: str | None = None
    # a folder keeping each model's probabilities on the faces it scored (mien.export.prob_cache): an unchanged file
    # is not scored again on the same faces; timings are always measured. None: every model is scored
    cache: str | None = None


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
    return median_ms(lambda: classifier.predict_crops(crops), repeats, warmup=2) / batch


def _card(path: Path) -> Card | None:
    """The model's card; a broken one is logged and treated as absent (its figures are then blank)."""
    try:
        return card_for(path)
    except CardError as exc:
        log.warning("ignoring %s", exc)
        return None


def measure(cfg: ResultsConfig) -> list[dict]:
    """One row per servable model in ``cfg.model_dir``, with figures written to ``cfg.figures``."""
    figures = Path(cfg.figures)
    figures.mkdir(parents=True, exist_ok=True)
    return [measure_model(path, cfg, figures) for path in model_files(Path(cfg.model_dir))]


def measure_model(path: Path, cfg: ResultsConfig, figures: Path) -> dict:
    """The row of one servable file: measured figures, the card's figures, and the figures drawn."""
    classifier = _scoring_classifier(path, cfg)
    card = _card(path)
    model_id = classifier.model_id
    report, faces, correct = _scored(classifier, cfg)
    images, truth = faces.images, faces.truth
    occluded = classifier.predict_crops(list(occlude(images, cfg.occlusion_area, cfg.seed)))
    occluded_acc = float((occluded[:, faces.columns].argmax(1) == truth).mean())
    plot_confusion(report, figures / f"{model_id}_confusion.png",
                   f"{model_id} on {cfg.split}: accuracy {report['accuracy']:.3f}")  # fmt: skip
    calibration = report["calibration"]
    own, own_calibration = _own_labels(classifier, card, cfg)  # a FER+ model: also scored, and judged, on FER+ labels
    plot_reliability(own_calibration or calibration, figures / f"{model_id}_reliability.png",
                     f"{model_id} on {cfg.split}" + (f" ({own['label_source']} labels)" if own else ""))  # fmt: skip
    if model_id == cfg.default_model:
        plot_coverage(calibration, figures / f"{model_id}_coverage.png",
                      f"{model_id} on {cfg.split}: accuracy against coverage")  # fmt: skip
    from_card = card_figures(card)
    # timed on cfg.threads (one core: comparable across machines); the scoring above used every core
    timed = load_classifier(path, providers=("CPUExecutionProvider",), threads=cfg.threads)
    row = {  # in the key order results.json has always had
        "model_id": model_id,
        "file": path.name,
        "accuracy": report["accuracy"],
        "macro_f1": report["macro_f1"],
        "occluded_accuracy": occluded_acc,
        "num_images": report["num_images"],
        "parameters": from_card.pop("parameters"),
        "macs": from_card.pop("macs"),
        "ms_per_face_b1": ms_per_face(timed, images, 1, cfg.repeats),
        "ms_per_face_b32": ms_per_face(timed, images, 32, max(5, cfg.repeats // 3)),
        "per_class_f1": {name: scores["f1"] for name, scores in report["per_class"].items()},
        "ece": calibration["ece"],
        "nll": calibration["nll"],
        "brier": calibration["brier"],
        "ece_floor": calibration["ece_floor"],
        "ece_floor_95": calibration["ece_floor_95"],
        "ece_p_calibrated": calibration["ece_p_calibrated"],
        "ece_within_target": calibration["ece_within_target"],
        "coverage": calibration["coverage"],
        **from_card,
        "figures": {"confusion": f"{model_id}_confusion.png", "reliability": f"{model_id}_reliability.png"},
        **_paired_fields(path, classifier, images, correct, cfg),
        "own_labels": own,
    }
    if plot_card_curves(card, figures / f"{model_id}_curves.png"):
        row["figures"]["curves"] = f"{model_id}_curves.png"
    if model_id == cfg.default_model:
        row["figures"]["coverage"] = f"{model_id}_coverage.png"
    if has_op(path, "GridSample"):
        pick = np.random.default_rng(cfg.seed).permutation(len(images))[:10]
        plot_stn(path, classifier, images[pick], figures / f"{model_id}_stn.png")
        row["figures"]["stn"] = f"{model_id}_stn.png"
    trained_as = card.training.config.get("model") if card and card.training else None
    if trained_as == "stn_resnet10_triplet" or "triplet" in model_id:
        pick = np.random.default_rng(cfg.seed).permutation(len(images))[: cfg.tsne_faces]
        plot_tsne(path, classifier, images[pick], truth[pick], figures / f"{model_id}_tsne.png", cfg.seed)
        row["figures"]["tsne"] = f"{model_id}_tsne.png"
    log.info("%s: accuracy %.4f, occluded %.4f, %.2f ms/face%s", model_id, row["accuracy"], occluded_acc,
             row["ms_per_face_b1"], _from_cache(classifier))  # fmt: skip
    return row


def _scoring_classifier(path: Path, cfg: ResultsConfig):
    """The classifier that scores the faces: on every core, its answers kept in ``cfg.cache`` when there is one."""
    classifier = load_classifier(path, providers=("CPUExecutionProvider",), threads=cfg.score_threads)
    return cached(classifier, path, cfg.cache)


def _from_cache(classifier) -> str:
    hits, misses = getattr(classifier, "hits", 0), getattr(classifier, "misses", 0)
    return f" ({hits} of {hits + misses} scorings from the cache)" if hits else ""


def _score_folder(cfg: ResultsConfig, folder: str | Path | None, default: str):
    """(path, classifier, card figures, report, faces, which faces it got right) for each ONNX file in ``folder``
    (``cfg.model_dir``/``default`` when not given; nothing when it is absent), scored on ``cfg.split``."""
    for path in sorted(Path(folder or Path(cfg.model_dir) / default).glob("*.onnx")):
        classifier = _scoring_classifier(path, cfg)
        yield path, classifier, card_figures(_card(path)), *_scored(classifier, cfg)


def measure_seeds(cfg: ResultsConfig) -> list[dict]:
    """One row per ONNX file in ``cfg.seed_dir`` (none when it is absent): the arm it is a seed of (its card's
    training model), its seed, accuracy with interval, per-face correctness for the paired tests, the STN's warp."""
    rows = []
    for path, classifier, config, report, faces, correct in _score_folder(cfg, cfg.seed_dir, "seeds"):
        train_config = config["train_config"] or {}
        rows.append({"model_id": classifier.model_id, "file": path.name, "arm": train_config.get("model"),
                     "seed": train_config.get("seed"), "accuracy": report["accuracy"], "epochs": config["epochs"],
                     "train_config": train_config, "precision": config["precision"],
                     **_paired_fields(path, classifier, faces.images, correct, cfg)})  # fmt: skip
        log.info("%s (seed %s of %s): accuracy %.4f", rows[-1]["model_id"], rows[-1]["seed"], rows[-1]["arm"],
                 report["accuracy"])  # fmt: skip
    return rows


def measure_variants(cfg: ResultsConfig) -> list[dict]:
    """One row per ONNX file in ``cfg.variant_dir`` (none when it is absent): a model trained on a subset of the
    classes, scored on the split's faces of those classes (:func:`score_classifier` leaves the others out), with
    its accuracy interval and the card's training figures."""
    rows = []
    for path, classifier, card, report, _, correct in _score_folder(cfg, cfg.variant_dir, "variants"):
        rows.append({"model_id": classifier.model_id, "file": path.name, "labels": list(report["labels"]),
                     "num_images": report["num_images"], "accuracy": report["accuracy"],
                     "macro_f1": report["macro_f1"], "ece": report["calibration"]["ece"],
                     "accuracy_ci95": list(bootstrap_ci(correct, confidence=1 - ALPHA, seed=cfg.seed)),
                     "epochs": card["epochs"], "train_command": card["train_command"]})  # fmt: skip
        log.info("%s (variant on %s): accuracy %.4f", rows[-1]["model_id"], ", ".join(rows[-1]["labels"]),
                 report["accuracy"])  # fmt: skip
    return rows


def _scored(classifier, cfg: ResultsConfig):
    """``score_classifier``'s report and faces on ``cfg.split``, and which faces it got right (what the report's
    accuracy counts), from one pass of the model."""
    recording = _Recording(classifier)
    report, faces = score_classifier(recording, cfg.data, cfg.split)
    return report, faces, recording.probs[:, faces.columns].argmax(1) == faces.truth


def _paired_fields(path: Path, classifier, images: np.ndarray, correct: np.ndarray, cfg: ResultsConfig) -> dict:
    """What the ablation's tables need of a model: its accuracy interval, the STN's warp (None without one) and its
    per-face correctness for the paired tests (kept in memory only)."""
    return {"accuracy_ci95": list(bootstrap_ci(correct, confidence=1 - ALPHA, seed=cfg.seed)),
            "stn_affine": stn_stats(path, classifier, images) if has_op(path, "GridSample") else None,
            "correct": correct}  # fmt: skip


def _own_labels(classifier, card: Card | None, cfg: ResultsConfig) -> tuple[dict | None, dict | None]:
    """For a model whose card says it learnt other labels than FER2013's (FER+): its figures on ``cfg.split`` against
    those labels (accuracy, macro-F1, ECE...) and the calibration report they come from; else (None, None). The
    main table scores every model on FER2013's."""
    label_source = card.label_source if card else "fer2013"
    if label_source == "fer2013":
        return None, None
    report, _ = score_classifier(classifier, cfg.data, cfg.split, label_source)
    keys = ("ece", "nll", "brier", "ece_floor", "ece_floor_95", "ece_p_calibrated", "ece_within_target")
    return {"label_source": label_source, "accuracy": report["accuracy"], "macro_f1": report["macro_f1"],
            "num_images": report["num_images"],
            **{key: report["calibration"][key] for key in keys}}, report["calibration"]  # fmt: skip


class _Recording:
    """A classifier that keeps the probabilities of its last call, so the faces a report scored can be
    told right from wrong one by one without running the model twice."""

    def __init__(self, classifier) -> None:
        self.classifier, self.spec, self.probs = classifier, classifier.spec, None

    def predict_crops(self, crops: list[np.ndarray], batch_size: int = 256) -> np.ndarray:
        self.probs = self.classifier.predict_crops(crops, batch_size)
        return self.probs


def card_figures(card: Card | None) -> dict:
    """What a row takes from the card rather than measuring it: size, training cost, how it was made."""
    training = card.training if card else None
    export = card.export if card else None
    return {
        "parameters": card.parameters if card else None,
        "macs": card.macs if card else None,
        "epochs": training.epochs_run if training else None,
        "seconds_per_epoch": training.seconds_per_epoch_median if training else None,
        "train_command": training.command if training else None,
        "train_config": training.config if training else None,
        "notes": training.notes if training else None,
        # an ONNX model's flip TTA is an export option; an ensemble's, its own "flip"
        "flip_tta": export.flip_tta if export and export.flip_tta is not None else (card.flip if card else None),
        "members": [m.model_id for m in card.members or []] or None if card else None,
        "selected_on": card.selected_on if card else None,
        "temperature": card.calibration.temperature if card and card.calibration else None,
        "temperature_fitted_on": card.calibration.fitted_on if card and card.calibration else None,
        "entropy_slope": card.calibration.entropy_slope if card and card.calibration else None,
        "entropy_curve": card.calibration.entropy_curve if card and card.calibration else None,
        "weights": card.weights if card else None,  # an ensemble's members' weights (None: equal, or not one)
        "weights_fitted_on": card.weights_fitted_on if card else None,
        **dict(zip(("cpu_hours", "cpu_hours_whole_run"), trained_cpu_hours(training), strict=True)),
        "precision": trained_precision(training),
    }


def trained_cpu_hours(training) -> tuple[float | None, bool]:
    """The CPU-hours of the run a card's model came from, and whether they are the whole run's: its ``run`` totals
    when the card has them (exported from its run folder); else what the epochs of the card's own history cost, up
    to the one it kept (the run's later epochs were in a folder lost since), a lower bound; None when the card has
    no epochs to count, or counts only wall-clock seconds and does not say with how many threads."""
    if training is None:
        return None, False
    if training.run and training.run.get("cpu_hours") is not None:
        return training.run["cpu_hours"], True
    history = [e for e in training.history or [] if "epoch" in e and ("seconds" in e or "cpu_seconds" in e)]
    threads = int((training.config or {}).get("threads") or 0)
    if not history or (not threads and not all("cpu_seconds" in e for e in history)):
        return None, False
    return history_totals(history, threads)["cpu_hours"], False


def trained_precision(training) -> str | None:
    """What a run trained in: the ``precision`` its epochs recorded (in order, "bf16/fp32" for a run resumed on
    another machine), else what its ``amp`` asked for (fp32 for none; None for ``auto`` without a history)."""
    if training is None:
        return None
    seen = dict.fromkeys(e["precision"] for e in training.history or [] if e.get("precision"))
    if seen:
        return "/".join(seen)
    amp = (training.config or {}).get("amp", "none")  # training.hardware.precision_name's naming, without its torch
    return None if amp == "auto" else "fp32" if amp == "none" else amp


def write_results(cfg: ResultsConfig, command: str = "mien results") -> list[dict]:
    """Measure every model, write the markdown and ``results.json`` (the rows) beside the figures, the ablation's
    cells in ``ablation.json`` when its four arms are there, and README's generated tables with ``cfg.readme``."""
    if cfg.readme:  # its markers are checked before the models are measured, not after
        replace_blocks(Path(cfg.readme).read_text(), {"headline": []})
    rows = measure(cfg)
    if not rows:
        raise FileNotFoundError(f"no .onnx or {ENSEMBLE_SUFFIX} file in {cfg.model_dir}")
    seeds, variants = measure_seeds(cfg), measure_variants(cfg)
    out = Path(cfg.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    reference = Path(cfg.reference) if cfg.reference else None
    reference_figures = json.loads(reference.read_text()) if reference and reference.is_file() else None
    plotted = headline_reference(reference_figures, rows[0]["num_images"]) if reference_figures else None
    plot_speed_accuracy(rows, Path(cfg.figures) / SPEED_FIGURE, cfg.split, plotted)
    out.write_text(render(rows, cfg, command, seeds, variants))
    for name, measured in (("results.json", rows), ("seeds.json", seeds), ("variants.json", variants)):
        if measured:
            saved = [{k: v for k, v in r.items() if k not in IN_MEMORY} for r in measured]
            (Path(cfg.figures) / name).write_text(json.dumps(saved, indent=1) + "\n")
    by_id = {r["model_id"]: r for r in rows}
    table = None
    if all(m in by_id for m in ABLATION_ROWS):
        table = {"split": cfg.split, "arms": ablation_cells(by_id), "over_seeds": over_seeds(by_id, seeds)}
        (Path(cfg.figures) / ABLATION_JSON).write_text(json.dumps(table, indent=1, ensure_ascii=False) + "\n")
    if cfg.readme:
        update_readme(Path(cfg.readme), readme_blocks(rows, cfg.split, cfg.default_model, reference_figures, table))
    log.info("wrote %s and %d figures in %s", out, sum(len(r["figures"]) for r in rows), cfg.figures)
    return rows
