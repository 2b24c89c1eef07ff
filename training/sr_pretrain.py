"""Pre-train the EDSR front end of ``sr_cnn``/``stn_sr_cnn`` on FER2013 faces, then load it with ``sr_init``.

FER2013 has no higher-resolution faces, so the real 48×48 face is the target and its ×2 area-downscale
(24×24) the input: the network learns 24 → 48 with L1 (EDSR's loss) and is then used, scale-free as
convolutions are, as the 48 → 96 front end of the classifier. Validation reports the L1 of bicubic
upsampling beside the network's, so a front end that does not beat bicubic is visible.

Recommended: pre-train, then train the classifier with ``freeze_sr=True``. On two CPU cores, training
EDSR jointly costs most of an epoch (EDSR(8, 64): ~2,300 s/epoch against ~225 s for a VGG-size CNN)
because every step backpropagates through convolutions at 96×96 into the SR weights. Frozen, the SR
net only runs forward (plus input gradients when an STN sits in front), its weight gradients are never
formed, and the classifier sees a fixed, meaningful upsampling from the first epoch instead of a
random filter that the classification loss must first turn into one; the paper's front end is also a
pre-trained SR network. Fine-tuning (``sr_init`` without ``freeze_sr``) stays available for runs that
can afford it; issue 17's SR arms fine-tune the small default EDSR (B=4, F=32), which costs about 400 s an
epoch here (docs/training.md).

Protocol (issue 14's): the network learns from ``train_split`` only. With ``val_split = "val"`` (the default) that
split is FER2013 Training minus the validation faces ``mien train`` carves (the same function, fraction and seed),
so the classifiers behind the SR net are later selected on faces it never saw, and PublicTest is never read. The
checkpoint is the last epoch's weights (cosine to zero); nothing is selected on any split, ``val_split`` is only
reported, each epoch, in the log and in the history beside the checkpoint (``<out>.json``, rewritten every epoch).

A run survives a lost session: every epoch also writes ``<out stem>.last.pt`` (weights, Adam, the schedule, the
batch-order/flip generator and the history), and rerunning the same command resumes from it exactly (on the same
thread count two half-runs give the weights of one whole run); a ``.last.pt`` written with other options is
refused rather than mixed in. It stays beside the finished checkpoint, so rerunning a finished run only rewrites
``<out>``.

``mien sr-eval CHECKPOINT`` (:mod:`mien.training.sr_eval`) scores a pre-trained network against bicubic
upsampling with PSNR and SSIM on a split's faces (PublicTest by default).
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm import tqdm

from mien.card import SR_FRONT_END_KIND
from mien.training.config import SRPretrainConfig
from mien.training.data import CARVED_SPLIT, USAGE_TO_SPLIT, load_dataset, load_with_validation
from mien.training.hardware import flushing_denormals, precision_name, resolve_amp
from mien.training.layers import EDSR, EDSR_SMALL
from mien.training.models import default_spec
from mien.training.run_folder import command_line, save
from mien.training.transforms import normalize

log = logging.getLogger("mien.sr_pretrain")


def downscale(hr: torch.Tensor) -> torch.Tensor:
    """The ×2 low-resolution input: area interpolation averages 2×2 blocks, like a coarser sensor."""
    return F.interpolate(hr, scale_factor=0.5, mode="area")


@torch.no_grad()
def sr_l1(sr: nn.Module, hr: torch.Tensor, batch_size: int = 256) -> tuple[float, float]:
    """(network L1, bicubic L1) of reconstructing ``hr`` (normalised N×C×H×W) from its ×2 downscale."""
    sr.eval()
    net = bicubic = 0.0
    for i in range(0, len(hr), batch_size):
        target = hr[i : i + batch_size]
        small = downscale(target)
        up = F.interpolate(small, size=target.shape[-2:], mode="bicubic", align_corners=False)
        net += F.l1_loss(sr(small), target, reduction="sum").item()
        bicubic += F.l1_loss(up, target, reduction="sum").item()
    return net / hr.numel(), bicubic / hr.numel()


def l1_step(sr: nn.Module, optimizer: torch.optim.Optimizer, hr: torch.Tensor, amp: str = "none") -> float:
    """One optimiser step of EDSR's L1 loss on the batch ``hr`` (normalised faces) from its ×2 downscale;
    returns the loss before the step. ``amp="bf16"`` runs the network under bf16 autocast (the weights, the
    optimiser and the loss stay fp32)."""
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=amp == "bf16"):
        out = sr(downscale(hr))
    loss = F.l1_loss(out.float(), hr)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    return loss.item()


#: FER2013's test splits: the SR net never learns from them.
TEST_SPLITS = tuple(split for split in USAGE_TO_SPLIT.values() if split != "train")


def sr_faces(cfg: SRPretrainConfig) -> tuple[np.ndarray, np.ndarray]:
    """(faces the SR net learns from, faces its L1 is reported on), uint8 N×H×W.

    ``val_split = "val"`` carves the validation faces out of ``train_split`` with ``mien train``'s own carve
    (:func:`~mien.training.data.load_with_validation`, ``val_fraction``, ``val_seed``), so the two sets are
    disjoint and the SR net learns from exactly the faces the classifiers fit. ``limit`` keeps the first N
    training faces. A test split is refused as the training split.
    """
    if cfg.train_split in TEST_SPLITS or cfg.train_split == cfg.val_split:
        raise ValueError(f"--train-split {cfg.train_split!r}: the SR net learns from Training faces only, never from "
                         f"a test split {TEST_SPLITS} nor from --val-split {cfg.val_split!r}")  # fmt: skip
    if cfg.val_split == CARVED_SPLIT:
        data = load_with_validation(cfg.data, cfg.val_fraction, cfg.val_seed, source=cfg.train_split)
    else:
        data = load_dataset(cfg.data)
        log.warning("SR L1 reported on %s (selects nothing; new runs report on --val-split val)", cfg.val_split)
    train_x = data.subset(cfg.train_split)[0]
    return (train_x[: cfg.limit] if cfg.limit else train_x), data.subset(cfg.val_split)[0]


def pretrain_sr(cfg: SRPretrainConfig) -> dict:
    """Train an EDSR on 24 → 48 pairs of ``cfg.train_split`` faces with L1; write ``cfg.out`` (the last epoch's
    weights) and the history beside it (``<out>.json``, after every epoch); return the last epoch's metrics."""
    with flushing_denormals():  # before the first parallel op, so that torch's threads inherit it
        return _pretrain_sr(cfg)


