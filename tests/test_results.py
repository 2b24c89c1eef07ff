"""`mien results`: the measured table, the figures, and the two looks inside ONNX graphs it relies on."""

from __future__ import annotations

import json
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
from mien.export.results_page import _summary
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
        for key in ("ece", "nll", "brier", "ece_floor", "ece_floor_95", "ece_p_calibrated"):
            assert row[key] == pytest.approx(report["calibration"][key]), (row["model_id"], key)
        floor = f"{100 * row['ece_floor']:.2f} ({100 * row['ece_floor_95']:.2f})"
        assert (f"| `{row['model_id']}` | {100 * row['ece']:.2f} | {floor} | {row['ece_p_calibrated']:.3f} "
                f"| {row['nll']:.3f} | {row['brier']:.3f} |") in text  # fmt: skip
        assert row["temperature"] is None  # none of them was calibrated
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


ARM_KWARGS = {"widths": (8, 16, 16, 32), "hidden": 16, "sr_blocks": 1, "sr_features": 8}
#: The warp given to the +STN arm's transformer before export: zoom to 0.9 and turn the grid by 10°.
STN_SCALE, STN_DEGREES = 0.9, 10.0


@pytest.fixture(scope="module")
def ablation(tiny_npz, tmp_path_factory) -> tuple[Path, list[dict], str]:
    """The four ablation arms at a tiny width, each trained for two short epochs by the project's training (so
    they answer differently on some faces), the +STN arm then given a fixed warp (zoom 0.9, 10°), exported
    by the project's export into one folder, and the results written from it."""
    import math

    from mien.export.sr_export import export_sr_front_end
    from mien.training.config import SRPretrainConfig
    from mien.training.models.base_cnn import ablation_model_kwargs
    from mien.training.sr_pretrain import pretrain_sr
    from mien.training.train import TrainConfig, train

    root = tmp_path_factory.mktemp("ablation")
    folder = root / "models"
    folder.mkdir()
    c, s = math.cos(math.radians(STN_DEGREES)), math.sin(math.radians(STN_DEGREES))
    warp = torch.tensor([STN_SCALE * c, -STN_SCALE * s, 0.0, STN_SCALE * s, STN_SCALE * c, 0.0])
    for model_id, kwargs in ablation_model_kwargs(**ARM_KWARGS).items():
        run = root / "runs" / model_id
        train(TrainConfig(data=str(tiny_npz), out=str(run), model=model_id, epochs=2, batch_size=32, lr=5e-3,
                          warmup_epochs=0, threads=1, limit=256, model_kwargs=kwargs,
                          stn_reg=0.01, stn_lr_scale=0.01))  # the ablation's (no effect without an STN)  # fmt: skip
        if model_id == "stn_cnn":
            ckpt = torch.load(run / "best.pt", weights_only=False)
            ckpt["state_dict"]["stn.fc.weight"].zero_()
            ckpt["state_dict"]["stn.fc.bias"].copy_(warp)
            torch.save(ckpt, run / "best.pt")
        export_checkpoint(ExportConfig(checkpoint=str(run / "best.pt"), out=str(folder / f"{model_id}.onnx"),
                                       data=str(tiny_npz), parity_faces=256))  # fmt: skip
    # the SR arms' pre-trained front end, exported where the repository keeps it
    pretrain_sr(SRPretrainConfig(data=str(tiny_npz), out=str(root / "runs" / "sr.pt"), epochs=1, batch_size=16,
                                 sr_kwargs={"num_blocks": 1, "features": 8}, threads=1))  # fmt: skip
    assert export_sr_front_end(root / "runs" / "sr.pt", folder / "frontends" / "edsr_x2.onnx", tiny_npz).passed
    cfg = ResultsConfig(model_dir=str(folder), data=str(tiny_npz), out=str(root / "docs" / "results.md"),
                        figures=str(root / "docs" / "figures" / "results"), repeats=3)  # fmt: skip
    rows = write_results(cfg)
    return root, rows, (root / "docs" / "results.md").read_text()


def _correct(path: Path, tiny_npz) -> np.ndarray:
    data = np.load(tiny_npz)
    test = data["split"] == 1
    classifier = OnnxClassifier.from_path(path, providers=CPU)
    return classifier.predict_crops(list(data["images"][test])).argmax(1) == data["labels"][test]


