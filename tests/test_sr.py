"""Issue 17's SR front end: EDSR (no batch norm, L1, pixel shuffle), pre-trained on the training faces only,
resumable, scored against bicubic with PSNR and SSIM, exported and read back, and fine-tuned jointly for the last
epochs. Tiny data and a few steps only."""

from __future__ import annotations

import json
from dataclasses import replace

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from mien.cli import main
from mien.spec import FER2013_LABELS
from mien.training.config import SRPretrainConfig, TrainConfig
from mien.training.data import load_dataset
from mien.training.layers import EDSR, EDSR_PAPER
from mien.training.models import create_model, default_spec
from mien.training.objectives import CrossEntropy
from mien.training.run_data import load_splits
from mien.training.sr_eval import evaluate_sr, format_sr_evaluation, psnr, ssim, to_grey_levels
from mien.training.sr_pretrain import l1_step, pretrain_sr, resolve_sr_kwargs, resume_path, sr_faces, sr_l1
from mien.training.train import build_model, train
from mien.training.transforms import normalize
from tests.conftest import train_interrupted, write_npz

SMALL = {"widths": (8, 16, 16, 32), "hidden": 16}


@pytest.fixture(scope="module")
def small_npz(tmp_path_factory):
    return write_npz(tmp_path_factory.mktemp("stn_sr") / "small.npz", train_per_class=10, test_per_class=3)


def _faces(npz, split: str = "train", n: int = 32) -> torch.Tensor:
    return torch.from_numpy(load_dataset(npz).subset(split)[0][:n])


# --- the SR front end: EDSR, L1 step, PSNR/SSIM against bicubic ---------------------------------------------------


def test_edsr_is_the_papers_network_without_batch_norm_and_doubles_the_size():
    sr = EDSR(1, num_blocks=2, features=8)
    assert not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in sr.modules())
    assert any(isinstance(m, nn.PixelShuffle) and m.upscale_factor == 2 for m in sr.modules())
    assert len(sr.body) == 3  # B residual blocks and the body's closing convolution
    with torch.no_grad():
        assert sr(torch.zeros(3, 1, 24, 24)).shape == (3, 1, 48, 48)  # pre-training: 24 → 48
        assert sr(torch.zeros(2, 1, 48, 48)).shape == (2, 1, 96, 96)  # in front of the classifier: 48 → 96
    paper = EDSR(1, **EDSR_PAPER)
    assert (paper.kwargs["num_blocks"], paper.kwargs["features"], paper.kwargs["res_scale"]) == (16, 128, 0.1)
    with torch.no_grad():
        assert create_model("sr_cnn", **SMALL, sr_kwargs={"num_blocks": 1, "features": 8}).front(
            torch.zeros(1, 1, 48, 48)
        ).shape == (1, 1, 96, 96)


def test_one_l1_pretraining_step_lowers_the_l1_of_its_batch(small_npz):
    torch.manual_seed(0)
    sr = EDSR(1, num_blocks=1, features=8)
    hr = normalize(_faces(small_npz), default_spec("sr_cnn"))
    optimizer = torch.optim.Adam(sr.parameters(), lr=1e-3)
    from mien.training.sr_pretrain import downscale

    before = l1_step(sr, optimizer, hr)
    with torch.no_grad():
        after = F.l1_loss(sr(downscale(hr)), hr).item()
    assert after < before


def test_a_bf16_l1_step_lowers_the_fp32_l1_of_its_batch(small_npz):
    """--amp bf16 runs the network in bf16 and steps the fp32 weights: the fp32 loss still falls."""
    from mien.training.sr_pretrain import downscale

    torch.manual_seed(0)
    sr = EDSR(1, num_blocks=1, features=8).to(memory_format=torch.channels_last)
    hr = normalize(_faces(small_npz), default_spec("sr_cnn")).contiguous(memory_format=torch.channels_last)
    optimizer = torch.optim.Adam(sr.parameters(), lr=1e-3)
    with torch.no_grad():
        fp32_before = F.l1_loss(sr(downscale(hr)), hr).item()
    bf16_before = l1_step(sr, optimizer, hr, "bf16")
    assert bf16_before == pytest.approx(fp32_before, abs=0.02)  # the bf16 forward is the fp32 one, rounded
    assert all(p.dtype == torch.float32 for p in sr.parameters())
    with torch.no_grad():
        assert F.l1_loss(sr(downscale(hr)), hr).item() < fp32_before