def _pretrain_sr(cfg: SRPretrainConfig) -> dict:
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    torch.manual_seed(cfg.seed)
    generator = torch.Generator().manual_seed(cfg.seed)
    spec = default_spec("sr_cnn")  # the SR variants' normalisation: the SR net sees what the classifier feeds it
    train_faces, val_faces = sr_faces(cfg)
    train_x = torch.from_numpy(train_faces)
    val_hr = normalize(torch.from_numpy(val_faces), spec)
    sr_kwargs = {**EDSR_SMALL, **cfg.sr_kwargs}
    sr = EDSR(spec.channels, **sr_kwargs)
    layout = torch.channels_last if cfg.channels_last else torch.contiguous_format
    sr = sr.to(memory_format=layout)
    steps_per_epoch = len(train_x) // cfg.batch_size
    if steps_per_epoch == 0:
        raise ValueError(f"{len(train_x)} training faces are fewer than one batch of {cfg.batch_size}")
    amp = resolve_amp(cfg.amp, torch.device("cpu"))  # auto: bf16 on a CPU that computes it natively
    log.info("SR pre-training EDSR %s: %d %s faces, L1 reported on %d %s faces (%s, amp %s)", sr.kwargs,
             len(train_x), cfg.train_split, len(val_hr), cfg.val_split,
             "channels-last" if cfg.channels_last else "NCHW", precision_name(amp))  # fmt: skip
    optimizer = torch.optim.Adam(sr.parameters(), lr=cfg.lr)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=cfg.epochs * steps_per_epoch)
    out = Path(cfg.out).expanduser()
    out.parent.mkdir(parents=True, exist_ok=True)
    last = resume_path(out)
    history = _resume(last, cfg, sr, optimizer, schedule, generator)
    for epoch in tqdm(range(len(history) + 1, cfg.epochs + 1), desc="pretrain-sr", unit="epoch",
                      initial=len(history), total=cfg.epochs, dynamic_ncols=True):  # fmt: skip
        started = time.perf_counter()
        sr.train()
        order = torch.randperm(len(train_x), generator=generator)
        total = 0.0
        bar = tqdm(range(steps_per_epoch), desc=f"epoch {epoch}/{cfg.epochs}", leave=False, dynamic_ncols=True,
                   mininterval=2)  # fmt: skip
        for i in bar:
            hr = normalize(train_x[order[i * cfg.batch_size : (i + 1) * cfg.batch_size]], spec)
            flip = torch.rand(len(hr), generator=generator) < 0.5
            hr = torch.where(flip[:, None, None, None], hr.flip(-1), hr).contiguous(memory_format=layout)
            total += l1_step(sr, optimizer, hr, amp)
            schedule.step()
            bar.set_postfix(l1=f"{total / (i + 1):.4f}", refresh=False)
        val_l1, bicubic_l1 = sr_l1(sr, val_hr)
        row = {"epoch": epoch, "train_l1": total / steps_per_epoch, "val_l1": val_l1, "bicubic_l1": bicubic_l1,
               "seconds": time.perf_counter() - started, "precision": precision_name(amp)}  # fmt: skip
        history.append(row)
        state = {"config": _resume_key(cfg), "state_dict": sr.state_dict(), "optimizer": optimizer.state_dict(),
                 "schedule": schedule.state_dict(), "generator": generator.get_state(), "history": history}  # fmt: skip
        save(state, last)
        _write_history(out, cfg, sr, history, len(train_x), len(val_hr))
        log.info("SR epoch %d/%d  train L1 %.4f  %s L1 %.4f (bicubic %.4f)  %.0f s", epoch, cfg.epochs,
                 row["train_l1"], cfg.val_split, val_l1, bicubic_l1, row["seconds"])  # fmt: skip
    metrics = {**history[-1], "split": cfg.val_split}
    ckpt = {"kind": "sr_pretrain", "sr_kwargs": sr.kwargs, "state_dict": sr.state_dict(), "history": history,
            "metrics": metrics, "config": asdict(cfg), "spec": spec.to_dict(), "train_faces": len(train_x),
            "command": command_line("pretrain-sr")}  # fmt: skip
    save(ckpt, out)  # atomic, as last.pt
    return metrics