def test_the_ablation_table_has_intervals_paired_tests_stn_warps_and_verdicts(ablation, tiny_npz):
    from mien.export.stats import bootstrap_ci, mcnemar, paired_bootstrap_diff, verdict

    root, rows, text = ablation
    by_id = {r["model_id"]: r for r in rows}
    section = text.split("## STN / SR ablation")[1].split("\n## ")[0]
    assert "public_test accuracy % [95% CI]" in section and "McNemar vs Base" in section and "verdict" in section
    base = _correct(root / "models" / "base_cnn.onnx", tiny_npz)
    for model_id, name in {"base_cnn": "Base", "stn_cnn": "+STN", "sr_cnn": "+SR", "stn_sr_cnn": "+STN+SR"}.items():
        r = by_id[model_id]
        correct = _correct(root / "models" / f"{model_id}.onnx", tiny_npz)
        assert r["accuracy"] == pytest.approx(correct.mean())
        np.testing.assert_array_equal(r["correct"], correct)  # kept in memory for the paired tests
        low, high = bootstrap_ci(correct)
        assert r["accuracy_ci95"] == pytest.approx([low, high])
        line = next(line for line in section.splitlines() if line.startswith(f"| {name} | `{model_id}` |"))
        assert f"| {100 * r['accuracy']:.2f} [{100 * low:.2f}, {100 * high:.2f}] |" in line
        if model_id == "base_cnn":
            assert line.endswith("| reference |")
            continue
        test = mcnemar(base, correct)
        difference = correct.mean() - base.mean()
        d_low, d_high = paired_bootstrap_diff(base, correct)
        assert f"| {100 * difference:+.2f} [{100 * d_low:+.2f}, {100 * d_high:+.2f}] |" in line
        assert f"| {test['b10']} / {test['b01']}, p = " in line
        assert line.endswith(f"| {verdict(difference, test['p_value'])} |")


def test_the_sr_front_end_is_reported_against_bicubic_as_its_card_scored_it_and_is_not_served(ablation):
    root, rows, md = ablation
    card = json.loads((root / "models" / "frontends" / "edsr_x2.card.json").read_text())
    assert "edsr_x2" not in {r["model_id"] for r in rows}  # models/frontends/ holds no classifier
    section = md.split("### The SR front end against bicubic upsampling")[1].split("\n## ")[0]
    for split in ("val", "public_test"):
        e = card["evaluation"][split]
        (line,) = [row for row in section.splitlines() if f"| {split} |" in row]
        assert f"| {e['psnr_db']['sr']['mean']:.2f} ({e['psnr_db']['bicubic']['mean']:.2f}) |" in line
        assert f"{e['ssim_margin']['mean']:+.4f} [{e['ssim_margin']['ci95'][0]:+.4f}," in line
        assert "EDSR B=1, F=8" in line and "| 1 epoch, " in line


def test_an_arm_trained_with_another_recipe_than_base_is_not_called_an_ablation(ablation):
    """The fixture's arms share one recipe but for the model: each gets a verdict. Give +SR the old budget runs'
    differences (fewer epochs, a lower rate, a classifier started from Base) and its verdict names them instead;
    the Δ and McNemar cells stay, since the faces are the same."""
    import copy

    from mien.export.ablation import ablation_table, recipe_differences

    _, rows, text = ablation
    by_id = {r["model_id"]: r for r in rows}
    base = by_id["base_cnn"]["train_config"]
    assert base["model"] == "base_cnn" and base["epochs"] == 2  # what the card recorded from mien train
    for model_id in ("stn_cnn", "sr_cnn", "stn_sr_cnn"):
        assert recipe_differences(base, by_id[model_id]["train_config"]) == ""
    section = text.split("## STN / SR ablation")[1].split("\n## ")[0]
    for model_id, r in by_id.items():  # the epochs column: the schedule, the epoch kept, the precision trained in
        if model_id in ("base_cnn", "stn_cnn", "sr_cnn", "stn_sr_cnn"):
            assert r["precision"] == "fp32"  # what every epoch of the fixture's runs recorded
            assert f"| `{model_id}` | 2, kept {r['epochs']}, fp32 |" in section and 1 <= r["epochs"] <= 2
    assert "not comparable" not in section

    changed = copy.deepcopy(by_id)
    arm = changed["sr_cnn"]["train_config"]
    arm.update(epochs=1, lr=5e-4, init="runs/base_cnn/best.pt", sr_init="sr.pt", threads=2)
    del arm["augment"]["erasing"]  # an older card without the key: its absence is a difference
    arm["augment"]["mixup"] = 0.2
    found = recipe_differences(base, arm)
    assert found == "epochs 1 vs 2, lr 0.0005 vs 0.005, augment.erasing — vs 0.0, augment.mixup 0.2 vs 0.0 and 1 more"
    every = recipe_differences(base, arm, shown=10)
    assert every == found.replace(" and 1 more", ", init runs/base_cnn/best.pt vs —")  # base's init is ""
    assert "sr_init" not in every and "threads" not in every  # the front end and the machine may differ
    # so may when the SR front end trains, and the precision (amp = "auto": the machine's; the first arms' cards
    # say "bf16", what auto gave there): the +SR arm of issue 17 against the Base card it is compared with
    assert recipe_differences({**base, "amp": "bf16"}, {**base, "amp": "auto", "sr_finetune_epochs": 10}) == ""
    assert recipe_differences(base, {**base, "init": ""}) == ""  # an empty value means what an absent key means
    assert recipe_differences(None, arm).startswith("unknown")

    lines = ablation_table(changed, "public_test")
    sr_line = next(line for line in lines if line.startswith("| +SR | `sr_cnn` |"))
    assert sr_line.endswith(f"| not comparable, trained differently: {found} |")
    assert "p = " in sr_line  # the paired test is still shown
    stn_line = next(line for line in lines if line.startswith("| +STN | `stn_cnn` |"))
    assert "not comparable" not in stn_line and stn_line == next(
        line for line in ablation_table(by_id, "public_test") if line.startswith("| +STN | `stn_cnn` |")
    )