def test_a_channels_last_bf16_pretraining_writes_an_fp32_network_that_loads_anywhere(tmp_path, small_npz):
    """Issue 17's pre-training runs channels-last in bf16: the checkpoint is an ordinary fp32 state dict that an
    NCHW EDSR loads and that reproduces the val L1 the run recorded (validation runs fp32)."""
    out = tmp_path / "sr.pt"
    cfg = SRPretrainConfig(data=str(small_npz), out=str(out), sr_kwargs={"num_blocks": 1, "features": 8}, epochs=2,
                           batch_size=16, threads=1, channels_last=True, amp="bf16")  # fmt: skip
    metrics = pretrain_sr(cfg)
    ckpt = torch.load(out, weights_only=False)
    assert ckpt["config"]["amp"] == "bf16" and ckpt["config"]["channels_last"] is True
    assert all(t.dtype == torch.float32 for t in ckpt["state_dict"].values())
    sr = EDSR(1, **ckpt["sr_kwargs"])
    sr.load_state_dict(ckpt["state_dict"])
    val_faces = sr_faces(cfg)[1]
    val_l1, bicubic_l1 = sr_l1(sr, normalize(torch.from_numpy(val_faces), default_spec("sr_cnn")))
    assert val_l1 == pytest.approx(metrics["val_l1"], rel=1e-4)
    assert bicubic_l1 == pytest.approx(metrics["bicubic_l1"], rel=1e-6)
    with pytest.raises(ValueError, match="other options.*amp"):  # a resumed run keeps its precision
        pretrain_sr(replace(cfg, amp="none", epochs=3))


def _keys(faces) -> set[bytes]:
    return {np.asarray(f, dtype=np.uint8).tobytes() for f in faces}


