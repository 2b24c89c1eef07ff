"""`mien recover`: a bundled model's training checkpoint rebuilt from its ONNX file (its run folder lost), checked
against the file before it is written, and usable wherever best.pt was (a teacher, an export)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from mien.cli import main
from mien.export.calibrate import calibrate
from mien.export.onnx_export import ExportConfig, export_checkpoint
from mien.export.recover import RecoveryError, recover, recover_checkpoint
from mien.training.checkpoint import load_model
from mien.training.config import AugmentConfig, TrainConfig
from mien.training.distill import load_teachers
from mien.training.train import train


@pytest.fixture(scope="module")
def bundled(tmp_path_factory, tiny_npz):
    """A crop-trained vgg_fer with batch norms, exported with flip averaging and calibrated on val, as bundled."""
    run, models = tmp_path_factory.mktemp("run"), tmp_path_factory.mktemp("models")
    train(TrainConfig(data=str(tiny_npz), out=str(run), model="vgg_fer", model_kwargs={"width": 4, "hidden": 8},
                      epochs=2, batch_size=32, lr=0.05, optimizer="sgd", warmup_epochs=1, ema=0.9, threads=1,
                      augment=AugmentConfig(crop=40)))  # fmt: skip
    onnx_path = models / "vgg_tiny.onnx"
    assert export_checkpoint(ExportConfig(checkpoint=str(run / "best.pt"), out=str(onnx_path), data=str(tiny_npz),
                                          parity_faces=256, flip_tta=True, model_id="vgg_tiny")).passed  # fmt: skip
    calibrate(onnx_path, tiny_npz, "val", "public_test", method="temperature")
    return run / "best.pt", onnx_path


def test_the_rebuilt_checkpoint_computes_what_the_lost_one_did(bundled, tiny_npz, tmp_path):
    best, onnx_path = bundled
    out = tmp_path / "again" / "best.pt"
    parity = recover(onnx_path, out, tiny_npz)
    assert parity.passed and parity.argmax_agreement == 1.0 and parity.max_abs_diff < 1e-4
    original, spec, _ = load_model(best)
    rebuilt, rebuilt_spec, ckpt = load_model(out)
    assert rebuilt_spec == spec and ckpt["model_id"] == "vgg_fer" and ckpt["recovered_from"]["model_id"] == "vgg_tiny"
    assert ckpt["recovered_from"]["test_time_augmentation"] == "flip"
    x = torch.from_numpy(np.random.default_rng(0).normal(size=(16, 1, 48, 48)).astype(np.float32))
    with torch.no_grad():  # the same network: logits equal up to the batch-norm folding's rounding
        torch.testing.assert_close(rebuilt(x), original(x), atol=1e-4, rtol=1e-4)
    # it teaches as the lost best.pt taught (same crop, same answers)
    (lost,), (found,) = load_teachers(str(best), spec), load_teachers(str(out), spec)
    torch.testing.assert_close(found.probabilities(x), lost.probabilities(x), atol=1e-5, rtol=1e-4)


def test_a_file_with_shift_averaging_is_rebuilt_with_the_same_views(bundled, tiny_npz, tmp_path):
    """The parity check against the file runs the rebuilt network through the file's own test-time augmentation."""
    best, _ = bundled
    shifted = tmp_path / "models" / "vgg_shift.onnx"
    assert export_checkpoint(ExportConfig(checkpoint=str(best), out=str(shifted), data=str(tiny_npz), parity_faces=256,
                                          flip_tta=True, shift_tta=1, shift_pattern="cross",
                                          model_id="vgg_shift")).passed  # fmt: skip
    out = tmp_path / "again" / "best.pt"
    parity = recover(shifted, out, tiny_npz)
    assert parity.passed and parity.argmax_agreement == 1.0
    assert load_model(out)[2]["recovered_from"]["test_time_augmentation"] == "flip+shift_cross_1"


def test_a_file_exported_again_from_the_rebuilt_checkpoint_keeps_the_card_s_training_record(bundled, tiny_npz,
                                                                                             tmp_path):  # fmt: skip
    """The run folder is gone, but its record is in the card: recovering carries it, so a second export (another
    test-time augmentation, say) still says which command, recipe and epochs trained its weights."""
    _, onnx_path = bundled
    rebuilt = tmp_path / "again" / "best.pt"
    assert recover(onnx_path, rebuilt, tiny_npz).passed
    again = tmp_path / "models" / "vgg_again.onnx"
    assert export_checkpoint(ExportConfig(checkpoint=str(rebuilt), out=str(again), data=str(tiny_npz),
                                          parity_faces=256, flip_tta=True, model_id="vgg_again")).passed  # fmt: skip
    first = json.loads(onnx_path.with_suffix(".card.json").read_text())["training"]
    second = json.loads(again.with_suffix(".card.json").read_text())["training"]
    assert first["history"] and first["best"] and first["config"]  # a record to keep
    for key in ("command", "recipe", "config", "best", "epochs_run", "seconds_per_epoch_median", "history", "run"):
        assert second.get(key) == first.get(key), key
    assert (
        second["epochs_run"] == len(first["history"]) == second["best"]["epoch"]
    )  # the history ends at the kept epoch


def test_a_card_that_does_not_describe_the_file_is_refused_and_nothing_is_written(bundled, tiny_npz, tmp_path):
    _, onnx_path = bundled
    copy = tmp_path / "vgg_tiny.onnx"
    copy.write_bytes(onnx_path.read_bytes())
    card = json.loads(onnx_path.with_suffix(".card.json").read_text())

    card["training"]["config"]["model_kwargs"]["width"] = 8  # another network: shapes differ
    copy.with_suffix(".card.json").write_text(json.dumps(card))
    with pytest.raises(RecoveryError, match="the file holds"):
        recover_checkpoint(copy, tiny_npz)
    assert main(["recover", str(copy), "--out", str(tmp_path / "a.pt"), "--data", str(tiny_npz)]) == 2

    card["training"]["config"]["model_kwargs"]["width"] = 4
    card["training"]["config"]["augment"]["crop"] = 0  # the right weights, served on the whole face: other logits
    copy.with_suffix(".card.json").write_text(json.dumps(card))
    assert main(["recover", str(copy), "--out", str(tmp_path / "b.pt"), "--data", str(tiny_npz)]) == 1
    assert not (tmp_path / "a.pt").exists() and not (tmp_path / "b.pt").exists()


def test_the_command_writes_the_checkpoint_and_says_how_close_it_is(bundled, tiny_npz, tmp_path, capsys):
    _, onnx_path = bundled
    out = tmp_path / "runs" / "vgg" / "best.pt"
    assert main(["recover", str(onnx_path), "--out", str(out), "--data", str(tiny_npz)]) == 0  # the 105 val faces
    assert out.is_file() and "top label the same on all 105 real and 32 random inputs" in capsys.readouterr().out
