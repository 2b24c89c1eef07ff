import json
import subprocess
import sys

import numpy as np
import onnx
import pytest
import torch

from mien.card import card_path, read_card
from mien.export.evaluate import classification_report, evaluate_path
from mien.export.onnx_export import ExportConfig, export_checkpoint
from mien.runtime import OnnxClassifier
from mien.spec import PreprocessSpec


def test_onnx_carries_spec_identity_and_a_dynamic_batch(model_dir):
    path = model_dir / "mini_xception.onnx"
    proto = onnx.load(str(path))
    meta = {p.key: p.value for p in proto.metadata_props}
    assert PreprocessSpec.from_metadata(meta).input_size == (48, 48)
    assert meta["mien.model_id"] == "mini_xception"
    classifier = OnnxClassifier.from_path(path, providers=("CPUExecutionProvider",))
    for n in (1, 7):
        probs = classifier(np.zeros((n, 1, 48, 48), np.float32))
        assert probs.shape == (n, 7)
        np.testing.assert_allclose(probs.sum(1), 1.0, atol=1e-5)
    assert classifier.provider == "CPUExecutionProvider"


def test_card_records_what_a_user_needs(model_dir, tiny_run):
    card = json.loads((model_dir / "mini_xception.card.json").read_text())
    assert card["model_id"] == "mini_xception"
    assert 50_000 < card["parameters"] < 65_000 and card["macs"] > 1_000_000
    assert card["parity"]["passed"] and card["parity"]["real_faces"] >= 256
    assert card["parity"]["max_abs_diff"] <= 1e-4 and card["parity"]["argmax_agreement"] == 1.0
    assert card["metrics"]["split"] == "public_test" and 0 <= card["metrics"]["accuracy"] <= 1
    assert card["training"]["epochs_run"] == 3 and "seconds_per_epoch_median" in card["training"]
    history = [json.loads(line) for line in (tiny_run / "history.jsonl").read_text().splitlines()]
    assert [h["epoch"] for h in card["training"]["history"]] == [1, 2, 3]
    assert card["training"]["history"][-1]["val_acc"] == pytest.approx(history[-1]["val_acc"], abs=1e-5)
    assert card["labels"] == list(PreprocessSpec().labels)


def test_card_records_what_the_whole_run_cost(model_dir, tiny_run, tmp_path):
    """best.pt's history ends at the epoch it kept; the card's run totals come from the run folder's history.jsonl,
    every epoch once: CPU-hours from the CPU time each epoch recorded, else its seconds × the run's threads."""
    from mien.export.onnx_export import run_totals

    history = [json.loads(line) for line in (tiny_run / "history.jsonl").read_text().splitlines()]
    assert all(0 < h["cpu_seconds"] for h in history)
    run = read_card(card_path(model_dir / "mini_xception.onnx")).training.run
    assert run == {"epochs": 3, "seconds": pytest.approx(sum(h["seconds"] for h in history), abs=0.1), "threads": 1,
                   "cpu_hours": pytest.approx(sum(h["cpu_seconds"] for h in history) / 3600, abs=1e-3),
                   "cpu_hours_from": "process CPU time"}  # fmt: skip
    folder = tmp_path / "run"
    folder.mkdir()
    lines = [
        json.dumps({"epoch": 1, "seconds": 100.0, "cpu_seconds": 150.0}),
        json.dumps({"epoch": 2, "seconds": 50.0, "cpu_seconds": 90.0}),
        json.dumps({"epoch": 2, "seconds": 60.0, "cpu_seconds": 100.0}),  # written again after a resume: once
        "",
    ]
    (folder / "history.jsonl").write_text("\n".join(lines))
    totals = run_totals(folder / "best.pt", {"threads": 2})
    assert totals["epochs"] == 2 and totals["seconds"] == 160.0
    assert totals["cpu_hours"] == pytest.approx(250 / 3600, abs=1e-3) and totals["cpu_hours_from"] == "process CPU time"
    lines[0] = json.dumps({"epoch": 1, "seconds": 100.0})  # an older run without CPU time: wall time x threads
    (folder / "history.jsonl").write_text("\n".join(lines))
    totals = run_totals(folder / "best.pt", {"threads": 2})
    assert (
        totals["cpu_hours"] == pytest.approx(320 / 3600, abs=1e-3) and totals["cpu_hours_from"] == "seconds x threads"
    )
    assert run_totals(tmp_path / "best.pt", {"threads": 2}) == {}  # not in a run folder: nothing claimed


