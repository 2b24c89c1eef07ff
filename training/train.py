"""The training loop: FER2013 Training in, best-on-PublicTest checkpoint out.

Reads top to bottom: config → data → model → loop (train epoch, evaluate, checkpoint, plot). The run
folder holds ``last.pt`` (resumable: weights, optimiser, scheduler, RNG, history), ``best.pt``
(selected by validation accuracy), ``history.jsonl`` (one line per epoch), ``curves.png`` and
``train.log``. Rerunning the same command on the same folder resumes where it stopped. What a step
means for each model (loss, batch composition, extra augmentation, validation protocol) lives in
``training/objectives.py``; this loop is the same for all of them. The same loop runs as one process
or under torchrun (``training/hardware.py``: DDP, rank 0 writes), in fp32 or mixed precision, on
FER2013's or FER+'s labels (``training/ferplus.py``), with the schedules of ``training/schedule.py``.
"""

from __future__ import annotations

import json
import logging
import random
import shlex
import sys
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
from mien.training.data import CARVED_SPLIT, FaceDataset, carve_validation, load_dataset, select_labels
from mien.training.ferplus import LABEL_SOURCES, TARGETS, default_votes_path, ferplus_dataset
from mien.training.hardware import (
    Process,
    all_reduce_sum,
    check_amp,
    close_distributed,
    init_distributed,
    use_channels_last,
)
from mien.training.models import create_model, default_spec
from mien.training.objectives import CrossEntropy, ObjectiveConfig, StepContext, build_objective, predict_logits
from mien.training.schedule import SCHEDULES, epochs_without_improvement, get_lr
from mien.training.sr_pretrain import init_sr_front_end, resolve_sr_kwargs
from mien.training.transforms import AugmentConfig
from torch.nn.parallel import DistributedDataParallel as DDP
from torch.optim.swa_utils import AveragedModel
from tqdm import tqdm

__all__ = ["TrainConfig", "get_lr", "predict_logits", "train", "train_one_epoch", "warm_start"]

log = logging.getLogger("mien.train")

#: Objectives whose loss takes a probability row per face (FER+ soft targets) as well as a class index.
SOFT_TARGET_OBJECTIVES = ("cross_entropy", "ten_crop")
OPTIMIZERS = ("adam", "sgd")