def test_the_stn_warp_learnt_is_read_from_the_onnx_graph_into_the_row_and_the_table(ablation, tiny_npz):
    from mien.export.figures import stn_thetas

    root, rows, text = ablation
    by_id = {r["model_id"]: r for r in rows}
    assert by_id["base_cnn"]["stn_affine"] is None and by_id["sr_cnn"]["stn_affine"] is None
    warp = by_id["stn_cnn"]["stn_affine"]
    assert warp["scale"] == pytest.approx(STN_SCALE, abs=1e-4) and warp["rotation_deg"] == pytest.approx(STN_DEGREES)
    assert warp["faces"] == 280 and warp["scale_std"] == pytest.approx(0.0, abs=1e-5)
    trained = by_id["stn_sr_cnn"]["stn_affine"]  # two short epochs from the identity, with the ablation's stn_reg
    assert abs(trained["scale"] - 1) < 0.3 and abs(trained["rotation_deg"]) < 30
    section = text.split("## STN / SR ablation")[1].split("\n## ")[0]
    assert f"| {STN_SCALE:.3f} / +{STN_DEGREES:.1f}° |" in section
    assert f"| {trained['scale']:.3f} / {trained['rotation_deg']:+.1f}° |" in section
    # the same θ whether read from AffineGrid's input or fitted to GridSample's grid
    path = root / "models" / "stn_cnn.onnx"
    classifier = OnnxClassifier.from_path(path, providers=CPU)
    faces = np.load(tiny_npz)["images"][-4:]
    from_graph = stn_thetas(path, classifier, faces)
    import mien.export.figures as figures

    real_has_op = figures.has_op
    figures.has_op = lambda p, op: False if op == "AffineGrid" else real_has_op(p, op)
    try:
        fitted = stn_thetas(path, classifier, faces)
    finally:
        figures.has_op = real_has_op
    np.testing.assert_allclose(fitted, from_graph, atol=1e-4)
    saved = json.loads((root / "docs" / "figures" / "results" / "results.json").read_text())
    assert all("correct" not in r and "accuracy_ci95" in r for r in saved)  # per-face answers stay in memory
    assert next(r for r in saved if r["model_id"] == "stn_cnn")["stn_affine"] == pytest.approx(warp)