def test_card_says_which_split_selected_and_which_tested(model_dir, tiny_run):
    """The checkpoint was selected on the split its best metrics came from (now the carved validation split);
    the card's figures are measured on the export's split. The card reads back through mien.card."""
    best = torch.load(tiny_run / "best.pt", weights_only=False)["metrics"]
    card = read_card(card_path(model_dir / "mini_xception.onnx"))
    assert card.selected_on == best["split"] == "val"
    assert card.tested_on == "public_test"
    assert card.training.best == best and card.parity.passed


def test_eval_of_checkpoint_and_of_its_onnx_agree(model_dir, tiny_run, tiny_npz, tmp_path):
    from_pt = evaluate_path(str(tiny_run / "best.pt"), str(tiny_npz), "public_test", str(tmp_path / "pt"))
    from_onnx = evaluate_path(str(model_dir / "mini_xception.onnx"), str(tiny_npz), "public_test", str(tmp_path / "x"))
    assert from_pt["accuracy"] == pytest.approx(from_onnx["accuracy"])
    card = json.loads((model_dir / "mini_xception.card.json").read_text())
    assert card["metrics"]["accuracy"] == pytest.approx(from_onnx["accuracy"])
    for folder in ("pt", "x"):
        assert (tmp_path / folder / "confusion.png").stat().st_size > 0
        report = json.loads((tmp_path / folder / "report.json").read_text())
        assert np.asarray(report["confusion_matrix"]).sum() == report["num_images"] == 7 * 40


def test_classification_report_by_hand():
    labels = np.array([0, 0, 1, 1, 2])
    predicted = np.array([0, 1, 1, 1, 0])
    report = classification_report(labels, predicted, ("a", "b", "c"))
    assert report["accuracy"] == pytest.approx(3 / 5)
    assert report["confusion_matrix"] == [[1, 1, 0], [0, 2, 0], [1, 0, 0]]
    assert report["per_class"]["b"] == {"precision": pytest.approx(2 / 3), "recall": 1.0, "f1": pytest.approx(0.8),
                                        "support": 2}  # fmt: skip
    assert report["per_class"]["c"]["f1"] == 0.0
    assert report["macro_f1"] == pytest.approx((0.5 + 0.8 + 0.0) / 3)


def test_export_fails_loudly_when_onnx_disagrees(tiny_run, tiny_npz, tmp_path, monkeypatch):
    import mien.export.onnx_export as ex

    real_to_onnx = ex.to_onnx

    def skewed(model, example, path, opset, metadata):
        with torch.no_grad():  # export a model whose head is off by a little: parity must catch it
            broken = type(model)(num_classes=7)
            broken.load_state_dict(model.state_dict())
            broken.head.bias.add_(1e-2 * torch.arange(7))
        real_to_onnx(broken.eval(), example, path, opset, metadata)

    monkeypatch.setattr(ex, "to_onnx", skewed)
    result = export_checkpoint(ExportConfig(checkpoint=str(tiny_run / "best.pt"), out=str(tmp_path / "m.onnx"),
                                            data=str(tiny_npz), parity_faces=256))  # fmt: skip
    assert not result.passed and result.max_abs_diff > 1e-4
    card = json.loads((tmp_path / "m.card.json").read_text())
    assert card["parity"]["passed"] is False


def test_export_command_exit_code(tiny_run, tiny_npz, tmp_path):
    ok = subprocess.run([sys.executable, "-m", "mien.cli", "export", str(tiny_run / "best.pt"), "--out",
                         str(tmp_path / "ok.onnx"), "--data", str(tiny_npz), "--parity-faces", "256"],
                        capture_output=True, text=True)  # fmt: skip
    assert ok.returncode == 0, ok.stderr
    # A negative tolerance can never be met: the command must say so through its exit code.
    bad = subprocess.run([sys.executable, "-m", "mien.cli", "export", str(tiny_run / "best.pt"), "--out",
                          str(tmp_path / "bad.onnx"), "--data", str(tiny_npz), "--parity-faces", "256",
                          "--atol", "-1"], capture_output=True, text=True)  # fmt: skip
    assert bad.returncode == 1 and "parity FAILED" in bad.stderr


