import json

import pytest
import torch

from mien.training.checkpoint import load_model
from mien.training.train import TrainConfig, train
from mien.training.transforms import AugmentConfig, build_transforms, random_affine
from tests.conftest import train_interrupted


def _cfg(data, out, **kw):
    return TrainConfig(data=str(data), out=str(out), epochs=3, batch_size=32, lr=2e-3, warmup_epochs=1, threads=1, **kw)


def test_run_folder_has_checkpoints_log_and_curves(tiny_run):
    for name in ("best.pt", "last.pt", "history.jsonl", "curves.png", "train.log"):
        assert (tiny_run / name).stat().st_size > 0, name
    history = [json.loads(line) for line in (tiny_run / "history.jsonl").read_text().splitlines()]
    assert [h["epoch"] for h in history] == [1, 2, 3]
    assert {"train_loss", "train_acc", "val_loss", "val_acc", "seconds"} <= set(history[0])
    assert "epoch 3/3" in (tiny_run / "train.log").read_text()


def test_it_learns_and_keeps_the_best_epoch(tiny_run):
    history = [json.loads(line) for line in (tiny_run / "history.jsonl").read_text().splitlines()]
    _, _, ckpt = load_model(tiny_run / "best.pt")
    best = max(history, key=lambda h: h["val_acc"])
    assert ckpt["metrics"]["epoch"] == best["epoch"]
    assert ckpt["metrics"]["val_acc"] == pytest.approx(best["val_acc"])
    assert best["val_acc"] > 0.5  # chance is 1/7 on the bar-pattern data
    assert ckpt["model_id"] == "mini_xception" and ckpt["spec"]["labels"][3] == "happy"


def test_same_seed_same_weights_and_resume_is_exact(tmp_path, tiny_npz, monkeypatch):
    straight = tmp_path / "straight"
    train(_cfg(tiny_npz, straight))

    # Interrupt a second run after two epochs, then rerun the same command: it must resume and end identical.
    resumed = tmp_path / "resumed"
    train_interrupted(_cfg(tiny_npz, resumed), 2, monkeypatch)
    assert len((resumed / "history.jsonl").read_text().splitlines()) == 2
    train(_cfg(tiny_npz, resumed))
    assert "resuming from" in (resumed / "train.log").read_text()

    a = torch.load(straight / "last.pt", weights_only=False)
    b = torch.load(resumed / "last.pt", weights_only=False)
    assert [h["epoch"] for h in b["history"]] == [1, 2, 3]
    for key, tensor in a["state_dict"].items():
        torch.testing.assert_close(tensor, b["state_dict"][key], rtol=0, atol=1e-6, msg=key)


def test_augmentation_changes_images_but_keeps_shape_and_range():
    from mien.training.models import default_spec

    spec = default_spec("mini_xception")
    images = torch.randint(0, 256, (16, 48, 48), dtype=torch.uint8)
    plain = build_transforms(spec, train=False)(images)
    augmented = build_transforms(spec, train=True, generator=torch.Generator().manual_seed(0))(images)
    assert plain.shape == augmented.shape == (16, 1, 48, 48)
    assert not torch.allclose(plain, augmented)
    assert plain.min() >= -1 and plain.max() <= 1 and augmented.min() >= -1 - 1e-5 and augmented.max() <= 1 + 1e-5


def test_affine_with_no_jitter_and_no_flip_is_identity():
    x = torch.rand(3, 1, 48, 48)
    out = random_affine(x, AugmentConfig(flip=False, rotation_deg=0, shift=0, zoom=0))
    torch.testing.assert_close(out, x, atol=1e-5, rtol=0)


def test_unknown_split_is_a_clear_error(tmp_path, tiny_npz):
    from mien.training.data import DataError

    with pytest.raises(DataError, match="no images in split 'nope'"):
        train(TrainConfig(data=str(tiny_npz), out=str(tmp_path), epochs=1, val_split="nope"))


def test_warm_start_copies_the_shared_classifier_and_keeps_new_front_ends(tmp_path):
    from mien.training.models import create_model
    from mien.training.train import warm_start

    kwargs = {"widths": (8, 16, 32, 64), "hidden": 16}
    base = create_model("base_cnn", **kwargs)
    torch.save({"state_dict": base.state_dict()}, tmp_path / "base.pt")
    target = create_model("stn_sr_cnn", **kwargs)
    stn_before = {k: v.clone() for k, v in target.state_dict().items() if k.startswith("stn.")}
    copied = warm_start(target, str(tmp_path / "base.pt"))
    assert copied and all(k.startswith("classifier.") for k in copied)
    state = target.state_dict()
    for key, value in base.state_dict().items():
        assert torch.equal(state[key], value), key
    for key, value in stn_before.items():  # the STN keeps its identity initialisation
        assert torch.equal(state[key], value), key
    torch.save({"state_dict": create_model("se_sepconv").state_dict()}, tmp_path / "other.pt")
    with pytest.raises(ValueError, match="no layer matches"):
        warm_start(create_model("base_cnn", **kwargs), str(tmp_path / "other.pt"))