def test_sr_pretraining_learns_only_from_the_training_faces_mien_train_fits(tmp_path, small_npz, monkeypatch):
    """Issue 14's protocol: with --val-split val (the default) the SR net's steps see only the faces mien train
    fits on (Training less the carved val faces, the same carve), never a val or PublicTest face."""
    import mien.training.sr_pretrain as sr_pretrain

    cfg = SRPretrainConfig(data=str(small_npz), out=str(tmp_path / "sr.pt"), sr_kwargs={"num_blocks": 1, "features": 8},
                           epochs=2, batch_size=9, threads=1)  # fmt: skip
    assert cfg.val_split == "val"
    classifier = load_splits(TrainConfig(data=str(small_npz)))  # what mien train fits and selects on
    fit, held = sr_faces(cfg)
    np.testing.assert_array_equal(fit, classifier.train_x.numpy())
    np.testing.assert_array_equal(held, classifier.val_x.numpy())
    public = _faces(small_npz, "public_test", 10**6).numpy()
    train_keys = _keys(fit) | _keys(fit[..., ::-1])  # pre-training mirrors half its faces
    assert not train_keys & (_keys(held) | _keys(public))  # the generated faces are all distinct

    seen = []
    real_step = sr_pretrain.l1_step

    def recording_step(sr, optimizer, hr, *rest):
        seen.extend(to_grey_levels(hr, default_spec("sr_cnn")))
        return real_step(sr, optimizer, hr, *rest)

    monkeypatch.setattr(sr_pretrain, "l1_step", recording_step)
    metrics = pretrain_sr(cfg)
    assert len(seen) == 2 * (len(fit) // 9) * 9
    assert _keys(seen) <= train_keys and not _keys(seen) & (_keys(held) | _keys(public))
    assert len(_keys(seen) - _keys(fit)) > 0  # some were mirrored, and still training faces
    # the history beside the checkpoint says so, epoch by epoch
    report = json.loads((tmp_path / "sr.json").read_text())
    assert (report["train_split"], report["train_faces"], report["val_split"], report["val_faces"]) == (
        "train", len(fit), "val", len(held)
    )  # fmt: skip
    assert [row["epoch"] for row in report["history"]] == [1, 2] and metrics["split"] == "val"
    assert report["history"][-1]["val_l1"] == metrics["val_l1"]


def test_sr_pretraining_interrupted_and_rerun_ends_with_the_weights_of_one_whole_run(tmp_path, small_npz, monkeypatch):
    from mien.training import sr_pretrain

    def cfg(out, **over):
        options = {"sr_kwargs": {"num_blocks": 1, "features": 8}, "epochs": 3, "batch_size": 16, "threads": 1}
        return SRPretrainConfig(data=str(small_npz), out=str(out), **{**options, **over})

    whole = tmp_path / "whole" / "sr.pt"
    pretrain_sr(cfg(whole))
    assert len(torch.load(resume_path(whole), weights_only=False)["history"]) == 3  # kept beside the checkpoint

    # a lost session: killed in the middle of the second epoch (63 carved training faces: 3 steps an epoch)
    real_step, calls = sr_pretrain.l1_step, {"n": 0}

    def killed(*args):
        calls["n"] += 1
        if calls["n"] > 4:
            raise KeyboardInterrupt
        return real_step(*args)

    resumed = tmp_path / "resumed" / "sr.pt"
    monkeypatch.setattr(sr_pretrain, "l1_step", killed)
    with pytest.raises(KeyboardInterrupt):
        pretrain_sr(cfg(resumed))
    monkeypatch.setattr(sr_pretrain, "l1_step", real_step)
    assert not resumed.exists() and len(torch.load(resume_path(resumed), weights_only=False)["history"]) == 1
    with pytest.raises(ValueError, match="other options.*lr"):  # never mixed with a run of other options
        pretrain_sr(cfg(resumed, lr=0.01))
    metrics = pretrain_sr(cfg(resumed))

    a, b = torch.load(whole, weights_only=False), torch.load(resumed, weights_only=False)
    assert [row["epoch"] for row in b["history"]] == [1, 2, 3] and metrics["epoch"] == 3
    for key, tensor in a["state_dict"].items():
        torch.testing.assert_close(b["state_dict"][key], tensor, rtol=0, atol=0, msg=key)
    assert [row["val_l1"] for row in a["history"]] == [row["val_l1"] for row in b["history"]]
    assert [row["epoch"] for row in json.loads(resumed.with_suffix(".json").read_text())["history"]] == [1, 2, 3]
    # rerunning a finished run trains nothing more and rewrites the same checkpoint
    pretrain_sr(cfg(resumed))
    assert torch.load(resumed, weights_only=False)["history"] == b["history"]


def test_sr_pretraining_refuses_to_learn_from_a_test_or_the_validation_split(tmp_path, small_npz):
    for train_split, val_split in (("public_test", "val"), ("public_test", "train"), ("val", "val")):
        cfg = SRPretrainConfig(data=str(small_npz), out=str(tmp_path / "sr.pt"), train_split=train_split,
                               val_split=val_split)  # fmt: skip
        with pytest.raises(ValueError, match="Training faces only"):
            sr_faces(cfg)
    # a recipe written before val existed (--val-split public_test) still learns from all of Training
    fit, held = sr_faces(SRPretrainConfig(data=str(small_npz), val_split="public_test"))
    assert (len(fit), len(held)) == (70, 21)


def test_an_sr_checkpoint_can_be_named_from_the_home_folder(tmp_path, small_npz, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))
    pretrain_sr(SRPretrainConfig(data=str(small_npz), out=str(tmp_path / "runs" / "sr.pt"), epochs=1, batch_size=16,
                                 sr_kwargs={"num_blocks": 1, "features": 8}, threads=1))  # fmt: skip
    assert resolve_sr_kwargs({}, "~/runs/sr.pt")["sr_kwargs"]["num_blocks"] == 1  # as the ablation's recipes name it


def test_psnr_and_ssim_on_known_cases():
    rng = np.random.default_rng(0)
    faces = rng.integers(20, 200, size=(3, 48, 48)).astype(np.float64)
    assert np.isinf(psnr(faces, faces)).all()
    np.testing.assert_allclose(ssim(faces, faces), 1.0)
    for k in (1, 5, 20):
        np.testing.assert_allclose(psnr(faces, faces + k), 20 * np.log10(255 / k))
    noise = rng.normal(0, 1, faces.shape)
    scores = [ssim(faces, faces + sigma * noise) for sigma in (5, 20, 60)]
    assert (scores[0] < 1).all() and (scores[1] < scores[0]).all() and (scores[2] < scores[1]).all()