def test_a_second_copy_of_a_network_is_exported_under_its_own_model_id(tiny_run, tiny_npz, tmp_path):
    run = subprocess.run([sys.executable, "-m", "mien.cli", "export", str(tiny_run / "best.pt"), "--out",
                          str(tmp_path / "seed1.onnx"), "--data", str(tiny_npz), "--parity-faces", "256",
                          "--model-id", "mini_xception_seed1"], capture_output=True, text=True)  # fmt: skip
    assert run.returncode == 0, run.stderr
    served = OnnxClassifier.from_path(tmp_path / "seed1.onnx")
    card = read_card(card_path(tmp_path / "seed1.onnx"))
    assert served.model_id == card.model_id == "mini_xception_seed1"
    assert card.training.config["model"] == "mini_xception"  # the network it is
    assert "--model-id mini_xception_seed1" in card.export.command
    default = export_checkpoint(ExportConfig(checkpoint=str(tiny_run / "best.pt"), out=str(tmp_path / "m.onnx"),
                                             data=str(tiny_npz), parity_faces=256))  # fmt: skip
    assert default.passed and OnnxClassifier.from_path(tmp_path / "m.onnx").model_id == "mini_xception"


def test_export_refuses_too_few_parity_faces(tiny_run, tiny_npz, tmp_path):
    with pytest.raises(ValueError, match="at least 256"):
        export_checkpoint(ExportConfig(checkpoint=str(tiny_run / "best.pt"), out=str(tmp_path / "m.onnx"),
                                       data=str(tiny_npz), parity_faces=100))  # fmt: skip


def test_flip_tta_export_averages_a_face_and_its_mirror(tiny_run, tiny_npz, tmp_path):
    from mien.training.checkpoint import load_model

    result = export_checkpoint(ExportConfig(checkpoint=str(tiny_run / "best.pt"), out=str(tmp_path / "t.onnx"),
                                            data=str(tiny_npz), parity_faces=256, flip_tta=True))  # fmt: skip
    assert result.passed
    meta = {p.key: p.value for p in onnx.load(str(tmp_path / "t.onnx")).metadata_props}
    assert meta["mien.test_time_augmentation"] == "flip"
    model, _, _ = load_model(tiny_run / "best.pt")
    x = np.random.default_rng(1).normal(size=(3, 1, 48, 48)).astype(np.float32)
    with torch.no_grad():
        expected = 0.5 * (model(torch.from_numpy(x)) + model(torch.from_numpy(x[..., ::-1].copy())))
    got = OnnxClassifier.from_path(tmp_path / "t.onnx").session.run(None, {"input": x})[0]
    np.testing.assert_allclose(got, expected.numpy(), atol=1e-4)
    card = json.loads((tmp_path / "t.card.json").read_text())
    assert card["export"]["flip_tta"] is True and "--flip-tta" in card["export"]["command"]


def test_ten_crop_export_averages_the_ten_views(tiny_run, tiny_npz, tmp_path):
    from mien.training.checkpoint import load_model
    from mien.training.tencrop import ten_crop_logits

    out = tmp_path / "ten.onnx"
    result = export_checkpoint(ExportConfig(checkpoint=str(tiny_run / "best.pt"), out=str(out), data=str(tiny_npz),
                                            parity_faces=256, ten_crop=40))  # fmt: skip
    assert result.passed
    meta = {p.key: p.value for p in onnx.load(str(out)).metadata_props}
    assert meta["mien.test_time_augmentation"] == "ten_crop_40"
    model, _, _ = load_model(tiny_run / "best.pt")
    x = np.random.default_rng(2).normal(size=(3, 1, 48, 48)).astype(np.float32)
    expected = ten_crop_logits(model, torch.from_numpy(x), 40)
    got = OnnxClassifier.from_path(out).session.run(None, {"input": x})[0]
    np.testing.assert_allclose(got, expected.numpy(), atol=1e-4)
    card = json.loads((tmp_path / "ten.card.json").read_text())
    assert card["export"]["ten_crop"] == 40 and "--ten-crop 40" in card["export"]["command"]
    with pytest.raises(ValueError, match="--ten-crop excludes --flip-tta"):
        export_checkpoint(ExportConfig(checkpoint=str(tiny_run / "best.pt"), out=str(tmp_path / "x.onnx"),
                                       data=str(tiny_npz), flip_tta=True, ten_crop=40))  # fmt: skip