@pytest.fixture(scope="module")
def seeds(ablation, tiny_npz) -> tuple[Path, list[dict], str]:
    """The ablation's folder with a second seed of Base and +STN in ``models/seeds/`` (trained like the arms, with
    seed 1, exported under their own ids), and the results written again from it."""
    from mien.training.models.base_cnn import ablation_model_kwargs
    from mien.training.train import TrainConfig, train

    root, _, _ = ablation
    kwargs = ablation_model_kwargs(**ARM_KWARGS)
    (root / "models" / "seeds").mkdir()
    for model_id in ("base_cnn", "stn_cnn"):
        run = root / "runs" / f"{model_id}_seed1"
        train(TrainConfig(data=str(tiny_npz), out=str(run), model=model_id, epochs=2, batch_size=32, lr=5e-3,
                          warmup_epochs=0, threads=1, limit=256, model_kwargs=kwargs[model_id], stn_reg=0.01,
                          seed=1))  # fmt: skip
        export_checkpoint(ExportConfig(checkpoint=str(run / "best.pt"), data=str(tiny_npz), parity_faces=256,
                                       out=str(root / "models" / "seeds" / f"{model_id}_seed1.onnx"),
                                       model_id=f"{model_id}_seed1"))  # fmt: skip
    (root / "README.md").write_text(README)
    cfg = ResultsConfig(model_dir=str(root / "models"), data=str(tiny_npz), out=str(root / "docs" / "seeds.md"),
                        figures=str(root / "docs" / "figures" / "seeds"), repeats=3,
                        readme=str(root / "README.md"))  # fmt: skip
    rows = write_results(cfg)
    return root, rows, (root / "docs" / "seeds.md").read_text()


README = """# A project

<!-- mien results: headline -->
old headline
<!-- /mien results: headline -->

Prose between the tables.

<!-- mien results: ablation -->
<!-- /mien results: ablation -->
"""


def test_the_ablation_is_saved_and_written_into_the_readme_with_the_verdict_over_seeds(seeds):
    from mien.export.readme import ablation, blocks_in, headline

    root, rows, text = seeds
    table = json.loads((root / "docs" / "figures" / "seeds" / "ablation.json").read_text())
    assert table["split"] == "public_test"
    section = text.split("## STN / SR ablation")[1].split("\n## ")[0]
    for c in table["arms"]:  # the saved cells are the ones results.md shows
        assert (f"| {c['arm']} | `{c['model_id']}` | {c['epochs']} | {c['accuracy']} | {c['delta']} | {c['test']} "
                f"| {c['paper']} |") in section  # fmt: skip
    assert [c["arm"] for c in table["over_seeds"]] == ["Base", "+STN", "+SR", "+STN+SR"]
    for c in table["over_seeds"]:
        assert f"| {c['arm']} | {c['seeds']} | {c['mean_accuracy']} | {c['mean_delta']} | {c['verdict']} |" in section
    readme = (root / "README.md").read_text()
    assert readme.startswith("# A project\n") and "\nProse between the tables.\n" in readme
    found = blocks_in(readme)
    assert found["ablation"] == "\n".join(ablation(table["arms"], table["over_seeds"], "public_test")) + "\n"
    assert found["headline"] == "\n".join(headline(rows, "public_test", "mini_xception")) + "\n"
    stn = next(line for line in found["ablation"].splitlines() if line.startswith("| +STN (`stn_cnn`"))
    assert "learnt warp: scale / rotation" in stn and "| +STN | 2 |" in found["ablation"]


def test_further_seeds_are_scored_beside_their_arm_against_base_of_the_same_seed(seeds, tiny_npz):
    from mien.export.stats import mcnemar, paired_bootstrap_diff, verdict

    root, rows, text = seeds
    assert {r["model_id"] for r in rows} == {"base_cnn", "stn_cnn", "sr_cnn", "stn_sr_cnn"}  # seeds are not served
    saved = json.loads((root / "docs" / "figures" / "seeds" / "seeds.json").read_text())
    assert [(r["model_id"], r["arm"], r["seed"]) for r in saved] == [("base_cnn_seed1", "base_cnn", 1),
                                                                     ("stn_cnn_seed1", "stn_cnn", 1)]  # fmt: skip
    assert all("correct" not in r and "train_config" not in r for r in saved)
    section = text.split("### Every seed of each arm")[1].split("\n## ")[0]
    correct = {(m, s): _correct(root / "models" / f, tiny_npz) for m, s, f in [
        ("base_cnn", 0, "base_cnn.onnx"), ("base_cnn", 1, "seeds/base_cnn_seed1.onnx"),
        ("stn_cnn", 0, "stn_cnn.onnx"), ("stn_cnn", 1, "seeds/stn_cnn_seed1.onnx")]}  # fmt: skip
    assert saved[1]["accuracy"] == pytest.approx(correct["stn_cnn", 1].mean())
    verdicts = []
    for seed in (0, 1):
        model_id = "stn_cnn" if seed == 0 else "stn_cnn_seed1"
        line = next(line for line in section.splitlines() if line.startswith(f"| +STN | `{model_id}` | {seed} |"))
        base, arm = correct["base_cnn", seed], correct["stn_cnn", seed]
        test, difference = mcnemar(base, arm), arm.mean() - base.mean()
        low, high = paired_bootstrap_diff(base, arm)
        assert f"| {100 * difference:+.2f} [{100 * low:+.2f}, {100 * high:+.2f}] |" in line
        assert f"| {test['b10']} / {test['b01']}, p = " in line
        assert line.endswith("| (bundled) |" if seed == 0 else "| seed 1 vs 0 |")  # nothing else differs
        verdicts.append(verdict(difference, test["p_value"]))
    base_line = next(line for line in section.splitlines() if line.startswith("| Base | `base_cnn_seed1` | 1 |"))
    assert "| reference |" in base_line and base_line.endswith("| seed 1 vs 0 |")
    assert sum(line.startswith("| +SR | ") for line in section.splitlines()) == 2  # one seed, and its summary
    summary = next(line for line in section.splitlines() if line.startswith("| +STN | 2 |"))
    mean = 50 * (correct["stn_cnn", 0].mean() + correct["stn_cnn", 1].mean())
    assert summary.startswith(f"| +STN | 2 | {mean:.2f} |")
    disagree = f"no measurable effect (seeds disagree: {', '.join(verdicts)})"
    agreed = verdicts[0] if verdicts[0] == verdicts[1] else disagree
    assert summary.endswith(f"| {agreed} |")