def test_sr_eval_scores_the_network_and_bicubic_on_the_same_faces(tmp_path, small_npz):
    out = tmp_path / "sr.pt"
    pretrain_sr(SRPretrainConfig(data=str(small_npz), out=str(out), sr_kwargs={"num_blocks": 1, "features": 8},
                                 epochs=1, batch_size=16, threads=1))  # fmt: skip
    report = evaluate_sr(out, small_npz, "public_test")
    assert report["faces"] == 21 and report["split"] == "public_test"
    # bicubic recomputed independently: grey levels, PSNR of each face, mean
    spec = default_spec("sr_cnn")
    hr = _faces(small_npz, "public_test", 21).numpy().astype(np.float64)
    small = F.interpolate(normalize(torch.from_numpy(hr.astype(np.uint8)), spec), scale_factor=0.5, mode="area")
    up = F.interpolate(small, size=(48, 48), mode="bicubic", align_corners=False)
    levels = ((up * 0.5 + 0.5) * 255).round().clamp(0, 255)[:, 0].numpy()
    assert report["psnr_db"]["bicubic"]["mean"] == pytest.approx(psnr(hr, levels).mean())
    margin = report["psnr_margin_db"]
    assert margin["mean"] == pytest.approx(report["psnr_db"]["sr"]["mean"] - report["psnr_db"]["bicubic"]["mean"])
    assert margin["ci95"][0] <= margin["mean"] <= margin["ci95"][1] and 0 <= margin["sr_better_share"] <= 1
    assert 0 < report["ssim"]["sr"]["mean"] <= 1 and 0 < report["ssim"]["bicubic"]["mean"] <= 1

    written = tmp_path / "eval.json"
    assert main(["sr-eval", str(out), "--data", str(small_npz), "--limit", "7", "--out", str(written)]) == 0
    saved = json.loads(written.read_text())
    assert saved["faces"] == 7 and set(saved["psnr_db"]) == {"sr", "bicubic"}
    assert main(["sr-eval", str(out), "--data", str(small_npz), "--limit", "7"]) == 0  # default: beside it
    assert (tmp_path / "sr.public_test.eval.json").is_file()
    # the validation faces carved from Training, which pre-training held out: the check before PublicTest
    assert evaluate_sr(out, small_npz, "val")["faces"] == 7


def test_sr_eval_leaves_blank_faces_out_and_says_how_many(tmp_path, small_npz):
    """A face of one grey level (PublicTest has one) comes back exactly from bicubic: its PSNR is infinite and would
    make every mean and margin inf or nan. It is left out of both methods' scores and counted."""
    out = tmp_path / "sr.pt"
    pretrain_sr(SRPretrainConfig(data=str(small_npz), out=str(out), sr_kwargs={"num_blocks": 1, "features": 8},
                                 epochs=1, batch_size=16, threads=1))  # fmt: skip
    arrays = dict(np.load(small_npz))
    test_rows = np.flatnonzero(arrays["split_names"][arrays["split"]] == "public_test")
    arrays["images"][test_rows[[0, 5]]] = 128  # two blank frames among the 21 PublicTest faces
    blanked = tmp_path / "blank.npz"
    np.savez(blanked, **arrays)
    report = evaluate_sr(out, blanked, "public_test")
    assert report["faces"] == 19 and report["blank_faces_left_out"] == 2
    for scores in (report["psnr_db"], report["ssim"]):
        assert all(np.isfinite(scores[m]["mean"]) for m in ("sr", "bicubic"))
    assert np.isfinite(report["psnr_margin_db"]["ci95"]).all()
    assert "2 blank faces (one grey level) left out" in format_sr_evaluation(report)
    assert evaluate_sr(out, small_npz, "public_test")["blank_faces_left_out"] == 0