def resume_path(out: str | Path) -> Path:
    """Where the run of the checkpoint ``out`` keeps its resumable state: ``<out stem>.last.pt`` beside it."""
    out = Path(out).expanduser()
    return out.with_name(out.stem + ".last.pt")


def _resume_key(cfg: SRPretrainConfig) -> dict:
    """The options a resumed run must share with the one that wrote ``.last.pt`` (all but the thread count)."""
    return {k: v for k, v in asdict(cfg).items() if k != "threads"}


def _resume(last: Path, cfg: SRPretrainConfig, sr: nn.Module, optimizer, schedule, generator) -> list[dict]:
    """Load ``last`` into the run's parts and return the epochs it has done; ``[]`` when there is nothing to resume."""
    if not last.exists():
        return []
    state, asked = torch.load(last, map_location="cpu", weights_only=False), _resume_key(cfg)
    if state["config"] != asked:
        differ = sorted(k for k in asked if state["config"].get(k) != asked[k])
        raise ValueError(f"{last} was written by a run with other options ({', '.join(differ)}): rerun it with "
                         "the same options to resume, or delete it (or use another --out) to start again")  # fmt: skip
    sr.load_state_dict(state["state_dict"])
    optimizer.load_state_dict(state["optimizer"])
    schedule.load_state_dict(state["schedule"])
    generator.set_state(state["generator"])
    log.info("resuming SR pre-training from %s after epoch %d of %d", last, len(state["history"]), cfg.epochs)
    return list(state["history"])


def _write_history(out: Path, cfg: SRPretrainConfig, sr: EDSR, history: list[dict], train: int, val: int) -> None:
    """``<out>.json``: what is being trained, on which faces, and every epoch so far (rewritten each epoch)."""
    report = {"sr_kwargs": sr.kwargs, "train_split": cfg.train_split, "train_faces": train,
              "val_split": cfg.val_split, "val_faces": val, "epochs": cfg.epochs, "history": history,
              "config": asdict(cfg)}  # fmt: skip
    out.with_suffix(".json").write_text(json.dumps(report, indent=1) + "\n")