@dataclass
class TrainConfig:
    data: str = "../shared/data/fer2013.npz"
    model: str = "mini_xception"
    out: str = "runs/mini_xception"
    epochs: int = 100
    batch_size: int = 64
    lr: float = 2e-3  # peak learning rate, reached after warm-up; then the schedule below
    optimizer: str = "adam"  # adam | sgd (Nesterov momentum)
    momentum: float = 0.9  # sgd only
    ema: float = 0.0  # decay of an exponential moving average of the weights (e.g. 0.999); 0 = off
    teacher: str = ""  # distil from these frozen models: comma-separated .onnx files or best.pt (training/distill.py)
    distill_temperature: float = 4.0  # T softening teachers and student in the KL term
    distill_weight: float = 0.5  # α: loss = (1-α)·CE + α·T²·KL; 0 = plain cross-entropy
    warmup_epochs: int = 2
    weight_decay: float = 1e-4
    label_smoothing: float = 0.05
    train_split: str = "train"
    # "val" = a stratified share of train_split carved out once (val_fraction, val_seed), the same on every
    # run; it selects checkpoints and stops early. PublicTest is the test set, scored after selection.
    val_split: str = "val"
    val_fraction: float = 0.1
    val_seed: int = 2013  # fixed, not the run's seed: every run and every model sees the same carve
    seed: int = 0
    threads: int = 0  # torch intra-op threads; 0 = torch's default
    channels_last: bool = True  # ~1.8x faster on CPU for mini-Xception (docs/training.md); NCHW where it would crash
    limit: int = 0  # use only the first N training images (0 = all); for smoke tests
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    objective: ObjectiveConfig = field(default_factory=ObjectiveConfig)  # per-model loss knobs
    labels: tuple[str, ...] | None = None  # train on these classes only, in this output order (None = all)
    label_map: dict[str, str] = field(default_factory=dict)  # rename/merge classes before `labels` picks
    model_kwargs: dict = field(default_factory=dict)  # builder options, e.g. {"sr_kwargs": {"num_blocks": 16}}
    sr_init: str = ""  # SR front end weights from `mien pretrain-sr` (sr_cnn, stn_sr_cnn)
    freeze_sr: bool = False  # keep that pre-trained SR front end fixed (recommended on CPU)
    init: str = ""  # warm start: a best.pt whose layers of the same name and shape are copied in
    label_source: str = "fer2013"  # fer2013 | ferplus (8 FER+ classes) | ferplus7 (FER+ votes on FER2013's 7)
    ferplus_votes: str = ""  # the FER+ votes csv; "" = ferplus_votes.csv beside `data`
    ferplus_target: str = "majority"  # majority (hard label) | soft (vote distribution); see training/ferplus.py
    schedule: str = "cosine"  # cosine | step | plateau, after the linear warm-up (training/schedule.py)
    lr_step_epochs: int = 30  # step: multiply the rate by lr_step_gamma every this many epochs
    lr_step_gamma: float = 0.1
    plateau_patience: int = 5  # plateau: epochs without a better val_acc before the rate is cut
    plateau_factor: float = 0.5  # plateau: the cut
    early_stop: int = 0  # stop after this many epochs without a better val_acc (0 = never)
    grad_clip: float = 0.0  # max global L2 norm of the gradients (0 = no clipping)
    amp: str = "none"  # none | bf16 (autocast; CPU or GPU) | fp16 (autocast + GradScaler; GPU only)
    device: str = "auto"  # auto (this rank's GPU if any, else CPU) | cpu | cuda


def seed_everything(seed: int) -> torch.Generator:
    """Seed every RNG in one place; the returned generator drives batch order and augmentation."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    return torch.Generator().manual_seed(seed)


def load_labelled(cfg: TrainConfig) -> tuple[FaceDataset, np.ndarray | None]:
    """The data set with the run's labels, and the soft targets (one row per image) when training on them."""
    data = load_dataset(cfg.data)
    if cfg.label_source not in LABEL_SOURCES:
        raise ValueError(f"label source must be one of {LABEL_SOURCES}, got {cfg.label_source!r}")
    if cfg.ferplus_target not in TARGETS:
        raise ValueError(f"FER+ target must be one of {TARGETS}, got {cfg.ferplus_target!r}")
    soft = None
    if cfg.label_source != "fer2013":
        data, soft = ferplus_dataset(data, cfg.ferplus_votes or default_votes_path(cfg.data), cfg.label_source)
        if cfg.ferplus_target == "majority":
            soft = None
    if soft is not None and (cfg.labels is not None or cfg.label_map):
        raise ValueError("--labels/--label-map pick hard labels; with --ferplus-target soft use --label-source instead")
    if cfg.labels is not None or cfg.label_map:
        data = select_labels(data, cfg.labels, cfg.label_map)
    if cfg.val_split == CARVED_SPLIT and CARVED_SPLIT not in data.splits:
        data = carve_validation(data, cfg.val_fraction, cfg.val_seed, source=cfg.train_split)
    return data, soft


def warm_start(model: nn.Module, path: str) -> list[str]:
    """Copy the tensors of checkpoint ``path`` that match ``model``'s by name and shape; return their names.

    How the STN/SR ablation adds a front end to a trained classifier: ``stn_cnn``, ``sr_cnn`` and
    ``stn_sr_cnn`` share the ``classifier.*`` layout of ``base_cnn``. The new layers keep their own
    initialisation (the STN starts at the identity warp).
    """
    state = torch.load(path, map_location="cpu", weights_only=False)["state_dict"]
    own = model.state_dict()
    copied = [k for k, v in state.items() if k in own and own[k].shape == v.shape]
    if not copied:
        raise ValueError(f"{path}: no layer matches model {type(model).__name__} by name and shape")
    model.load_state_dict({k: state[k] for k in copied}, strict=False)
    fresh = sorted({k.split(".")[0] for k in own if k not in copied})
    log.info("warm start from %s: %d of %d tensors copied; new: %s", path, len(copied), len(own), fresh or "none")
    return copied


