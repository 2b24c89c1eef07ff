"""The accuracy recipe (issue 14): the validation split carved from Training, the new augmentations,
weight EMA, SGD, distillation, and exact resume of a run that uses all of them."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from mien.training.data import FaceDataset, carve_validation, load_dataset
from mien.training.distill import distillation_loss, load_teachers, soften
from mien.training.run_data import load_labelled
from mien.training.train import TrainConfig, train
from mien.training.transforms import AugmentConfig, mix_batch, random_affine, random_erasing
from tests.conftest import SHARED_DATA, train_interrupted

STRONG = {"flip": True, "rotation_deg": 10.0, "shift": 0.1, "zoom": 0.1, "crop": 40, "erasing": 0.5, "mixup": 0.2,
          "cutmix": 0.5}  # fmt: skip


def _strong_cfg(data, out, **kw) -> TrainConfig:
    base = dict(data=str(data), out=str(out), model="vgg_fer", model_kwargs={"width": 8, "hidden": 16}, epochs=4,
                batch_size=32, lr=0.05, optimizer="sgd", weight_decay=5e-4, warmup_epochs=1, ema=0.9, threads=1,
                augment=AugmentConfig(**STRONG))  # fmt: skip
    return TrainConfig(**{**base, **kw})


def _synthetic(n_per_class=(50, 7, 30, 90, 40, 20, 60)) -> FaceDataset:
    labels = np.repeat(np.arange(7), n_per_class)
    split = np.where(np.arange(len(labels)) % 5 == 0, "public_test", "train")
    return FaceDataset(np.zeros((len(labels), 4, 4), np.uint8), labels, split)


def test_validation_split_is_stratified_disjoint_and_the_same_every_run():
    data = _synthetic()
    carved = carve_validation(data, 0.1, seed=2013)
    val, fit = carved.split == "val", carved.split == "train"
    assert not (val & fit).any() and val.any()
    assert (carved.split[data.split == "public_test"] == "public_test").all()  # PublicTest untouched
    assert set(np.flatnonzero(val)) <= set(np.flatnonzero(data.split == "train"))
    for label in range(7):
        pool = (data.split == "train") & (data.labels == label)
        assert (val & (data.labels == label)).sum() == round(0.1 * pool.sum())
    assert (carve_validation(data, 0.1, seed=2013).split == carved.split).all()
    assert (carve_validation(data, 0.1, seed=7).split != carved.split).any()


@pytest.mark.skipif(not SHARED_DATA.is_file(), reason=f"FER2013 not at {SHARED_DATA}")
def test_fer2013_validation_split_holds_a_tenth_of_each_class_of_training():
    data, _ = load_labelled(TrainConfig(data=str(SHARED_DATA)))
    raw = load_dataset(SHARED_DATA)
    counts = {s: np.bincount(data.labels[data.split == s], minlength=7) for s in ("train", "val", "public_test")}
    assert counts["train"].sum() + counts["val"].sum() == (raw.split == "train").sum() == 28_709
    assert counts["val"].sum() == 2872 and (counts["public_test"] == [467, 56, 496, 895, 653, 415, 607]).all()
    np.testing.assert_allclose(counts["val"] / (counts["val"] + counts["train"]), 0.1, atol=0.01)


def test_crop_keeps_the_scale_and_erasing_and_mixing_do_what_they_say():
    gen = torch.Generator().manual_seed(0)
    x = torch.arange(48.0).repeat(48, 1)[None, None].repeat(4, 1, 1, 1)  # column index as the pixel value
    crop = random_affine(x, AugmentConfig(flip=False, rotation_deg=0, shift=0, zoom=0, crop=40), gen)
    assert crop.shape == (4, 1, 40, 40)
    torch.testing.assert_close(crop[0, 0, 0], torch.arange(4.0, 44.0))  # the centre window, pixel for pixel

    y = torch.zeros(64, 1, 40, 40)
    assert torch.equal(random_erasing(y, 0.0, gen), y)
    erased = random_erasing(y, 1.0, gen)
    changed = (erased != 0).flatten(1).float().mean(1)
    assert (changed > 0).all() and (changed <= 0.25 + 0.02).all()

    same, _, lam = mix_batch(y, AugmentConfig(), gen)
    assert same is y and lam == 1.0
    images = torch.stack([torch.full((1, 8, 8), float(i)) for i in range(16)])
    mixed, order, lam = mix_batch(images, AugmentConfig(mixup=0.4), gen)
    assert 0 <= lam <= 1
    torch.testing.assert_close(mixed, lam * images + (1 - lam) * images[order])
    cut, order, lam = mix_batch(images, AugmentConfig(cutmix=1.0), gen)
    from_self = (cut == images).flatten(1).float().mean(1)
    from_partner = (cut == images[order]).flatten(1).float().mean(1)
    moved = order != torch.arange(16)
    torch.testing.assert_close(from_self[moved], torch.full((int(moved.sum()),), lam))
    assert torch.all(from_self[moved] + from_partner[moved] == 1)


def test_two_half_runs_equal_one_full_run_with_the_whole_recipe(tmp_path, tiny_npz, monkeypatch):
    straight = tmp_path / "straight"
    train(_strong_cfg(tiny_npz, straight))
    halves = tmp_path / "halves"
    train_interrupted(_strong_cfg(tiny_npz, halves), 2, monkeypatch)
    train(_strong_cfg(tiny_npz, halves))

    a, b = (torch.load(run / "last.pt", weights_only=False) for run in (straight, halves))
    assert [h["epoch"] for h in b["history"]] == [1, 2, 3, 4]
    for part in ("state_dict",):
        for key, tensor in a[part].items():
            torch.testing.assert_close(tensor, b[part][key], rtol=0, atol=0, msg=key)
    for key, tensor in a["ema"].items():
        torch.testing.assert_close(tensor, b["ema"][key], rtol=0, atol=0, msg=f"ema {key}")
    best_a, best_b = (torch.load(run / "best.pt", weights_only=False) for run in (straight, halves))
    assert best_a["metrics"] == best_b["metrics"] and best_a["metrics"]["split"] == "val"
    # best.pt serves the EMA weights, validated on the carved split
    history = [json.loads(line) for line in (straight / "history.jsonl").read_text().splitlines()]
    assert best_a["metrics"]["val_acc"] == max(h["val_acc"] for h in history)
    ema_state = {k.removeprefix("module."): v for k, v in a["ema"].items() if k.startswith("module.")}
    if best_a["metrics"]["epoch"] == 4:
        for key, tensor in best_a["state_dict"].items():
            torch.testing.assert_close(tensor, ema_state[key], rtol=0, atol=0)
    assert history[-1]["val_acc"] > 0.5  # chance is 1/7 on the tiny data


def test_a_run_stopped_in_the_middle_of_an_epoch_resumes_from_its_last_mid_epoch_checkpoint_exactly(
    tmp_path, tiny_npz, monkeypatch
):
    """last.pt written every checkpoint_minutes inside an epoch: a run killed two steps after such a write loses
    only those two steps, and the rerun command ends bit for bit where an uninterrupted run (which writes no
    mid-epoch checkpoint) ends, with the same history, EMA, optimiser and RNG states."""
    from mien.training.run_folder import RunFolder

    straight = tmp_path / "straight"
    train(_strong_cfg(tiny_npz, straight, checkpoint_minutes=0.0))

    stopped = tmp_path / "stopped"
    real_write = RunFolder.write_position
    written = []

    def write_then_die(self, progress, step, position):  # asked after every step; writes in epoch 2 after batch 3
        if position.epoch == 2 and position.done == 3:
            real_write(self, progress, step, position)
            written.append(step)
        if position.epoch == 2 and position.done == 5:
            raise KeyboardInterrupt  # a lost session: steps 4 and 5 of epoch 2 are gone

    monkeypatch.setattr(RunFolder, "write_position", write_then_die)
    with pytest.raises(KeyboardInterrupt):
        train(_strong_cfg(tiny_npz, stopped, checkpoint_minutes=1e-9))
    monkeypatch.setattr(RunFolder, "write_position", real_write)
    saved = torch.load(stopped / "last.pt", weights_only=False)
    assert saved["epoch_position"]["epoch"] == 2 and saved["epoch_position"]["done"] == 3
    assert saved["step"] == written[0] and [h["epoch"] for h in saved["history"]] == [1]

    train(_strong_cfg(tiny_npz, stopped, checkpoint_minutes=1e-9))
    assert "resuming from" in (log := (stopped / "train.log").read_text()) and "after 3 of its batches" in log
    a, b = (torch.load(run / "last.pt", weights_only=False) for run in (straight, stopped))
    assert "epoch_position" not in b  # the last write was the end of the last epoch
    for part in ("state_dict", "ema"):
        for key, tensor in a[part].items():
            torch.testing.assert_close(tensor, b[part][key], rtol=0, atol=0, msg=f"{part} {key}")
    assert a["step"] == b["step"]
    assert torch.equal(a["generator"], b["generator"]) and torch.equal(a["torch_rng"], b["torch_rng"])
    for key, tensor in a["optimizer"]["state"][0].items():
        torch.testing.assert_close(tensor, b["optimizer"]["state"][0][key], rtol=0, atol=0, msg=key)
    rows = [
        [json.loads(line) for line in (run / "history.jsonl").read_text().splitlines()] for run in (straight, stopped)
    ]
    figures = ("epoch", "train_loss", "train_acc", "val_loss", "val_acc", "lr")
    assert [[r[k] for k in figures] for r in rows[0]] == [[r[k] for k in figures] for r in rows[1]]
    assert all(r["seconds"] > 0 and r["cpu_seconds"] > 0 for r in rows[1])


def _sigterm_at_step(monkeypatch, step: int) -> None:
    """The process sends itself SIGTERM in the middle of training step number ``step`` (1 = the first of the run),
    as a scheduler's preemption or a container's end would."""
    import os
    import signal

    from mien.training.objectives import CrossEntropy

    real, calls = CrossEntropy.train_step, []

    def stepped(self, *args, **kwargs):
        calls.append(1)
        if len(calls) == step:
            os.kill(os.getpid(), signal.SIGTERM)
        return real(self, *args, **kwargs)

    monkeypatch.setattr(CrossEntropy, "train_step", stepped)


@pytest.mark.parametrize("minutes", [10.0, 0.0], ids=["mid-epoch writes on", "mid-epoch writes off"])
def test_a_sigterm_ends_the_step_under_way_writes_last_pt_and_the_rerun_ends_where_an_uninterrupted_run_does(
    tmp_path, tiny_npz, monkeypatch, minutes
):
    """A SIGTERM no longer throws away the steps since the last checkpoint: the step under way finishes, last.pt is
    written at that step (even when mid-epoch checkpoints are off) and the run stops; the same command resumes it
    and ends bit for bit where a run never stopped ends."""
    import signal

    from mien.training.train import Stopped

    straight = tmp_path / "straight"
    train(_strong_cfg(tiny_npz, straight, checkpoint_minutes=0.0))
    steps_per_epoch = torch.load(straight / "last.pt", weights_only=False)["step"] // 4

    stopped = tmp_path / "stopped"
    _sigterm_at_step(monkeypatch, steps_per_epoch + 2)  # the second step of epoch 2
    before = signal.getsignal(signal.SIGTERM)  # the default, or what a library of this process set (ray.init does)
    with pytest.raises(Stopped, match="stopped by SIGTERM after 2 batches of epoch 2") as info:
        train(_strong_cfg(tiny_npz, stopped, checkpoint_minutes=minutes))
    assert info.value.signum == signal.SIGTERM
    assert signal.getsignal(signal.SIGTERM) is before  # the process's own handler is back once the run has stopped
    saved = torch.load(stopped / "last.pt", weights_only=False)
    assert saved["step"] == steps_per_epoch + 2 and saved["epoch_position"]["done"] == 2
    assert [h["epoch"] for h in saved["history"]] == [1]

    monkeypatch.undo()
    train(_strong_cfg(tiny_npz, stopped, checkpoint_minutes=minutes))
    a, b = (torch.load(run / "last.pt", weights_only=False) for run in (straight, stopped))
    for part in ("state_dict", "ema"):
        for key, tensor in a[part].items():
            torch.testing.assert_close(tensor, b[part][key], rtol=0, atol=0, msg=f"{part} {key}")
    assert a["step"] == b["step"] and torch.equal(a["generator"], b["generator"])


def test_mien_train_stopped_by_sigterm_says_how_to_resume_and_exits_as_the_signal_would(
    tmp_path, tiny_npz, monkeypatch, capsys
):
    from mien.cli import main

    _sigterm_at_step(monkeypatch, 3)
    out = tmp_path / "run"
    args = ["train", "--model", "mini_xception", "--data", str(tiny_npz), "--out", str(out), "--epochs", "2",
            "--batch-size", "32", "--threads", "1"]  # fmt: skip
    assert main(args) == 128 + 15
    err = capsys.readouterr().err
    assert "stopped by SIGTERM after 3 batches of epoch 1" in err and "rerun the same command to resume" in err
    assert torch.load(out / "last.pt", weights_only=False)["epoch_position"]["done"] == 3
    monkeypatch.undo()
    assert main(args) == 0  # the rerun resumes and finishes
    assert "after 3 of its batches" in (out / "train.log").read_text()


def test_without_checkpoint_minutes_last_pt_is_written_only_at_the_end_of_an_epoch(tmp_path, tiny_npz, monkeypatch):
    from mien.training.run_folder import RunFolder

    def never(*args):
        raise AssertionError("a mid-epoch last.pt with checkpoint_minutes = 0")

    monkeypatch.setattr(RunFolder, "write_position", never)
    train(_strong_cfg(tiny_npz, tmp_path / "run", checkpoint_minutes=0.0, epochs=1))
    assert "epoch_position" not in torch.load(tmp_path / "run" / "last.pt", weights_only=False)


@pytest.mark.parametrize("minutes", [-1.0, float("nan")])
def test_a_negative_or_nan_checkpoint_interval_is_refused_before_training(tmp_path, tiny_npz, minutes):
    with pytest.raises(ValueError, match="--checkpoint-minutes"):
        train(_strong_cfg(tiny_npz, tmp_path / "run", checkpoint_minutes=minutes))
    assert not (tmp_path / "run" / "last.pt").exists()


def test_distillation_with_zero_weight_is_cross_entropy():
    logits, targets = torch.randn(8, 7), torch.softmax(torch.randn(8, 7), 1)
    hard = F.cross_entropy(logits, torch.arange(8) % 7)
    assert distillation_loss(logits, hard, targets, 4.0, 0.0) is hard
    full = distillation_loss(logits, hard, targets, 2.0, 1.0)
    expected = 4.0 * F.kl_div(F.log_softmax(logits / 2, 1), targets, reduction="batchmean")
    torch.testing.assert_close(full, expected)


def test_soften_is_softmax_of_the_logits_over_t():
    z = torch.randn(5, 7) * 3
    torch.testing.assert_close(soften(torch.softmax(z, 1), 3.0), torch.softmax(z / 3.0, 1), atol=1e-6, rtol=0)


def test_student_learns_the_teachers_answers_and_teachers_stay_frozen(tmp_path, tiny_npz, tiny_run):
    teacher_path = tiny_run / "best.pt"
    before = torch.load(teacher_path, weights_only=False)["state_dict"]
    student = tmp_path / "student"
    # Hard labels play no part (α = 1): whatever the student learns comes from the teacher.
    train(TrainConfig(data=str(tiny_npz), out=str(student), epochs=3, batch_size=32, lr=2e-3, warmup_epochs=1,
                      threads=1, teacher=str(teacher_path), distill_weight=1.0, distill_temperature=2.0))  # fmt: skip
    after = torch.load(teacher_path, weights_only=False)["state_dict"]
    for key, tensor in before.items():
        assert torch.equal(tensor, after[key]), key

    from mien.training.checkpoint import load_model
    from mien.training.transforms import build_transforms

    teacher, spec, _ = load_model(teacher_path)
    learner, _, _ = load_model(student / "best.pt")
    data = load_dataset(tiny_npz)
    x = build_transforms(spec, train=False)(torch.from_numpy(data.subset("public_test")[0]))
    with torch.no_grad():
        agree = (teacher(x).argmax(1) == learner(x).argmax(1)).float().mean().item()
    assert agree > 0.8


def test_a_checkpoint_teacher_in_the_runs_layout_and_bf16_answers_like_the_fp32_one(tiny_run):
    from mien.training.models import default_spec

    spec = default_spec("mini_xception")
    (plain,) = load_teachers(str(tiny_run / "best.pt"), spec)
    (fast,) = load_teachers(str(tiny_run / "best.pt"), spec, channels_last=True)
    convs = [w for w in fast.model.parameters() if w.dim() == 4 and w.shape[1] > 1 and w.shape[-1] > 1]
    assert convs and all(w.is_contiguous(memory_format=torch.channels_last) for w in convs)
    assert not all(w.is_contiguous(memory_format=torch.channels_last) for w in plain.model.parameters() if w.dim() == 4
                   and w.shape[1] > 1 and w.shape[-1] > 1)  # fmt: skip
    x = torch.randn(64, 1, 48, 48, generator=torch.Generator().manual_seed(0))
    reference = plain.probabilities(x)
    torch.testing.assert_close(fast.probabilities(x), reference, atol=1e-5, rtol=1e-4)  # layout changes nothing
    with torch.autocast("cpu", dtype=torch.bfloat16):
        low = fast.probabilities(x)
    assert low.dtype == torch.float32 and torch.allclose(low.sum(1), torch.ones(64), atol=1e-5)
    assert (low - reference).abs().max() < 0.05  # bf16 moves probabilities by little
    assert (low.argmax(1) == reference.argmax(1)).float().mean() >= 0.9


def test_a_teacher_that_reads_faces_differently_is_refused(tiny_run):
    from dataclasses import replace

    from mien.training.models import default_spec

    rgb = replace(default_spec("mini_xception"), channels=3, mean=(0.5,) * 3, std=(0.5,) * 3)
    with pytest.raises(ValueError, match="reads faces differently.*channels"):
        load_teachers(str(tiny_run / "best.pt"), rgb)
    with pytest.raises(FileNotFoundError, match="no such file"):
        load_teachers("nowhere/best.pt", default_spec("mini_xception"))


def test_every_teacher_of_a_list_may_start_with_a_tilde(tiny_run, monkeypatch):
    from mien.training.models import default_spec

    monkeypatch.setenv("HOME", str(tiny_run.parent))  # a shell expands only the first "~" of "~/a.pt,~/b.pt"
    named = f"~/{tiny_run.name}/best.pt"
    teachers = load_teachers(f"{named},{named}", default_spec("mini_xception"))
    assert len(teachers) == 2


def test_evaluation_scores_the_same_val_faces_that_training_held_out(tiny_npz):
    from mien.export.evaluate import eval_split

    data, _ = load_labelled(TrainConfig(data=str(tiny_npz)))
    faces = eval_split(tiny_npz, "val", tuple(data.label_names))
    held_out, truth = data.subset("val")
    assert np.array_equal(faces.images, held_out) and np.array_equal(faces.truth, truth)


def test_relabelling_keeps_the_same_faces_out_of_training(tiny_npz):
    full, _ = load_labelled(TrainConfig(data=str(tiny_npz)))
    five, _ = load_labelled(TrainConfig(data=str(tiny_npz), labels=("angry", "sad", "happy", "fear", "neutral")))
    merged, _ = load_labelled(TrainConfig(data=str(tiny_npz), label_map={"surprise": "happy"}))
    val_full = {full.images[i].tobytes() for i in np.flatnonzero(full.split == "val")}
    for data in (five, merged):
        val = {data.images[i].tobytes() for i in np.flatnonzero(data.split == "val")}
        fit = {data.images[i].tobytes() for i in np.flatnonzero(data.split == "train")}
        assert val and val <= val_full and not (fit & val_full)


def test_a_network_trained_on_crops_is_validated_and_served_on_the_centre_window(tmp_path, tiny_npz):
    from mien.training.checkpoint import load_model
    from mien.training.layers import CenterCrop
    from mien.training.objectives import predict_logits
    from mien.training.transforms import build_transforms

    out = tmp_path / "crops"
    train(_strong_cfg(tiny_npz, out, epochs=1, augment=AugmentConfig(crop=40)))
    served, spec, ckpt = load_model(out / "best.pt")
    assert isinstance(served, CenterCrop) and served.size == 40
    x = torch.randn(2, 1, 48, 48)
    with torch.no_grad():
        torch.testing.assert_close(served(x), served.model(x[..., 4:44, 4:44]))
        torch.testing.assert_close(served(x[..., 4:44, 4:44]), served.model(x[..., 4:44, 4:44]))  # ten-crop views
    data, _ = load_labelled(TrainConfig(data=str(tiny_npz)))
    images, labels = (torch.from_numpy(a) for a in data.subset("val"))
    logits = predict_logits(served, images, build_transforms(spec, train=False))
    assert ckpt["metrics"]["val_acc"] == pytest.approx((logits.argmax(1) == labels).float().mean().item())
