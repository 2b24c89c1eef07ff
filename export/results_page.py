"""The page `mien results` writes, ``docs/results.md``: its tables and text from the measured rows (measured by
:mod:`mien.export.results`; the ablation's tables are rendered by :mod:`mien.export.ablation`), and the issues'
targets they are judged by."""

from __future__ import annotations

import math
import os
import platform
import time
from pathlib import Path
from typing import TYPE_CHECKING

from mien.export.ablation import (
    ABLATION_ROWS,
    ALPHA,
    ablation_seeds_table,
    ablation_table,
    pct,
    sr_front_end_cards,
    sr_front_end_table,
)
from mien.export.calibration import DRAWS
from mien.export.calibration import ECE_TARGET as ECE_TARGET_FRACTION
from mien.export.stats import holm
from mien.machine import describe_cpu

if TYPE_CHECKING:
    from mien.export.results import ResultsConfig

#: Accuracy targets on the test split, in %, by the issue that set them: (issue, model id, target). Issue 4 set
#: the first bundled models' (selected on the test split), issue 14 the distilled default's and the ensemble's.
TARGETS = [(4, "mini_xception", 66.0), (4, "se_sepconv", 65.2), (4, "dcnn", 66.0), (4, "stn_sr_cnn", 70.0),
           (4, "ensemble", 74.0), (14, "mini_xception_kd", 68.0), (14, "ensemble", 72.5)]  # fmt: skip
#: The best served single model's target, by issue.
BEST_SINGLE_TARGETS = {4: 72.0, 14: 71.0}
#: Issue 14's target for a model trained on the FER+ labels, scored on their majority vote, in %.
FERPLUS_TARGET = 85.0
#: The most expected calibration error (top label, 15 bins) any served model may have on the test split, in %.
ECE_TARGET = 100 * ECE_TARGET_FRACTION
SPEED_FIGURE = "accuracy_vs_speed.png"


def _count(value: int | None, unit: float, suffix: str) -> str:
    return "" if not value else f"{value / unit:.2f} {suffix}"


def machine() -> str:
    import onnxruntime as ort

    python = platform.python_version()
    return f"{describe_cpu()}, onnxruntime {ort.__version__} CPU provider, Python {python}"


def render(
    rows: list[dict], cfg: ResultsConfig, command: str, seeds: list[dict] = (), variants: list[dict] = ()
) -> str:
    """docs/results.md from the measured rows (and the rows of the ablation arms' further seeds and of the variants
    on a subset of the classes)."""
    figures_rel = Path(os.path.relpath(cfg.figures, Path(cfg.out).parent)).as_posix()
    by_id = {r["model_id"]: r for r in rows}
    lines = _summary(rows, cfg, command)
    lines += ["", f"![accuracy against speed]({figures_rel}/{SPEED_FIGURE})"]
    lines += _per_class(rows, cfg.split)
    lines += _other_labels(rows, cfg.split)
    lines += _variants(list(variants), cfg.split)
    lines += _calibration(rows, cfg, figures_rel)
    if all(m in by_id for m in ABLATION_ROWS):
        lines += ablation_table(by_id, cfg.split)
        lines += ablation_seeds_table(by_id, list(seeds), cfg.split)
    lines += sr_front_end_table(sr_front_end_cards(Path(cfg.model_dir)))
    lines += _targets(rows)
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