#: ``mien.kind`` of an exported SR front end (``mien export`` of a :func:`pretrain_sr` checkpoint), and the key of its
#: EDSR options; the file's initializers keep the EDSR's parameter names (it has no batch norm to fold).
SR_KWARGS_KEY = "mien.sr_kwargs"
KIND_KEY = "mien.kind"


def sr_checkpoint_from_onnx(path: Path) -> dict:
    """The :func:`pretrain_sr` checkpoint an exported SR front end holds: its EDSR options and weights, by name.
    Any weight the network has and the file does not give (or gives in another shape) is refused."""
    import onnx
    from onnx import numpy_helper

    proto = onnx.load(str(path))
    meta = {p.key: p.value for p in proto.metadata_props}
    if meta.get(KIND_KEY) != SR_FRONT_END_KIND or SR_KWARGS_KEY not in meta:
        raise ValueError(f"{path}: not an exported SR front end (`mien export` of a `mien pretrain-sr` checkpoint)")
    sr_kwargs = json.loads(meta[SR_KWARGS_KEY])
    weights = {t.name: numpy_helper.to_array(t) for t in proto.graph.initializer}
    state = EDSR(default_spec("sr_cnn").channels, **sr_kwargs).state_dict()
    wrong = sorted(k for k, v in state.items() if k not in weights or tuple(weights[k].shape) != tuple(v.shape))
    if wrong:
        raise ValueError(f"{path}: the file does not give these EDSR weights in their shapes: {wrong}")
    return {"kind": "sr_pretrain", "sr_kwargs": sr_kwargs, "from_file": str(path),
            "state_dict": {k: torch.from_numpy(weights[k].copy()) for k in state}}  # fmt: skip


def load_sr_checkpoint(path: str | Path) -> dict:
    """A checkpoint written by :func:`pretrain_sr`, or the same read back from its exported ONNX file (the form
    the repository keeps, which survives a lost run folder), or an error that says what the file is instead."""
    path = Path(path).expanduser()  # recipes name it as ~/mien-runs/..., outside the checkout
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such SR checkpoint; `mien pretrain-sr --out {path}` writes one")
    if path.suffix == ".onnx":
        return sr_checkpoint_from_onnx(path)
    ckpt = torch.load(path, map_location="cpu", weights_only=False)
    if not isinstance(ckpt, dict) or ckpt.get("kind") != "sr_pretrain":
        raise ValueError(f"{path}: not an SR pre-training checkpoint (written by `mien pretrain-sr`)")
    return ckpt


def resolve_sr_kwargs(model_kwargs: dict, sr_init: str) -> dict:
    """``model_kwargs`` with ``sr_kwargs`` taken from the ``sr_init`` checkpoint, which must agree with any given."""
    if not sr_init:
        return dict(model_kwargs)
    saved = load_sr_checkpoint(sr_init)["sr_kwargs"]
    given = model_kwargs.get("sr_kwargs")
    if given is not None and {**EDSR_SMALL, **given} != {k: saved[k] for k in {**EDSR_SMALL, **given}}:
        raise ValueError(f"sr_kwargs {given} disagree with those of the SR checkpoint {sr_init}: {saved}")
    return {**model_kwargs, "sr_kwargs": dict(saved)}


def init_sr_front_end(model: nn.Module, sr_init: str, freeze: bool) -> None:
    """Load pre-trained SR weights into ``model.sr`` and optionally freeze them."""
    if getattr(model, "sr", None) is None:
        raise ValueError("sr_init/freeze_sr need a model with an SR front end (sr_cnn, stn_sr_cnn)")
    if freeze and not sr_init:
        raise ValueError("freeze_sr without sr_init would freeze a random SR network; pass sr_init too")
    if sr_init:
        model.sr.load_state_dict(load_sr_checkpoint(sr_init)["state_dict"])
    for p in model.sr.parameters():
        p.requires_grad_(not freeze)
