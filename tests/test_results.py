"""`mien results`: the measured table, the figures, and the two looks inside ONNX graphs it relies on."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from mien.card import Training
from mien.export.ensemble import write_ensemble
from mien.export.evaluate import evaluate_path
from mien.export.figures import intermediate, node_tensor
from mien.export.onnx_export import ExportConfig, export_checkpoint
from mien.export.results import ResultsConfig, occlude, trained_cpu_hours, write_results
from mien.export.results_page import _summary, _target_odds
from mien.preprocess import to_model_input
from mien.runtime import OnnxClassifier
from mien.training.models import create_model, default_spec
from tests.conftest import CPU

TRIPLET_KWARGS = {"num_classes": 7, "widths": [8, 16, 16, 32]}
FIVE = ("angry", "sad", "happy", "fear", "neutral")


@pytest.fixture(scope="module")
def results(model_dir, tiny_npz, tmp_path_factory) -> tuple[Path, list[dict], str]:
    """A model folder (trained mini_xception, a freshly initialised STN+ResNet-10, their ensemble) and
    the results written from it."""
    root = tmp_path_factory.mktemp("results")
    folder = root / "models"
    folder.mkdir()
    for name in ("mini_xception.onnx", "mini_xception.card.json"):
        shutil.copy(model_dir / name, folder / name)
    torch.manual_seed(0)
    model = create_model("stn_resnet10_triplet", **TRIPLET_KWARGS)
    spec = default_spec("stn_resnet10_triplet")
    torch.save({"model_id": "stn_resnet10_triplet", "model_kwargs": TRIPLET_KWARGS, "spec": spec.to_dict(),
                "state_dict": model.state_dict()}, root / "triplet.pt")  # fmt: skip
    export_checkpoint(ExportConfig(checkpoint=str(root / "triplet.pt"), out=str(folder / "stn_resnet10_triplet.onnx"),
                                   data=str(tiny_npz), parity_faces=256))  # fmt: skip
    write_ensemble(["mini_xception", "stn_resnet10_triplet"], folder, data=str(tiny_npz))
    # a variant on five of the classes (dcnn's 5-class setup), in models/variants/: measured, never served
    five = create_model("mini_xception", num_classes=len(FIVE))
    torch.save({"model_id": "mini_xception", "model_kwargs": {"num_classes": 5},
                "spec": default_spec("mini_xception", FIVE).to_dict(),
                "state_dict": five.state_dict()}, root / "five.pt")  # fmt: skip
    export_checkpoint(ExportConfig(checkpoint=str(root / "five.pt"), out=str(folder / "variants" / "five.onnx"),
                                   data=str(tiny_npz), split="train", parity_faces=256, model_id="five"))  # fmt: skip
    cfg = ResultsConfig(model_dir=str(folder), data=str(tiny_npz), out=str(root / "docs" / "results.md"),
                        figures=str(root / "docs" / "figures" / "results"), repeats=3, tsne_faces=120)  # fmt: skip
    rows = write_results(cfg)
    return root, rows, (root / "docs" / "results.md").read_text()


def test_a_row_per_servable_model_with_the_evaluated_accuracy(results, tiny_npz, tmp_path):
    root, rows, _ = results
    by_id = {r["model_id"]: r for r in rows}
    assert set(by_id) == {"mini_xception", "stn_resnet10_triplet", "ensemble"}
    for row in rows:
        report = evaluate_path(str(root / "models" / row["file"]), str(tiny_npz), "public_test", str(tmp_path))
        assert row["accuracy"] == pytest.approx(report["accuracy"]), row["model_id"]
        assert row["macro_f1"] == pytest.approx(report["macro_f1"]), row["model_id"]
        assert 0 <= row["occluded_accuracy"] <= 1 and row["ms_per_face_b1"] > 0 and row["ms_per_face_b32"] > 0
    assert by_id["mini_xception"]["epochs"] == 3 and by_id["mini_xception"]["parameters"] > 50_000
    card = json.loads((root / "models" / "mini_xception.card.json").read_text())
    assert by_id["mini_xception"]["cpu_hours"] == card["training"]["run"]["cpu_hours"] > 0  # the whole run's
    assert by_id["stn_resnet10_triplet"]["cpu_hours"] is None  # never trained: no run to count
    assert by_id["ensemble"]["members"] == ["mini_xception", "stn_resnet10_triplet"]
    saved = json.loads((root / "docs" / "figures" / "results" / "results.json").read_text())
    assert [r["model_id"] for r in saved] == [r["model_id"] for r in rows]


def test_cpu_hours_are_the_whole_runs_or_a_marked_lower_bound_from_the_cards_own_epochs():
    """A card exported from its run folder carries the whole run's CPU-hours; an older card, whose run folder was
    lost, holds only the epochs up to the kept one: the table counts those (CPU time where every epoch recorded it,
    else seconds x threads) and marks the figure as a lower bound; with nothing to count, nothing is claimed."""
    history = [
        {"epoch": 1, "seconds": 1800.0, "cpu_seconds": 3000.0},
        {"epoch": 2, "seconds": 1800.0, "cpu_seconds": 3600.0},
    ]
    whole = Training(config={"threads": 2}, history=history, run={"epochs": 5, "cpu_hours": 4.5})
    assert trained_cpu_hours(whole) == (4.5, True)
    assert trained_cpu_hours(Training(config={"threads": 2}, history=history)) == (
        pytest.approx(6600 / 3600, abs=1e-3),
        False,
    )
    wall = [{"epoch": 1, "seconds": 1800.0}, {"epoch": 2, "seconds": 900.0}, {"epoch": 2, "seconds": 900.0}]
    assert trained_cpu_hours(Training(config={"threads": 2}, history=wall)) == (pytest.approx(1.5), False)
    assert trained_cpu_hours(Training(config={}, history=wall)) == (None, False)  # threads unknown: no guess
    assert trained_cpu_hours(Training(config={"threads": 2})) == (None, False)
    assert trained_cpu_hours(None) == (None, False)
    row = {"model_id": "m", "accuracy": 0.5, "macro_f1": 0.4, "occluded_accuracy": 0.3, "parameters": 10, "macs": 10,
           "ms_per_face_b1": 1.0, "ms_per_face_b32": 1.0, "epochs": 2, "seconds_per_epoch": 1800.0,
           "num_images": 100}  # fmt: skip
    cells = {}
    for whole_run in (True, False):
        table = _summary([{**row, "cpu_hours": 1.83, "cpu_hours_whole_run": whole_run}], ResultsConfig(), "")
        cells[whole_run] = table[-1].split(" | ")[10]
    assert cells == {True: "1.8", False: "≥ 1.8"}


def test_a_variant_on_a_subset_of_the_classes_is_scored_on_its_faces_in_a_table_of_its_own(results, tiny_npz, tmp_path):
    root, rows, text = results
    assert "five" not in {r["model_id"] for r in rows}  # never among the served models' rows
    (variant,) = json.loads((root / "docs" / "figures" / "results" / "variants.json").read_text())
    report = evaluate_path(str(root / "models" / "variants" / "five.onnx"), str(tiny_npz), "public_test", str(tmp_path))
    assert variant["labels"] == list(FIVE) and variant["num_images"] == report["num_images"] == 5 * 40
    assert variant["accuracy"] == pytest.approx(report["accuracy"])
    low, high = variant["accuracy_ci95"]
    assert low <= variant["accuracy"] <= high
    assert "## Variants on a subset of the classes (public_test, not served)" in text
    assert f"| `five` | {', '.join(FIVE)} | 200 | {100 * variant['accuracy']:.2f} [" in text


def test_the_markdown_has_the_table_targets_and_figure_links(results):
    root, rows, text = results
    for row in rows:
        assert f"| `{row['model_id']}` | {100 * row['accuracy']:.2f} | {100 * row['macro_f1']:.2f} |" in text
        for name in row["figures"].values():
            assert (root / "docs" / "figures" / "results" / name).stat().st_size > 1000
            assert f"(figures/results/{name})" in text
    assert "| 4 | `mini_xception` | 66.0 |" in text and "| 4 | `ensemble` | 74.0 |" in text
    ensemble = 100 * next(r["accuracy"] for r in rows if r["model_id"] == "ensemble")
    assert f"| 14 | `ensemble` | 72.5 | {ensemble:.2f} | {'yes' if ensemble >= 72.5 else 'no'} |" in text
    best = max((r for r in rows if not r["members"]), key=lambda r: r["accuracy"])
    assert f"| 14 | best single model (`{best['model_id']}`) | 71.0 | {100 * best['accuracy']:.2f} |" in text
    assert "STN / SR ablation" not in text  # its four models are not all in this folder
    assert "Machine: " in text


def test_speed_plot_per_class_table_and_selection_split(results, tiny_npz, tmp_path):
    root, rows, text = results
    figure = root / "docs" / "figures" / "results" / "accuracy_vs_speed.png"
    assert figure.stat().st_size > 5000 and "(figures/results/accuracy_vs_speed.png)" in text
    by_id = {r["model_id"]: r for r in rows}
    report = evaluate_path(str(root / "models" / "mini_xception.onnx"), str(tiny_npz), "public_test", str(tmp_path))
    f1 = by_id["mini_xception"]["per_class_f1"]
    assert f1 == pytest.approx({name: c["f1"] for name, c in report["per_class"].items()})
    header = "| model | " + " | ".join(f1) + " |"
    assert header in text
    assert f"| `mini_xception` | {100 * f1['angry']:.2f} | {100 * f1['disgust']:.2f} |" in text
    # the tiny run selected its checkpoint on the carved validation split, and the card says so
    assert by_id["mini_xception"]["selected_on"] == "val" and "| val |" in text


def test_figures_per_model(results):
    _, rows, _ = results
    figures = {r["model_id"]: set(r["figures"]) for r in rows}
    assert figures["mini_xception"] == {"confusion", "reliability", "coverage", "curves"}  # the default; a history
    assert figures["stn_resnet10_triplet"] == {"confusion", "reliability", "stn", "tsne"}  # no history: never trained
    assert figures["ensemble"] == {"confusion", "reliability"}


def test_calibration_table_matches_mien_eval_and_shows_the_default_and_the_ensemble(results, tiny_npz, tmp_path):
    root, rows, text = results
    assert "## Calibration on public_test" in text
    for row in rows:
        report = evaluate_path(str(root / "models" / row["file"]), str(tiny_npz), "public_test", str(tmp_path))
        for key in ("ece", "nll", "brier", "ece_floor", "ece_floor_95", "ece_p_calibrated", "ece_within_target"):
            assert row[key] == pytest.approx(report["calibration"][key]), (row["model_id"], key)
        floor = f"{100 * row['ece_floor']:.2f} ({100 * row['ece_floor_95']:.2f})"
        within = f"{100 * row['ece_within_target']:.0f}%"
        assert (f"| `{row['model_id']}` | {100 * row['ece']:.2f} | {floor} | {row['ece_p_calibrated']:.3f} "
                f"| {within} | {row['nll']:.3f} | {row['brier']:.3f} |") in text  # fmt: skip
        assert row["temperature"] is None  # none of them was calibrated
    # how many meet the target, against the chance that as many perfectly calibrated models would all meet it
    met = sum(100 * r["ece"] <= 2.0 for r in rows)
    odds = math.prod(r["ece_within_target"] for r in rows)
    assert f"{met} of {len(rows)} models meet the target." in text
    assert f"would meet it on these faces with a chance of {100 * odds:.2g}%" in text
    assert f"tested together (Holm's correction for {len(rows)} models: the smallest p must be below" in text
    section = text.split("## Calibration on public_test")[1].split("\n## ")[0]
    shown = [line for line in section.splitlines() if line.startswith("![")]
    assert shown == [
        "![mini_xception reliability](figures/results/mini_xception_reliability.png)",
        "![ensemble reliability](figures/results/ensemble_reliability.png)",
        "![mini_xception accuracy against coverage](figures/results/mini_xception_coverage.png)",
    ]
    default = next(r for r in rows if r["model_id"] == "mini_xception")
    report = evaluate_path(str(root / "models" / "mini_xception.onnx"), str(tiny_npz), "public_test", str(tmp_path))
    assert default["coverage"] == report["calibration"]["coverage"]
    assert "| coverage % | " + " | ".join(f"{100 * c['coverage']:.1f}" for c in default["coverage"]) in section


def test_intermediate_reads_the_stn_warp_and_the_embedding(results, tiny_npz):
    root, _, _ = results
    path = root / "models" / "stn_resnet10_triplet.onnx"
    classifier = OnnxClassifier.from_path(path, providers=CPU)
    faces = np.load(tiny_npz)["images"][-5:]
    x = to_model_input(list(faces), classifier.spec)
    # A freshly initialised spatial transformer is the identity warp.
    np.testing.assert_allclose(intermediate(path, node_tensor(path, "GridSample"), x), x, atol=1e-4)
    model = create_model("stn_resnet10_triplet", **TRIPLET_KWARGS)
    model.load_state_dict(torch.load(root / "triplet.pt", weights_only=False)["state_dict"])
    with torch.no_grad():
        expected = model.eval().features(torch.from_numpy(x)).numpy()
    # The embedding is the input of the classifier's Gemm (7 outputs), not of the STN's (6 outputs), which
    # comes first in the graph.
    embedding = node_tensor(path, "Gemm", outputs=7, take_input=True)
    assert embedding != node_tensor(path, "Gemm", take_input=True)
    np.testing.assert_allclose(intermediate(path, embedding, x), expected, atol=1e-4)
    with pytest.raises(ValueError, match="no LSTM node"):
        node_tensor(path, "LSTM")


def test_occlusion_covers_a_quarter_of_each_face_with_grey():
    faces = np.random.default_rng(0).integers(0, 120, (20, 48, 48), dtype=np.uint8)  # never 128 before
    occluded = occlude(faces, 0.25, seed=0)
    assert occluded.dtype == np.uint8 and occluded.shape == faces.shape
    assert ((occluded == 128).sum(axis=(1, 2)) == 24 * 24).all()  # 25% of 48×48 is a 24×24 square
    assert ((occluded != faces) == (occluded == 128)).all()  # nothing else changed
    np.testing.assert_array_equal(occlude(faces, 0.25, seed=0), occluded)  # the same patches every time


def test_target_odds_name_the_miscalibrated_models_alone_and_under_holms_correction():
    def row(model_id, ece, p, own_labels=None):
        return {"model_id": model_id, "ece": ece, "ece_within_target": 0.5, "ece_p_calibrated": p,
                "own_labels": own_labels}  # fmt: skip

    plus = {"ece": 0.018, "ece_within_target": 0.5, "ece_p_calibrated": 0.001}  # its figures on its own labels
    rows = [row("a", 0.030, 0.004), row("b", 0.025, 0.02), row("c", 0.015, 0.6), row("plus", 0.9, 0.9, plus)]
    _, line = _target_odds(rows)
    # the FER+ model is judged on its own labels: it meets the target, and its p (0.001) counts
    assert line.startswith("2 of 4 models meet the target.") and "with a chance of 6.2%" in line
    # alone: three under 0.05; together (sorted): 0.001 < 0.05/4, 0.004 < 0.05/3, 0.02 < 0.05/2, then 0.6 ≥ 0.05 stops
    assert "p < 0.05 for 3 (`a`, `b`, `plus`);" in line
    assert line.endswith("the smallest p must be below 0.0125), 3 (`a`, `b`, `plus`).")
    rows[1]["ece_p_calibrated"] = 0.03  # now 0.03 ≥ 0.05 / 2 stops the steps before it
    assert _target_odds(rows)[1].endswith("below 0.0125), 2 (`a`, `plus`).")
    one = _target_odds([row("c", 0.015, 0.6)])[1]
    assert one.endswith("p < 0.05 for none; tested together (Holm's correction for 1 model: the smallest p must be "
                        "below 0.0500), none.")  # fmt: skip
    assert _target_odds([]) == []