def test_sr_eval_scores_the_front_end_an_sr_arm_trained_as_its_pretrained_start_is_scored(tmp_path, small_npz):
    from mien.training.models import create_model

    start = tmp_path / "sr.pt"
    pretrain_sr(SRPretrainConfig(data=str(small_npz), out=str(start), sr_kwargs={"num_blocks": 1, "features": 8},
                                 epochs=1, batch_size=16, threads=1))  # fmt: skip
    kwargs = {"widths": [4, 8, 8, 8], "hidden": 8, "sr_kwargs": {"num_blocks": 1, "features": 8}}
    arm = create_model("sr_cnn", **kwargs)
    arm.sr.load_state_dict(torch.load(start, weights_only=False)["state_dict"])
    checkpoint = tmp_path / "best.pt"
    torch.save({"model_id": "sr_cnn", "model_kwargs": kwargs, "spec": default_spec("sr_cnn").to_dict(),
                "state_dict": arm.state_dict()}, checkpoint)  # fmt: skip
    pretrained, inside = evaluate_sr(start, small_npz, "val"), evaluate_sr(checkpoint, small_npz, "val")
    assert inside["source"] == "mien train (sr_cnn)" and pretrained["source"] == "pretrain-sr"
    assert inside["sr_kwargs"] == {"num_blocks": 1, "features": 8}
    assert inside["psnr_db"] == pretrained["psnr_db"] and inside["ssim"] == pretrained["ssim"]  # the same weights
    with torch.no_grad():  # fine-tuning moved the weights: the score follows them
        for parameter in arm.sr.parameters():
            parameter.add_(0.05)
    torch.save({"model_id": "sr_cnn", "model_kwargs": kwargs, "spec": default_spec("sr_cnn").to_dict(),
                "state_dict": arm.state_dict()}, checkpoint)  # fmt: skip
    assert evaluate_sr(checkpoint, small_npz, "val")["psnr_db"]["sr"] != pretrained["psnr_db"]["sr"]
    base = tmp_path / "base.pt"
    torch.save({"model_id": "base_cnn", "model_kwargs": {"widths": [4, 8, 8, 8], "hidden": 8},
                "spec": default_spec("base_cnn").to_dict(),
                "state_dict": create_model("base_cnn", widths=[4, 8, 8, 8], hidden=8).state_dict()}, base)  # fmt: skip
    with pytest.raises(ValueError, match="no SR front end"):
        evaluate_sr(base, small_npz, "val")


def test_an_exported_sr_front_end_is_what_training_and_sr_eval_read_back_and_its_card_scores_it(tmp_path, small_npz):
    """`mien export sr.pt`: the EDSR as ONNX (dynamic size) in the repository's form; --sr-init and sr-eval read the
    file back to the checkpoint's exact weights, and the card holds the same PSNR/SSIM as scoring the checkpoint."""
    import onnxruntime as ort

    start = tmp_path / "sr.pt"
    pretrain_sr(SRPretrainConfig(data=str(small_npz), out=str(start), sr_kwargs={"num_blocks": 1, "features": 8},
                                 epochs=1, batch_size=16, threads=1))  # fmt: skip
    out = tmp_path / "frontends" / "edsr_x2.onnx"
    assert main(["export", str(start), "--out", str(out), "--data", str(small_npz)]) == 0
    card = json.loads(out.with_name("edsr_x2.card.json").read_text())
    assert card["kind"] == "sr_front_end" and card["sr_kwargs"]["num_blocks"] == 1
    assert card["parity"]["weights_read_back_equal"] and card["parity"]["max_abs_diff"] <= 1e-4
    assert card["training"]["run"]["epochs"] == 1 and card["training"]["val_split"] == "val"
    assert card["training"]["command"].startswith("mien pretrain-sr ")
    for split in ("val", "public_test"):
        direct = evaluate_sr(start, small_npz, split)
        assert card["evaluation"][split]["psnr_db"] == direct["psnr_db"], split
        assert card["evaluation"][split]["ssim"] == direct["ssim"], split
    assert evaluate_sr(out, small_npz, "val")["source"] == "exported pretrain-sr"

    session = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])  # any size, doubled
    assert session.run(None, {"low_res": np.zeros((3, 1, 10, 14), np.float32)})[0].shape == (3, 1, 20, 28)

    pretrained = torch.load(start, weights_only=False)["state_dict"]
    cfg = TrainConfig(data=str(small_npz), model="sr_cnn", model_kwargs={"widths": [4, 8, 8, 8], "hidden": 8},
                      sr_init=str(out), freeze_sr=True)  # fmt: skip
    model, *_ = build_model(cfg, FER2013_LABELS, torch.device("cpu"))
    for key, tensor in model.sr.state_dict().items():
        torch.testing.assert_close(tensor, pretrained[key], rtol=0, atol=0, msg=key)
    assert resolve_sr_kwargs({}, str(out))["sr_kwargs"]["features"] == 8

    classifier = tmp_path / "classifier.onnx"  # any other ONNX file is refused, and says what it is not
    torch.onnx.export(nn.Conv2d(1, 1, 3), (torch.zeros(1, 1, 8, 8),), str(classifier), dynamo=False)
    with pytest.raises(ValueError, match="not an exported SR front end"):
        resolve_sr_kwargs({}, str(classifier))