def train_one_epoch(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    objective: CrossEntropy,
    images: torch.Tensor,
    labels: torch.Tensor,
    cfg: TrainConfig,
    step: int,
    desc: str,
    targets: torch.Tensor | None = None,
    val_accs: list[float] = (),
    process: Process | None = None,
    ema: AveragedModel | None = None,
) -> tuple[float, float, int]:
    """One pass over the objective's batches; returns (mean loss, training accuracy, optimiser step).

    ``targets`` (one probability row per image) replace the hard labels in the loss when given (FER+ soft
    targets); accuracy is always against the hard labels. Under torchrun each rank steps on its share of
    every global batch and the loss and accuracy are summed over all ranks.
    """
    process = process or Process()
    model.train()
    batches = objective.batches(labels)
    steps_per_epoch = len(images) // cfg.batch_size  # the lr schedule's unit, whatever the batch composition
    total_loss = correct = seen = 0
    bar = tqdm(batches, desc=desc, leave=False, dynamic_ncols=True, mininterval=2, disable=not process.is_main)
    for idx in bar:
        y = labels[idx]
        for group in optimizer.param_groups:
            group["lr"] = get_lr(cfg, step, steps_per_epoch, val_accs)
        loss, logits = objective.train_step(model, optimizer, images[idx], y if targets is None else targets[idx])
        if ema is not None:
            ema.update_parameters(model.module if isinstance(model, DDP) else model)
        step += 1
        y = objective.context.shard(y)  # the faces this rank stepped on
        total_loss += loss * len(y)
        correct += (logits.argmax(1) == y).sum().item()
        seen += len(y)
        bar.set_postfix(loss=f"{total_loss / seen:.3f}", acc=f"{correct / seen:.3f}", refresh=False)
    total_loss, correct, seen = all_reduce_sum([total_loss, correct, seen], process)
    return total_loss / seen, correct / seen, step


def validate(objective: CrossEntropy, model: nn.Module, images, labels, process: Process) -> dict[str, float]:
    """The objective's validation figures over the whole split: each rank scores a contiguous share and
    the per-face means are combined, weighted by share size, with one all_reduce."""
    if not process.distributed:
        return objective.validate(model, images, labels)
    share = np.array_split(np.arange(len(labels)), process.world_size)[process.rank]
    metrics = objective.validate(model, images[share], labels[share])
    keys = sorted(metrics)
    sums = all_reduce_sum([metrics[k] * len(share) for k in keys] + [len(share)], process)
    return {k: v / sums[-1] for k, v in zip(keys, sums[:-1], strict=True)}


