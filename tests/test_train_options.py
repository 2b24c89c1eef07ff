"""Learning-rate schedules, early stopping, gradient clipping, mixed precision and the channels-last guard."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest
import torch
import torch.nn as nn

import mien.training.hardware as hardware
import mien.training.train as train_module
from mien.machine import allocator
from mien.training.hardware import channels_last_hazards, use_channels_last
from mien.training.models import create_model, default_spec
from mien.training.objectives import CrossEntropy, StepContext
from mien.training.schedule import epochs_without_improvement, get_lr, plateau_scale
from mien.training.train import TrainConfig, eta_seconds, train
from tests.conftest import write_npz

SMALL = {"widths": [8, 16, 32, 64], "hidden": 16}


def _cfg(data, out, **kw) -> TrainConfig:
    base = dict(data=str(data), out=str(out), model="base_cnn", model_kwargs=SMALL, epochs=3, batch_size=32,
                warmup_epochs=1, threads=1, limit=128)  # fmt: skip
    return TrainConfig(**{**base, **kw})


def test_schedules_by_step():
    cfg = TrainConfig(lr=1.0, epochs=10, warmup_epochs=2)
    assert [get_lr(cfg, s, 10) for s in (0, 9, 19)] == pytest.approx([0.05, 0.5, 1.0])  # linear warm-up
    assert get_lr(cfg, 20, 10) == pytest.approx(1.0) and get_lr(cfg, 60, 10) == pytest.approx(0.5)  # cosine
    assert get_lr(cfg, 100, 10) == pytest.approx(0.0, abs=1e-12)
    step = replace(cfg, schedule="step", lr_step_epochs=3, lr_step_gamma=0.1)
    assert [get_lr(step, s, 10) for s in (20, 49, 50, 80)] == pytest.approx([1.0, 1.0, 0.1, 0.01])
    plateau = replace(cfg, schedule="plateau", plateau_patience=1, plateau_factor=0.5)
    assert get_lr(plateau, 30, 10, [0.5, 0.6, 0.6, 0.6]) == pytest.approx(0.5)
    with pytest.raises(ValueError, match="unknown learning-rate schedule"):
        get_lr(replace(cfg, schedule="linear"), 30, 10)


def test_plateau_and_early_stopping_read_the_history():
    assert plateau_scale([0.5, 0.6, 0.6, 0.6], patience=1, factor=0.5) == 0.5  # 2 epochs without a better one
    assert plateau_scale([0.5, 0.6, 0.6, 0.6, 0.6, 0.6], patience=1, factor=0.5) == 0.25
    assert plateau_scale([0.5, 0.6, 0.7], patience=0, factor=0.5) == 1.0
    assert epochs_without_improvement([0.5, 0.7, 0.6, 0.7]) == 2  # a tie is not an improvement
    assert epochs_without_improvement([]) == 0


def test_plateau_cuts_the_rate_and_early_stopping_ends_the_run(tmp_path, tiny_npz, monkeypatch):
    monkeypatch.setattr(CrossEntropy, "validate", lambda self, model, x, y: {"val_loss": 1.0, "val_acc": 0.5})
    best = train(_cfg(tiny_npz, tmp_path, epochs=10, warmup_epochs=0, schedule="plateau", plateau_patience=0,
                      plateau_factor=0.5, early_stop=2, lr=1e-3))  # fmt: skip
    history = [json.loads(line) for line in (tmp_path / "history.jsonl").read_text().splitlines()]
    assert [h["epoch"] for h in history] == [1, 2, 3] and best["epoch"] == 1
    assert [h["lr"] for h in history] == pytest.approx([1e-3, 1e-3, 5e-4])
    assert "early stop before epoch 4: no better val accuracy for 2 epochs" in (tmp_path / "train.log").read_text()


def _one_step(context: StepContext, model: nn.Module | None = None) -> tuple[nn.Module, torch.Tensor]:
    cfg = TrainConfig(model="base_cnn", channels_last=False)
    spec = default_spec("base_cnn")
    torch.manual_seed(0)
    model = model or create_model("base_cnn", **SMALL)
    objective = CrossEntropy(cfg, spec, model, torch.Generator().manual_seed(0))
    objective.set_context(context)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    images = torch.randint(0, 256, (16, 48, 48), dtype=torch.uint8)
    _, logits = objective.train_step(model, optimizer, images, torch.arange(16) % 7)
    return model, logits


def _grad_norm(model: nn.Module) -> float:
    return torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in model.parameters()])).item()


def test_gradient_clipping_bounds_the_global_norm():
    free, _ = _one_step(StepContext())
    clipped, _ = _one_step(StepContext(grad_clip=0.05))
    assert _grad_norm(free) > 0.05
    assert _grad_norm(clipped) == pytest.approx(0.05, rel=1e-4)


def test_bf16_autocast_runs_the_forward_in_bfloat16_on_cpu():
    dtypes = []
    model = create_model("base_cnn", **SMALL)
    model.register_forward_hook(lambda module, inputs, output: dtypes.append(output.dtype))
    _, logits = _one_step(StepContext(amp="bf16"), model)
    assert dtypes == [torch.bfloat16] and logits.dtype == torch.float32  # the loop gets fp32 logits back
    _one_step(StepContext(), model)
    assert dtypes[-1] == torch.float32


@pytest.mark.parametrize("native", [True, False], ids=["bf16 CPU", "fp32-only CPU"])
def test_amp_auto_trains_in_bf16_only_where_the_cpu_computes_it_and_says_so_in_every_epoch(
    tmp_path, tiny_npz, monkeypatch, native
):
    probes = ("_is_amx_tile_supported", "_is_avx512_bf16_supported")
    for probe in probes:  # the machine's answer replaced by the case's
        monkeypatch.setattr(torch.cpu, probe, lambda: native, raising=False)
    assert hardware.native_bf16(torch.device("cpu"))[0] is native
    assert hardware.resolve_amp("auto", torch.device("cpu")) == ("bf16" if native else "none")
    assert [hardware.resolve_amp(amp, torch.device("cpu")) for amp in ("none", "bf16")] == ["none", "bf16"]
    seen = []  # the precision each training step ran in
    step = CrossEntropy.train_step
    monkeypatch.setattr(CrossEntropy, "train_step", lambda self, *a, **k: seen.append(self.context.amp)
                        or step(self, *a, **k))  # fmt: skip
    out = tmp_path / "auto"
    train(_cfg(tiny_npz, out, epochs=2, amp="auto"))
    assert set(seen) == {"bf16" if native else "none"} and len(seen) == 2 * 128 // 32
    rows = [json.loads(line) for line in (out / "history.jsonl").read_text().splitlines()]
    assert [row["precision"] for row in rows] == ["bf16" if native else "fp32"] * 2
    assert [row["allocator"] for row in rows] == [allocator()] * 2  # glibc's, or the one preloaded
    assert torch.load(out / "best.pt", weights_only=False)["train_config"]["amp"] == "auto"  # the request


def test_bf16_training_run_and_fp16_refused_on_cpu(tmp_path, tiny_npz):
    best = train(_cfg(tiny_npz, tmp_path / "bf16", epochs=1, amp="bf16"))
    assert 0 <= best["val_acc"] <= 1
    with pytest.raises(ValueError, match="GradScaler on a GPU only; on the CPU use --amp bf16"):
        train(_cfg(tiny_npz, tmp_path / "fp16", epochs=1, amp="fp16"))


def test_channels_last_guard_finds_1x1_stride_2_convolutions_on_large_inputs():
    # at 128×128 the first strided shortcut of the ResNet sees the 64×64 output of its stride-2 stem
    resnet = create_model("stn_resnet10_triplet", widths=[8, 16, 32, 64], input_size=(128, 128))
    assert channels_last_hazards(resnet, (1, 128, 128)) == ["blocks.1.shortcut.0 (input (64, 64))"]
    assert not use_channels_last(resnet, (1, 128, 128), True, torch.device("cpu"))  # falls back to NCHW
    small = create_model("stn_resnet10_triplet", widths=[8, 16, 32, 64])
    assert channels_last_hazards(small, (1, 48, 48)) == []  # the bundled input size: shortcuts see ≤ 24×24
    assert use_channels_last(small, (1, 48, 48), True, torch.device("cpu"))
    toy = nn.Sequential(nn.Conv2d(1, 4, 1, stride=2))
    assert channels_last_hazards(toy, (1, 64, 64)) == ["0 (input (64, 64))"]
    assert channels_last_hazards(toy, (1, 63, 63)) == []


def test_training_falls_back_to_nchw_for_a_model_that_would_crash(tmp_path, monkeypatch):
    big = replace(default_spec("stn_resnet10_triplet"), input_size=(128, 128))
    monkeypatch.setattr(train_module, "default_spec", lambda model_id, labels=None: replace(big, labels=labels))
    data = write_npz(tmp_path / "small.npz", train_per_class=10, test_per_class=2)
    cfg = _cfg(data, tmp_path / "run", model="stn_resnet10_triplet", epochs=1, limit=0,
               model_kwargs={"widths": [8, 16, 32, 64], "input_size": [128, 128]})  # fmt: skip
    train(cfg)
    ckpt = torch.load(tmp_path / "run" / "best.pt", weights_only=False)
    assert ckpt["train_config"]["channels_last"] is False  # the layout that actually ran
    assert "training in NCHW instead of channels-last" in (tmp_path / "run" / "train.log").read_text()


def test_eta_follows_the_usual_epoch_not_one_slowed_by_a_pause():
    assert eta_seconds([100.0, 110.0, 105.0], 10) == 1050.0
    # one epoch of the last five took 7x as long (the process was paused): the median ignores it
    assert eta_seconds([100.0, 700.0, 105.0, 110.0, 95.0], 100) == 10_000 + 500
    assert eta_seconds([900.0, 100.0, 100.0, 100.0, 100.0, 100.0], 3) == 300.0  # only the last five count
    assert eta_seconds([], 5) == 0.0 and eta_seconds([100.0], 0) == 0.0


MAPS = """\
55c8bacbb000-55c8bacbd000 r--p 00000000 fe:00 260386                     /usr/bin/python3.11
7f1c2a000000-7f1c2a021000 rw-p 00000000 00:00 0
7f1c2b400000-7f1c2b428000 r--p 00000000 fe:00 263001                     /usr/lib/x86_64-linux-gnu/libc.so.6
{extra}7ffd4e9f1000-7ffd4ea12000 rw-p 00000000 00:00 0                          [stack]
"""


@pytest.mark.parametrize(
    ("library", "expected"),
    [
        ("", "glibc"),
        ("/usr/lib/x86_64-linux-gnu/libtcmalloc_minimal.so.4.5.10", "tcmalloc"),
        ("/usr/lib/x86_64-linux-gnu/libjemalloc.so.2", "jemalloc"),
        ("/opt/my libs/libtcmalloc.so", "tcmalloc"),  # a path with a space in it
    ],
)
def test_the_allocator_is_read_from_the_libraries_the_process_has_mapped(tmp_path, monkeypatch, library, expected):
    maps = tmp_path / "maps"
    extra = f"7f1c2c000000-7f1c2c010000 r-xp 00000000 fe:00 263100                     {library}\n" if library else ""
    maps.write_text(MAPS.format(extra=extra))
    assert allocator(maps) == expected
    assert allocator(tmp_path / "no-proc") == "unknown"  # no /proc: said, not guessed
    monkeypatch.setattr(hardware, "allocator", lambda: expected)
    note = hardware.allocator_note()  # what the run's first log line says
    if expected == "glibc":
        assert "LD_PRELOAD=libtcmalloc_minimal.so.4" in note and "The memory allocator" in note
    else:
        assert note == f"memory allocator {expected}"


_SUBNORMALS = """
import torch
from mien.training.hardware import flushing_denormals
if {flush}:
    with flushing_denormals() as flushed:
        torch.set_num_threads(2)
        x = torch.full((1 << 22,), 1e-39)  # subnormal in fp32; large enough that torch splits the multiply
        inside = int(((x * 1.0) != 0).sum())
    after = int((torch.full((8,), 1e-39) * 1.0 != 0).sum())  # on this thread, after the block