def test_shift_export_averages_the_moved_faces_each_with_its_mirror(tiny_run, tiny_npz, tmp_path):
    """--shift-tta 1 with --flip-tta: the logits of the face moved by every (dx, dy) of the 3×3 grid, its edge pixels
    repeated into the uncovered border, each view averaged with its mirror, then averaged over the views."""
    from mien.training.checkpoint import load_model

    out = tmp_path / "shift.onnx"
    result = export_checkpoint(ExportConfig(checkpoint=str(tiny_run / "best.pt"), out=str(out), data=str(tiny_npz),
                                            parity_faces=256, flip_tta=True, shift_tta=1))  # fmt: skip
    assert result.passed
    meta = {p.key: p.value for p in onnx.load(str(out)).metadata_props}
    assert meta["mien.test_time_augmentation"] == "flip+shift_grid_1"
    model, _, _ = load_model(tiny_run / "best.pt")
    x = np.random.default_rng(3).normal(size=(2, 1, 48, 48)).astype(np.float32)
    padded = np.pad(x, ((0, 0), (0, 0), (1, 1), (1, 1)), mode="edge")
    views = []
    for dy in (-1, 0, 1):
        for dx in (-1, 0, 1):
            view = torch.from_numpy(np.ascontiguousarray(padded[..., 1 - dy : 49 - dy, 1 - dx : 49 - dx]))
            with torch.no_grad():
                views.append(0.5 * (model(view) + model(view.flip(-1))))
    got = OnnxClassifier.from_path(out).session.run(None, {"input": x})[0]
    np.testing.assert_allclose(got, torch.stack(views).mean(0).numpy(), atol=1e-4)
    card = json.loads((tmp_path / "shift.card.json").read_text())
    assert card["export"]["shift_tta"] == 1 and card["export"]["shift_pattern"] == "grid"
    assert "--flip-tta --shift-tta 1 --shift-pattern grid" in card["export"]["command"]


def test_a_shift_moves_the_face_right_and_down_and_repeats_its_edge():
    from mien.export.onnx_export import ShiftAverage, shift_views

    face = torch.zeros(1, 1, 5, 5)
    face[..., 2, 0] = 1.0  # one bright pixel on the left edge
    identity = torch.nn.Identity()  # the views come back flattened per face, as logits would
    moved = ShiftAverage(identity, [(1, 0)])(face).view(1, 1, 5, 5)  # the face one pixel to the right
    assert moved[0, 0, 2].tolist() == [1.0, 1.0, 0.0, 0.0, 0.0]  # the edge pixel repeated into the uncovered column
    down = ShiftAverage(identity, [(0, 2)])(face).view(1, 1, 5, 5)
    assert down[0, 0, :, 0].tolist() == [0.0, 0.0, 0.0, 0.0, 1.0]  # two rows down
    assert torch.equal(ShiftAverage(identity, [(0, 0)])(face).view(1, 1, 5, 5), face)
    assert shift_views(2, "plus") == [(0, 0), (2, 0), (-2, 0), (0, 2), (0, -2)] and len(shift_views(1, "grid")) == 9
    with pytest.raises(ValueError, match="pattern"):
        shift_views(1, "star")
    with pytest.raises(ValueError, match="at least 1"):
        shift_views(0, "grid")
    with pytest.raises(ValueError, match="excludes"):
        from mien.export.onnx_export import test_time_augmentation

        test_time_augmentation(ExportConfig(checkpoint="x.pt", ten_crop=40, shift_tta=1))