def check_supported(cfg: TrainConfig, objective: CrossEntropy, process: Process, soft_targets: bool) -> None:
    """Refuse, with the reason, the combinations an objective cannot train in."""
    check_amp(cfg.amp, process.device)
    if cfg.schedule not in SCHEDULES:
        raise ValueError(f"--schedule must be one of {SCHEDULES}, got {cfg.schedule!r}")
    if soft_targets and objective.name not in SOFT_TARGET_OBJECTIVES:
        raise ValueError(f"{cfg.model} trains with the {objective.name} objective, which needs hard labels; "
                         "use --ferplus-target majority")  # fmt: skip
    if objective.name == "sgan":
        asked = [what for what, on in (("torchrun (several processes)", process.distributed),
                                       (f"--amp {cfg.amp}", cfg.amp != "none"), ("--grad-clip", cfg.grad_clip > 0),
                                       (f"device {process.device}", process.device.type != "cpu")) if on]  # fmt: skip
        if asked:
            raise ValueError(f"the sgan objective takes its own two-optimiser step in one fp32 CPU process; "
                             f"it does not support {', '.join(asked)}")  # fmt: skip
    if process.distributed and objective.name == "triplet":
        raise ValueError("the triplet objective calls the model's forward_both, which DistributedDataParallel does "
                         "not synchronise; train stn_resnet10_triplet in one process")  # fmt: skip
    if cfg.optimizer not in OPTIMIZERS:
        raise ValueError(f"--optimizer must be one of {OPTIMIZERS}, got {cfg.optimizer!r}")
    if objective.mixes and objective.name != "cross_entropy":
        raise ValueError(f"mixup/CutMix mix the cross-entropy targets; {cfg.model} trains with the {objective.name} "
                         "objective, which does not support them")  # fmt: skip
    if cfg.teacher and objective.name != "cross_entropy":
        raise ValueError(f"distillation (--teacher) trains with the cross-entropy objective; {cfg.model} uses "
                         f"the {objective.name} objective")  # fmt: skip
    if not 0.0 <= cfg.distill_weight <= 1.0 or cfg.distill_temperature <= 0:
        raise ValueError("--distill-weight must be in [0, 1] and --distill-temperature positive")
    if cfg.ema and (objective.name == "sgan" or not 0.0 < cfg.ema < 1.0):
        raise ValueError(f"--ema is a decay in (0, 1) for the cross-entropy, triplet and ten-crop objectives; "
                         f"got {cfg.ema} for {objective.name}")  # fmt: skip
    if process.distributed and cfg.batch_size % process.world_size:
        raise ValueError(f"--batch-size {cfg.batch_size} (the global batch) must divide evenly over "
                         f"{process.world_size} processes")  # fmt: skip


def plot_curves(history: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    epochs = [h["epoch"] for h in history]
    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(10, 4))
    ax_loss.plot(epochs, [h["train_loss"] for h in history], label="train")
    ax_loss.plot(epochs, [h["val_loss"] for h in history], label="validation")
    ax_loss.set(xlabel="epoch", ylabel="cross-entropy", title="Loss")
    ax_acc.plot(epochs, [h["train_acc"] for h in history], label="train (augmented)")
    ax_acc.plot(epochs, [h["val_acc"] for h in history], label="validation")
    for key in sorted(k for k in history[-1] if k.startswith("val_acc_")):  # e.g. the DCNN's ten-crop figure
        ax_acc.plot(epochs, [h.get(key) for h in history], label=key.removeprefix("val_acc_"))
    ax_acc.set(xlabel="epoch", ylabel="accuracy", title="Accuracy")
    for ax in (ax_loss, ax_acc):
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _checkpoint(model, cfg, spec, model_kwargs, objective, history, best, extra=None) -> dict:
    ckpt = {
        "model_id": cfg.model,
        "model_kwargs": model_kwargs,
        "spec": spec.to_dict(),
        "state_dict": model.state_dict(),
        "train_config": asdict(cfg),
        "objective": objective.name,
        "notes": objective.notes,
        "command": "mien train " + shlex.join(sys.argv[2:]) if len(sys.argv) > 1 else "",
        "history": history,
        "metrics": best,
    }
    ckpt.update(extra or {})
    return ckpt


def weight_ema(model: nn.Module, decay: float) -> AveragedModel:
    """An exponential moving average of ``model``'s weights and BN buffers, with the decay warmed up as
    min(decay, (1 + n) / (10 + n)) after n updates (as timm's ModelEma and TF's ExponentialMovingAverage).

    Without the warm-up a fixed 0.998 keeps 0.998^n of the initial values: after 1,200 steps 9% of a BN
    running variance of 1.0 swamped a true variance of 0.006, and the averaged model predicted one class.
    """

    def average(averaged: torch.Tensor, current: torch.Tensor, n: torch.Tensor) -> torch.Tensor:
        d = min(decay, (1.0 + float(n)) / (10.0 + float(n)))
        return averaged * d + current * (1.0 - d)

    return AveragedModel(model, avg_fn=average, use_buffers=True)