def test_an_effect_over_seeds_needs_every_seed_to_show_it():
    from mien.export.ablation import ablation_seeds_table

    n = 400
    right = np.ones(n, dtype=bool)
    worse = right.copy()
    worse[:100] = False  # 100 faces only Base gets right: p far below 0.05

    def row(model_id, seed, correct):
        return {"model_id": model_id, "accuracy": float(correct.mean()), "correct": correct,
                "train_config": {"model": model_id.removesuffix(f"_seed{seed}"), "seed": seed}}  # fmt: skip

    by_id = {m: row(m, 0, right) for m in ("base_cnn", "sr_cnn", "stn_sr_cnn")}
    by_id["stn_cnn"] = row("stn_cnn", 0, worse)
    further = [{**row("base_cnn_seed1", 1, right), "arm": "base_cnn", "seed": 1},
               {**row("stn_cnn_seed1", 1, worse), "arm": "stn_cnn", "seed": 1}]  # fmt: skip
    summary = lambda lines: next(line for line in lines if line.startswith("| +STN | 2 |"))  # noqa: E731
    assert summary(ablation_seeds_table(by_id, further, "public_test")) == "| +STN | 2 | 75.00 | -25.00 | hurts |"
    further[1] = {**row("stn_cnn_seed1", 1, right), "arm": "stn_cnn", "seed": 1}  # seed 1 shows nothing
    assert summary(ablation_seeds_table(by_id, further, "public_test")).endswith(
        "| -12.50 | no measurable effect (seeds disagree: hurts, no measurable effect) |"
    )
    assert ablation_seeds_table(by_id, [], "public_test") == []  # no further seed: no table
    by_id["sr_cnn"]["train_config"]["epochs"] = 2  # an arm trained with another recipe than Base gets no verdict
    sr = next(line for line in ablation_seeds_table(by_id, further, "public_test") if line.startswith("| +SR | 1 |"))
    assert sr.endswith("| not comparable (trained differently from Base, see above) |")


def test_the_precision_a_run_trained_in_comes_from_its_history_else_from_what_amp_asked():
    """An arm trained in bf16 on one machine and another in fp32 on the next share a recipe (amp = "auto"): the
    ablation table shows which precision each ran in, read from the epochs' history, in order when a run was
    resumed on another machine; a card from before the history recorded it falls back to its amp."""
    from types import SimpleNamespace

    from mien.export.results import trained_precision

    def training(history, amp):
        return SimpleNamespace(history=history, config={"amp": amp} if amp else {})

    assert trained_precision(training([{"precision": "fp32"}] * 3, "auto")) == "fp32"
    resumed = [{"precision": "bf16"}, {"precision": "bf16"}, {"precision": "fp32"}, {"precision": "bf16"}]
    assert trained_precision(training(resumed, "auto")) == "bf16/fp32"
    assert trained_precision(training([{"epoch": 1}], "bf16")) == "bf16"  # an older card: what it asked for
    assert trained_precision(training([], "none")) == "fp32"
    assert trained_precision(training([], None)) == "fp32"  # amp's default then: none
    assert trained_precision(training([], "auto")) is None  # auto says nothing without the epochs
    assert trained_precision(None) is None