def _summary(rows: list[dict], cfg: ResultsConfig, command: str) -> list[str]:
    """The title, how the figures were measured, and one table row per model, most accurate first."""
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
        "checkpoint selected on the split; s/epoch: median training seconds per epoch; CPU-hours: what the whole "
        "run took, its process's CPU time (older runs: wall-clock seconds × torch threads), on the card of a model "
        "exported from its run folder; ≥: a card that holds only the epochs up to the kept one (its run's folder, "
        "with the later epochs, was lost before the card recorded the whole run), so the figure counts those.",
        "",
        f"Occluded: accuracy when a mid-grey square covering {cfg.occlusion_area:.0%} of each face is pasted at a "
        f"random place (seed {cfg.seed}; the same patches for every model).",
        "",
        "Selected on: the split that chose the checkpoint (and stopped training); `val` is the validation split "
        f"carved from Training, so {cfg.split} is a clean test for those models. The older models were selected "
        f"on {cfg.split} itself, so their figures on it are optimistic.",
        "",
        "| model | accuracy % | macro-F1 % | occluded % | parameters | MACs / face | ms/face b1 | ms/face b32 "
        "| epoch kept | s/epoch | CPU-hours | selected on |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in sorted(rows, key=lambda r: -r["accuracy"]):
        bound = "" if r.get("cpu_hours_whole_run") else "≥ "  # the card counts only the epochs up to the kept one
        hours = "" if r.get("cpu_hours") is None else f"{bound}{r['cpu_hours']:.1f}"
        lines.append(
            f"| `{r['model_id']}` | {pct(r['accuracy'])} | {pct(r['macro_f1'])} | {pct(r['occluded_accuracy'])} "
            f"| {_count(r['parameters'], 1e6, 'M')} | {_count(r['macs'], 1e6, 'M')} | {r['ms_per_face_b1']:.2f} "
            f"| {r['ms_per_face_b32']:.3f} | {r['epochs'] or ''} | {r['seconds_per_epoch'] or ''} "
            f"| {hours} | {r.get('selected_on') or ''} |"
        )
    return lines


def _per_class(rows: list[dict], split: str) -> list[str]:
    """F1 per class and model (the classes of the first model; a model lacking one shows a dash)."""
    names = list(rows[0]["per_class_f1"]) if rows else []
    lines = ["", f"## F1 per class on {split} (%)", "", "| model | " + " | ".join(names) + " |",
             "|---|" + "---|" * len(names)]  # fmt: skip
    for r in sorted(rows, key=lambda r: -r["accuracy"]):
        cells = [pct(r["per_class_f1"].get(n)) if n in r["per_class_f1"] else "—" for n in names]
        lines.append(f"| `{r['model_id']}` | " + " | ".join(cells) + " |")
    return lines


def _sign(x: float) -> str:
    """A typeset minus for a negative coefficient, nothing otherwise."""
    return "−" if x < 0 else ""