def test_sr_finetune_epochs_keeps_the_pretrained_front_end_fixed_until_the_last_epochs_and_resumes_exactly(
    tmp_path, small_npz, monkeypatch
):
    """Issue 17: pre-trained SR, the classifier trained behind it, SR fine-tuned jointly for the last epochs."""
    start = tmp_path / "sr.pt"
    pretrain_sr(SRPretrainConfig(data=str(small_npz), out=str(start), sr_kwargs={"num_blocks": 1, "features": 8},
                                 epochs=1, batch_size=16, threads=1))  # fmt: skip
    pretrained = torch.load(start, weights_only=False)["state_dict"]
    kwargs = {"widths": [4, 8, 8, 8], "hidden": 8}
    common = dict(data=str(small_npz), model="sr_cnn", model_kwargs=kwargs, epochs=3, batch_size=14,
                  warmup_epochs=1, threads=1, sr_init=str(start), sr_finetune_epochs=1, ema=0)  # fmt: skip
    seen = []  # per step: does the SR front end train?
    real_step = CrossEntropy.train_step

    def recording_step(self, model, optimizer, images, y):
        seen.append(all(p.requires_grad for p in model.sr.parameters()))
        return real_step(self, model, optimizer, images, y)

    monkeypatch.setattr(CrossEntropy, "train_step", recording_step)
    straight = tmp_path / "straight"
    train(TrainConfig(**common, out=str(straight)))
    per_epoch = len(seen) // 3
    assert seen == [False] * 2 * per_epoch + [True] * per_epoch
    rows = [json.loads(line) for line in (straight / "history.jsonl").read_text().splitlines()]
    assert [row["sr_trains"] for row in rows] == [False, False, True]

    def sr_weights(run, name="last.pt"):
        state = torch.load(run / name, weights_only=False)["state_dict"]
        return {k.removeprefix("sr."): v for k, v in state.items() if k.startswith("sr.")}

    halves = tmp_path / "halves"  # stopped after epoch 2: the front end is still the pre-trained one
    train_interrupted(TrainConfig(**common, out=str(halves)), 2, monkeypatch)
    for key, tensor in sr_weights(halves).items():
        torch.testing.assert_close(tensor, pretrained[key], rtol=0, atol=0, msg=key)
    train(TrainConfig(**common, out=str(halves)))  # resumed into the fine-tuning epoch, as the whole run
    a, b = torch.load(straight / "last.pt", weights_only=False), torch.load(halves / "last.pt", weights_only=False)
    for key, tensor in a["state_dict"].items():
        torch.testing.assert_close(tensor, b["state_dict"][key], rtol=0, atol=0, msg=key)
    assert any(not torch.equal(tensor, pretrained[key]) for key, tensor in sr_weights(straight).items())

    for bad, match in (({"sr_init": ""}, "needs --sr-init"), ({"freeze_sr": True}, "no --freeze-sr"),
                       ({"sr_finetune_epochs": -1}, "N >= 0")):  # fmt: skip
        with pytest.raises(ValueError, match=match):
            train(TrainConfig(**{**common, **bad}, out=str(tmp_path / "refused")))