def _duration(seconds: float) -> str:
    """3725 → '1h02m'; 95 → '1m35s'."""
    minutes, secs = divmod(int(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m" if hours else f"{minutes}m{secs:02d}s"


def _save(obj: dict, path: Path) -> None:
    tmp = path.with_suffix(".tmp")
    torch.save(obj, tmp)
    tmp.replace(path)  # atomic: a run killed mid-save never leaves a broken checkpoint


def train(cfg: TrainConfig, recipe: str = "") -> dict:
    """Train per ``cfg``; return the best validation metrics. Resumes from ``<out>/last.pt``.

    ``recipe``: the configs/<model>.toml the config came from, recorded in the checkpoints (and so in the
    exported model card). Under torchrun only rank 0 writes anything; every rank returns the same metrics.
    """
    process = init_distributed(cfg.device)
    try:
        best = _train(cfg, recipe, process)
    except BaseException:
        close_distributed(process, finished=False)
        raise
    close_distributed(process)
    return best


def _train(cfg: TrainConfig, recipe: str, process: Process) -> dict:
    out = Path(cfg.out)
    handler = None
    if process.is_main:
        out.mkdir(parents=True, exist_ok=True)
        handler = logging.FileHandler(out / "train.log")
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
        log.addHandler(handler)
    log.setLevel(logging.INFO if process.is_main else logging.WARNING)  # the run's log gets progress, once
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    generator = seed_everything(cfg.seed)  # the same seed on every rank: same init, batches and augmentation

    data, soft = load_labelled(cfg)
    train_x, train_y = data.subset(cfg.train_split)
    val_x, val_y = data.subset(cfg.val_split)
    train_t = torch.from_numpy(soft[data.split == cfg.train_split][: cfg.limit or None]) if soft is not None else None
    if cfg.limit:
        train_x, train_y = train_x[: cfg.limit], train_y[: cfg.limit]
    train_x, train_y = torch.from_numpy(train_x), torch.from_numpy(train_y)
    val_x, val_y = torch.from_numpy(val_x), torch.from_numpy(val_y)
    log.info(
        "data %s: %d train (%s), %d validation (%s)", cfg.data, len(train_y), cfg.train_split, len(val_y), cfg.val_split
    )

    spec = default_spec(cfg.model, labels=data.label_names)
    model_kwargs = {"num_classes": spec.num_classes, **resolve_sr_kwargs(cfg.model_kwargs, cfg.sr_init)}
    model = create_model(cfg.model, **model_kwargs)
    if getattr(model, "sr", None) is not None:  # record the SR net's full configuration, defaults included
        model_kwargs["sr_kwargs"] = dict(model.sr.kwargs)
    if cfg.init:
        warm_start(model, cfg.init)
    if cfg.sr_init or cfg.freeze_sr:
        init_sr_front_end(model, cfg.sr_init, cfg.freeze_sr)
    input_shape = (spec.channels, *spec.input_size)
    if cfg.channels_last and not use_channels_last(model, input_shape, True, process.device):
        cfg = replace(cfg, channels_last=False)  # the checkpoint records the layout that actually ran
    model = model.to(process.device)
    if cfg.channels_last:
        model = model.to(memory_format=torch.channels_last)
    objective = build_objective(cfg, spec, model, generator)
    check_supported(cfg, objective, process, soft_targets=train_t is not None)
    objective.set_context(StepContext(process.device, cfg.amp, cfg.grad_clip, process.rank, process.world_size))
    optimizer = objective.build_optimizer(model)
    # The EMA copy is what validation scores and best.pt keeps (so export serves it); BN buffers ride along.
    ema = weight_ema(model, cfg.ema) if cfg.ema else None
    served = ema.module if ema is not None else model

    history: list[dict] = []
    best: dict = {"val_acc": -1.0}
    step, start_epoch = 0, 1
    last = out / "last.pt"
    if last.exists():
        state = torch.load(last, map_location=process.device, weights_only=False)
        model.load_state_dict(state["state_dict"])
        optimizer.load_state_dict(state["optimizer"])
        generator.set_state(state["generator"].cpu())
        torch.set_rng_state(state["torch_rng"].cpu())
        objective.load_state_dict(state.get("objective_state", {}))
        if ema is not None:
            ema.load_state_dict(state["ema"])
        history, best, step = state["history"], state["metrics"], state["step"]
        start_epoch = history[-1]["epoch"] + 1 if history else 1
        log.info("resuming from %s at epoch %d", last, start_epoch)
    # the model the steps run through: DDP averages the ranks' gradients during backward
    stepped = DDP(model, device_ids=[process.device.index] if process.device.type == "cuda" else None) \
        if process.distributed else model  # fmt: skip
    log.info(
        "model %s (%s objective): %d parameters; %d process(es) on %s, %s, %s; config %s",
        cfg.model, objective.name, sum(p.numel() for p in model.parameters()), process.world_size, process.device,
        "channels-last" if cfg.channels_last else "NCHW", cfg.amp if cfg.amp != "none" else "fp32", asdict(cfg),
    )  # fmt: skip

    epochs = tqdm(range(start_epoch, cfg.epochs + 1), desc=cfg.model, unit="epoch", initial=start_epoch - 1,
                  total=cfg.epochs, dynamic_ncols=True, disable=not process.is_main)  # fmt: skip
    for epoch in epochs:
        val_accs = [h["val_acc"] for h in history]
        if cfg.early_stop and epochs_without_improvement(val_accs) >= cfg.early_stop:
            log.info("early stop before epoch %d: no better %s accuracy for %d epochs (best %.4f at epoch %d)",
                     epoch, cfg.val_split, cfg.early_stop, best["val_acc"], best["epoch"])  # fmt: skip
            break
        started = time.perf_counter()
        train_loss, train_acc, step = train_one_epoch(
            stepped, optimizer, objective, train_x, train_y, cfg, step, f"epoch {epoch}/{cfg.epochs}", train_t,
            val_accs, process, ema,
        )  # fmt: skip
        metrics = validate(objective, served, val_x, val_y, process)
        val_loss, val_acc = metrics["val_loss"], metrics["val_acc"]
        row = {
            "epoch": epoch, "train_loss": train_loss, "train_acc": train_acc, **metrics,
            "lr": optimizer.param_groups[0]["lr"], "seconds": time.perf_counter() - started,
        }  # fmt: skip
        history.append(row)
        improved = val_acc > best["val_acc"]
        if improved:
            best = {**metrics, "epoch": epoch, "split": cfg.val_split}
        if process.is_main:
            with (out / "history.jsonl").open("a") as fh:
                fh.write(json.dumps(row) + "\n")
            recipe_note = {"recipe": recipe} if recipe else {}
            if improved:
                _save(
                    _checkpoint(served, cfg, spec, model_kwargs, objective, history, best, recipe_note), out / "best.pt"
                )
            extra = {"optimizer": optimizer.state_dict(), "generator": generator.get_state(), "step": step,
                     "torch_rng": torch.get_rng_state(), "objective_state": objective.state_dict(),
                     **({"ema": ema.state_dict()} if ema is not None else {}), **recipe_note}  # fmt: skip
            _save(_checkpoint(model, cfg, spec, model_kwargs, objective, history, best, extra), last)
            plot_curves(history, out / "curves.png")
        recent = [h["seconds"] for h in history[-5:]]
        eta = (cfg.epochs - epoch) * sum(recent) / len(recent)
        log.info(
            "epoch %d/%d  train loss %.4f acc %.4f  %s loss %.4f acc %.4f  best %.4f (epoch %d)  %.0f s  ETA %s",
            epoch, cfg.epochs, train_loss, train_acc, cfg.val_split, val_loss, val_acc,
            best["val_acc"], best["epoch"], row["seconds"], _duration(eta),
        )  # fmt: skip
    if handler is not None:
        log.removeHandler(handler)
    return best