else:
    flushed = False
    torch.set_num_threads(2)
    x = torch.full((1 << 22,), 1e-39)
    inside = after = int(((x * 1.0) != 0).sum())
print(flushed, inside, after)
"""


@pytest.mark.parametrize("flush", [True, False])
def test_flushing_denormals_reaches_torchs_threads_and_ends_with_the_block(flush):
    # in a fresh process, as in `mien train`: the threads torch starts inside the block inherit the flush-to-zero
    # mode, so no thread leaves a subnormal product; after the block this thread keeps subnormals again. Without
    # the block every product stays subnormal.
    import subprocess
    import sys

    out = subprocess.run([sys.executable, "-c", _SUBNORMALS.format(flush=flush)], capture_output=True, text=True,
                         check=True).stdout.split()  # fmt: skip
    if flush:
        assert out == ["True", "0", "8"]
    else:
        assert out == ["False", str(1 << 22), str(1 << 22)]


def test_train_flushes_denormals_while_it_trains_and_not_after(tmp_path, tiny_npz, monkeypatch):
    entered = []
    real = train_module.flushing_denormals

    def recording():
        entered.append(torch.get_num_threads())
        return real()

    monkeypatch.setattr(train_module, "flushing_denormals", recording)
    train(_cfg(tiny_npz, tmp_path / "run", epochs=1, limit=64))
    assert len(entered) == 1
    # the caller's floating-point mode is back: a subnormal survives on this thread (hypothesis, in the same
    # test process, refuses to run where it does not)
    assert (torch.full((8,), 1e-39) * 1.0 != 0).all()