def _calibration(rows: list[dict], cfg: ResultsConfig, figures_rel: str) -> list[str]:
    """ECE, NLL and Brier per model, the temperature it was calibrated with, and two reliability diagrams."""
    lines = [
        "",
        f"## Calibration on {cfg.split}",
        "",
        "Do the probabilities mean what they say? ECE: the gap between the top label's confidence and its accuracy "
        "in 15 equal-width confidence bins, weighted by the faces in each (0 is perfect); NLL: mean −log p(true "
        "label); Brier: mean squared distance to the one-hot truth. Temperature: the one `mien calibrate` fitted "
        "on the split named (blank: never calibrated, its probabilities are the network's own); `T · e^(b h + c h²)`: "
        "a temperature per face that follows the face's normalised entropy h (0 certain, 1 uniform), T, b and c "
        "fitted together by the top label's log loss (`--method top-label`; `--method entropy` fits T and b by NLL; "
        "docs/calibration.md). Models selected "
        f"on {cfg.split} cannot be calibrated honestly (no held-out faces of theirs are left), so they stay blank "
        f"until retrained with the validation split. Target: ECE ≤ {ECE_TARGET}% for every served model.",
        "",
        f'ECE is never 0 on a finite set of faces, even for perfect probabilities. "Calibrated model\'s ECE": the '
        f"mean (and 95th percentile) ECE of {DRAWS:,} draws in which each face's top label is right with probability "
        "equal to the model's confidence, on the same faces (consistency resampling); p: the share of those draws "
        "with an ECE at least the measured one, so p < 0.05 says the probabilities are measurably miscalibrated and "
        "a larger p that the measured ECE is within what chance alone gives. The reliability diagrams draw the same "
        f"range per bin. Calibrated model ≤ {ECE_TARGET}%: the share of those draws that meet the target, how often a "
        "perfectly calibrated model with these confidences would meet it on these faces.",
        "",
        f"| model | ECE % | calibrated model's ECE % (95%) | p | calibrated model ≤ {ECE_TARGET}% | NLL | Brier "
        "| temperature | fitted on | ECE ≤ target |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in sorted(rows, key=lambda r: _calibrated(r)["ece"]):
        m = _calibrated(r)
        temperature = "" if r["temperature"] is None else f"{r['temperature']:.3f}"
        if r.get("entropy_slope") or r.get("entropy_curve"):
            slope, c = r["entropy_slope"], r.get("entropy_curve") or 0.0
            curve = f" {_sign(c) or '+'} {abs(c):.3f} h²" if c else ""
            temperature += f" · e^({_sign(slope)}{abs(slope):.3f} h{curve})"
        met = "yes" if _meets_ece_target(m) else "no"
        floor = f"{pct(m['ece_floor'])} ({pct(m['ece_floor_95'])})"
        name = f"`{r['model_id']}`" + (f" ({r['own_labels']['label_source']} labels)" if r.get("own_labels") else "")
        lines.append(f"| {name} | {pct(m['ece'])} | {floor} | {m['ece_p_calibrated']:.3f} "
                     f"| {100 * m['ece_within_target']:.0f}% | {m['nll']:.3f} "
                     f"| {m['brier']:.3f} | {temperature} | {r['temperature_fitted_on'] or ''} | {met} |")  # fmt: skip
    lines += _target_odds(rows)
    shown = [r for r in rows if r["model_id"] == cfg.default_model] + [r for r in rows if r["members"]]
    if shown:
        lines += [""] + [f"![{r['model_id']} reliability]({figures_rel}/{r['figures']['reliability']})" for r in shown]
    default = next((r for r in rows if r["model_id"] == cfg.default_model), None)
    if default is not None:
        lines += _coverage(default, cfg.split, figures_rel)
    return lines


def _meets_ece_target(measured: dict) -> bool:
    """Whether a model's measured ECE (a fraction) is within the target (in %)."""
    return 100 * measured["ece"] <= ECE_TARGET


def _target_odds(rows: list[dict]) -> list[str]:
    """How many models meet the ECE target, against how likely it is that all of them would if each were perfectly
    calibrated (each model's calibrated draws independent of the others': the product of their shares); and which
    models p says are miscalibrated, one at a time and all tested together (Holm's correction)."""
    if not rows:
        return []
    measured = [_calibrated(r) for r in rows]
    met = sum(map(_meets_ece_target, measured))
    odds = math.prod(m["ece_within_target"] for m in measured)
    line = (f"{met} of {len(measured)} models meet the target. Were every one of them perfectly calibrated, all "
            f"{len(measured)} would meet it on these faces with a chance of {100 * odds:.2g}% (the product of the "
            f"column calibrated model ≤ {ECE_TARGET}%)")  # fmt: skip
    if odds < 0.5:
        line += (": on this number of faces the target is more often missed than met by perfect probabilities, so p, "
                 "not the target alone, says which models are measurably miscalibrated")  # fmt: skip
    p_values = [m["ece_p_calibrated"] for m in measured]
    alone = [r["model_id"] for r, p in zip(rows, p_values, strict=True) if p < ALPHA]
    together = [r["model_id"] for r, kept in zip(rows, holm(p_values, ALPHA), strict=True) if kept]
    models = f"{len(rows)} model" + "s" * (len(rows) != 1)
    line += (f". p < {ALPHA} for {_count_named(alone)}; tested together (Holm's correction for {models}: the "
             f"smallest p must be below {ALPHA / len(rows):.4f}), {_count_named(together)}")  # fmt: skip
    return ["", line + "."]


def _count_named(model_ids: list[str]) -> str:
    """``2 (`a`, `b`)``, or ``none``."""
    return f"{len(model_ids)} ({', '.join(f'`{m}`' for m in model_ids)})" if model_ids else "none"


def _calibrated(row: dict) -> dict:
    """The figures a model's calibration is judged by: on the labels it learnt (FER+ for a FER+ model)."""
    return row.get("own_labels") or row


def _other_labels(rows: list[dict], split: str) -> list[str]:
    """The models that learnt other labels than FER2013's (FER+), scored on those too; nothing when there are none."""
    others = [r for r in rows if r.get("own_labels")]
    if not others:
        return []
    lines = ["", f"## Models trained on other labels, scored on theirs ({split})", "",
             "The tables above score every model on FER2013's labels (an 8-class FER+ model answers the most likely "
             "of FER2013's seven; FER2013's label and the FER+ majority agree on about two thirds of the faces). "
             "Here such a model is scored on the labels it learnt, on the faces that have one (the FER+ majority "
             "vote, docs/training.md).",
             "", "| model | labels | faces | accuracy % | macro-F1 % | accuracy on FER2013 labels % |",
             "|---|---|---|---|---|---|"]  # fmt: skip
    for r in others:
        own = r["own_labels"]
        lines.append(f"| `{r['model_id']}` | {own['label_source']} | {own['num_images']:,} | {pct(own['accuracy'])} "
                     f"| {pct(own['macro_f1'])} | {pct(r['accuracy'])} |")  # fmt: skip
    return lines


def _coverage(row: dict, split: str, figures_rel: str) -> list[str]:
    """The default model's accuracy against coverage: what ``min_confidence`` trades."""
    curve = row["coverage"]
    lines = [
        "",
        f"### Choosing `min_confidence`: accuracy against coverage of `{row['model_id']}` on {split}",
        "",
        "With `min_confidence=t` (query parameter or `MIEN_MIN_CONFIDENCE`) a face whose top probability is below "
        "t comes back with all its probabilities but `label: null` and `uncertain: true`. Coverage: the share of "
        "faces still labelled; accuracy: how often those labels are right.",
        "",
        "| min_confidence | " + " | ".join(f"{c['min_confidence']:.2f}" for c in curve) + " |",
        "|---|" + "---|" * len(curve),
        "| coverage % | " + " | ".join(f"{100 * c['coverage']:.1f}" for c in curve) + " |",
        "| accuracy % | "
        + " | ".join("—" if c["accuracy"] is None else f"{100 * c['accuracy']:.1f}" for c in curve)
        + " |",
        "",
        f"![{row['model_id']} accuracy against coverage]({figures_rel}/{row['figures']['coverage']})",
    ]
    return lines


def _targets(rows: list[dict]) -> list[str]:
    """Each issue's targets beside the measured figures: per model, the best single model, a FER+ model on its own
    labels; the calibration target (ECE) is met or not per model in the calibration table."""
    by_id = {r["model_id"]: r for r in rows}
    lines = ["", "## Targets", "", "| issue | target | % | measured % | met |", "|---|---|---|---|---|"]

    def row(issue: int, what: str, target: float, measured: float) -> None:
        lines.append(f"| {issue} | {what} | {target} | {measured:.2f} | {'yes' if measured >= target else 'no'} |")

    for issue, model_id, target in TARGETS:
        if model_id in by_id:
            row(issue, f"`{model_id}`", target, 100 * by_id[model_id]["accuracy"])
    singles = [r for r in rows if not r["members"]]
    if singles:
        best = max(singles, key=lambda r: r["accuracy"])
        for issue, target in BEST_SINGLE_TARGETS.items():
            row(issue, f"best single model (`{best['model_id']}`)", target, 100 * best["accuracy"])
    for r in rows:
        own = r.get("own_labels")
        if own and own["label_source"].startswith("ferplus"):
            row(14, f"`{r['model_id']}` on the FER+ majority labels", FERPLUS_TARGET, 100 * own["accuracy"])
    return lines


def _variants(variants: list[dict], split: str) -> list[str]:
    """The table of the variants trained on a subset of the classes; nothing when there are none."""
    if not variants:
        return []
    lines = ["", f"## Variants on a subset of the classes ({split}, not served)", "",
             "Each is scored on the faces of its own classes only (a 5-class model is not comparable with the "
             "7-class figures above: fewer and easier choices), with a 95% bootstrap interval.",
             "", "| model | classes | faces | accuracy % [95% CI] | macro-F1 % | ECE % | epochs | trained by |",
             "|---|---|---|---|---|---|---|---|"]  # fmt: skip
    for v in variants:
        low, high = v["accuracy_ci95"]
        lines.append(f"| `{v['model_id']}` | {', '.join(v['labels'])} | {v['num_images']:,} | {pct(v['accuracy'])} "
                     f"[{pct(low)}, {pct(high)}] | {pct(v['macro_f1'])} | {pct(v['ece'])} | {v['epochs'] or ''} "
                     f"| `{v['train_command'] or 'see its card'}` |")  # fmt: skip
    return lines
