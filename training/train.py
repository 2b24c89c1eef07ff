"""The training loop: FER2013 Training in, the checkpoint that scores best on a validation split out.

Reads top to bottom: config → data → model → objective → resume → epochs (train, validate, checkpoint).
The run folder (``training/run_folder.py``) holds ``last.pt`` (resumable: weights, optimiser, RNG,
history), ``best.pt`` (selected by validation accuracy), ``history.jsonl``, ``curves.png`` and
``train.log``; rerunning the same command on the same folder resumes where it stopped. What a step
means for each model (loss, batch composition, extra augmentation, validation protocol) lives in
``training/objectives.py``; this loop is the same for all of them. The same loop runs as one process
or under torchrun (``training/hardware.py``: DDP, rank 0 writes), in fp32 or mixed precision, on
FER2013's or FER+'s labels (``training/ferplus.py``), with the schedules of ``training/schedule.py``.
"""

from __future__ import annotations

import logging
import random
import signal
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, replace
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
from torch.nn.parallel import DistributedDataParallel as DDP
from torch.optim.swa_utils import AveragedModel
from tqdm import tqdm

from mien.machine import allocator
from mien.spec import PreprocessSpec
from mien.training.config import TrainConfig
from mien.training.curves import plot_curves
from mien.training.hardware import (
    Process,
    all_reduce_sum,
    allocator_note,
    close_distributed,
    flushing_denormals,
    init_distributed,
    precision_name,
    resolve_amp,
    use_channels_last,
)
from mien.training.layers import as_served
from mien.training.models import create_model, default_spec
from mien.training.objectives import CrossEntropy, StepContext, build_objective, predict_logits
from mien.training.run_data import load_splits
from mien.training.run_folder import EpochPosition, Progress, RunFolder, run_log
from mien.training.schedule import apply_lr, epochs_without_improvement, get_lr
from mien.training.sr_pretrain import init_sr_front_end, resolve_sr_kwargs
from mien.training.support import check_supported

# get_lr, plot_curves and predict_logits are imported from here by older callers
__all__ = ["TrainConfig", "get_lr", "plot_curves", "predict_logits", "train", "train_one_epoch", "warm_start",
           "weight_ema"]  # fmt: skip

log = logging.getLogger("mien.train")


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


class Stopped(Exception):
    """A run stopped by a signal (SIGTERM: a scheduler's preemption, a container or session ending): raised once the
    step under way has ended and ``last.pt`` holds the run up to it, so that the same command resumes it."""

    def __init__(self, signum: int, epoch: int, done: int) -> None:
        self.signum, self.epoch, self.done = signum, epoch, done
        where = f"after {done} batches of epoch {epoch}" if done else f"before epoch {epoch}"
        super().__init__(f"stopped by {signal.Signals(signum).name} {where}; last.pt holds the run up to there")


#: The signals that stop a run gracefully (the step under way ends, last.pt is written): what schedulers, container
#: engines and torchrun's agent send before they kill.
STOP_SIGNALS = (signal.SIGTERM,)


@contextmanager
def stop_requests() -> Iterator[list[int]]:
    """While training, a SIGTERM is recorded instead of killing the process at once (the list it yields gets the
    signal's number); the loop ends the step under way, writes last.pt and raises :class:`Stopped`. Outside the
    main thread, where Python cannot set handlers, signals keep their default action."""
    received: list[int] = []
    if threading.current_thread() is not threading.main_thread():
        yield received
        return
    previous = {signum: signal.signal(signum, lambda signum, frame: received.append(signum)) for signum in STOP_SIGNALS}
    try:
        yield received
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)


def _train(cfg: TrainConfig, recipe: str, process: Process) -> dict:
    out = Path(cfg.out)
    # flushing subnormals first, before the first parallel op, so that torch's threads inherit it
    with flushing_denormals(), run_log(out, process.is_main), stop_requests() as stop:
        if cfg.threads:
            torch.set_num_threads(cfg.threads)
        generator = seed_everything(cfg.seed)  # the same seed on every rank: same init, batches and augmentation
        data = load_splits(cfg)
        model, spec, model_kwargs, cfg = build_model(cfg, data.label_names, process.device)
        objective = build_objective(cfg, spec, model, generator)
        check_supported(cfg, objective, process, soft_targets=data.train_targets is not None)
        amp = resolve_amp(cfg.amp, process.device)  # auto: bf16 where native, resolved again on every resume
        objective.set_context(StepContext(process.device, amp, cfg.grad_clip, process.rank, process.world_size))
        optimizer = objective.build_optimizer(model)
        ema = weight_ema(model, cfg.ema) if cfg.ema else None
        run = RunFolder(out, cfg, spec, model_kwargs, model, objective, optimizer, generator, ema, recipe)
        progress = run.resume(process.device)
        # the model the steps run through: DDP averages the ranks' gradients during backward
        stepped = DDP(model, device_ids=[process.device.index] if process.device.type == "cuda" else None) \
            if process.distributed else model  # fmt: skip
        log.info(
            "model %s (%s objective): %d parameters; %d process(es) on %s, %s, %s, %s; config %s",
            cfg.model, objective.name, sum(p.numel() for p in model.parameters()), process.world_size, process.device,
            "channels-last" if cfg.channels_last else "NCHW", precision_name(amp), allocator_note(), asdict(cfg),
        )  # fmt: skip

        epochs = tqdm(range(progress.start_epoch, cfg.epochs + 1), desc=cfg.model, unit="epoch",
                      initial=progress.start_epoch - 1, total=cfg.epochs, dynamic_ncols=True,
                      disable=not process.is_main)  # fmt: skip
        for epoch in epochs:
            if _stop_early(cfg, progress, epoch):
                break
            if stop:  # during the last epoch's validation, or before the first: last.pt is already up to date
                raise Stopped(stop[0], epoch, 0)
            sr_trains = _sr_phase(cfg, model, epoch)
            position, progress.position = progress.position or EpochPosition(epoch), None
            clock = MidEpochCheckpoint(run, progress, position, cfg.checkpoint_minutes, process.is_main, stop)
            train_loss, train_acc, progress.step = train_one_epoch(
                stepped, optimizer, objective, data.train_x, data.train_y, cfg, progress.step,
                f"epoch {epoch}/{cfg.epochs}", data.train_targets, progress.val_accs, process, ema, position, clock,
            )  # fmt: skip
            metrics = validate(objective, as_served(run.served, asdict(cfg)), data.val_x, data.val_y, process)
            seconds, cpu_seconds = clock.elapsed()
            row = {
                "epoch": epoch, "train_loss": train_loss, "train_acc": train_acc, **metrics,
                "lr": optimizer.param_groups[0]["lr"], "seconds": seconds,
                "cpu_seconds": cpu_seconds,  # every thread of this process; not paused time
                "precision": precision_name(amp),  # what --amp (auto included) trained this epoch in, on this machine
                "allocator": allocator(),  # glibc or a preloaded one: a part of what `seconds` measured
                **({"sr_trains": sr_trains} if cfg.sr_finetune_epochs else {}),
            }  # fmt: skip
            improved = progress.record(row, metrics, cfg.val_split)
            if process.is_main:
                run.write_epoch(row, improved, progress)
            _log_epoch(cfg, row, progress)
    return progress.best


def _sr_phase(cfg: TrainConfig, model: nn.Module, epoch: int) -> bool:
    """With ``sr_finetune_epochs``: fix the SR front end before the last N epochs and train it in them (set per
    epoch from the epoch number alone, so a resumed run is in the same phase); whether it trains this epoch."""
    if not cfg.sr_finetune_epochs:
        return not cfg.freeze_sr
    trains = epoch > cfg.epochs - cfg.sr_finetune_epochs
    if trains != any(p.requires_grad for p in model.sr.parameters()):
        log.info("epoch %d: the SR front end %s", epoch, "trains with the classifier from here" if trains else
                 f"stays fixed until epoch {cfg.epochs - cfg.sr_finetune_epochs + 1}")  # fmt: skip
    model.sr.requires_grad_(trains)  # the optimiser holds its parameters: without gradients they are not stepped
    return trains


class MidEpochCheckpoint:
    """Writes ``last.pt`` every ``minutes`` in the middle of an epoch (:meth:`RunFolder.write_position`; rank 0
    only, never when ``minutes`` is 0), called by :func:`train_one_epoch` after each step; and times the epoch,
    adding the seconds it had taken before a resume in its middle. Once ``stop`` holds a signal (:func:`stop_requests`)
    it writes ``last.pt`` after the step, whatever ``minutes`` says, and raises :class:`Stopped`."""

    def __init__(self, run: RunFolder, progress: Progress, position: EpochPosition, minutes: float, writes: bool,
                 stop: list[int] | None = None):  # fmt: skip
        self.run, self.progress, self.position, self.writes, self.stop = run, progress, position, writes, stop
        self.every = minutes * 60 if writes and minutes > 0 else None
        self.earlier = (position.seconds, position.cpu_seconds)
        self.started = self.written = time.perf_counter()
        self.cpu_started = time.process_time()

    def elapsed(self) -> tuple[float, float]:
        """(wall, CPU) seconds of the epoch so far, its part before a resume included."""
        return (self.earlier[0] + time.perf_counter() - self.started,
                self.earlier[1] + time.process_time() - self.cpu_started)  # fmt: skip

    def __call__(self, step: int) -> None:
        if self.stop:
            if self.writes:
                self.write(step)
            raise Stopped(self.stop[0], self.position.epoch, self.position.done)
        if self.every is not None and time.perf_counter() - self.written >= self.every:
            self.write(step)

    def write(self, step: int) -> None:
        self.position.seconds, self.position.cpu_seconds = self.elapsed()
        self.run.write_position(self.progress, step, self.position)
        self.written = time.perf_counter()


def seed_everything(seed: int) -> torch.Generator:
    """Seed every RNG in one place; the returned generator drives batch order and augmentation."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    return torch.Generator().manual_seed(seed)


def build_model(
    cfg: TrainConfig, label_names: tuple[str, ...], device: torch.device
) -> tuple[nn.Module, PreprocessSpec, dict, TrainConfig]:
    """(model on ``device`` in its memory layout, its spec, the kwargs that rebuild it, ``cfg``).

    ``cfg`` comes back with channels_last off when the model would crash in that layout, so the
    checkpoint records the layout that actually ran.
    """
    spec = default_spec(cfg.model, labels=label_names)
    model_kwargs = {"num_classes": spec.num_classes, **resolve_sr_kwargs(cfg.model_kwargs, cfg.sr_init)}
    model = create_model(cfg.model, **model_kwargs)
    if getattr(model, "sr", None) is not None:  # record the SR net's full configuration, defaults included
        model_kwargs["sr_kwargs"] = dict(model.sr.kwargs)
    if cfg.init:
        warm_start(model, cfg.init)
    if cfg.sr_init or cfg.freeze_sr:
        init_sr_front_end(model, cfg.sr_init, cfg.freeze_sr)
    if cfg.channels_last and not use_channels_last(model, (spec.channels, *spec.input_size), True, device):
        cfg = replace(cfg, channels_last=False)
    model = model.to(device)
    if cfg.channels_last:
        model = model.to(memory_format=torch.channels_last)
    return model, spec, model_kwargs, cfg


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
    position: EpochPosition | None = None,
    after_step: Callable[[int], None] | None = None,
) -> tuple[float, float, int]:
    """One pass over the objective's batches; returns (mean loss, training accuracy, optimiser step).

    ``targets`` (one probability row per image) replace the hard labels in the loss when given (FER+ soft
    targets); accuracy is always against the hard labels. Under torchrun each rank steps on its share of
    every global batch and the loss and accuracy are summed over all ranks. ``position`` keeps how far the
    epoch has got (a resumed one goes on from its ``done`` batches); ``after_step(step)`` runs after each
    optimiser step (:class:`MidEpochCheckpoint`).
    """
    process = process or Process()
    model.train()
    position = position if position is not None else EpochPosition(0)
    batches = epoch_batches(objective, labels, position)
    steps_per_epoch = len(images) // cfg.batch_size  # the lr schedule's unit, whatever the batch composition
    bar = tqdm(batches[position.done :], desc=desc, leave=False, dynamic_ncols=True, mininterval=2,
               initial=position.done, total=len(batches), disable=not process.is_main)  # fmt: skip
    for idx in bar:
        y = labels[idx]
        apply_lr(optimizer.param_groups, get_lr(cfg, step, steps_per_epoch, val_accs))
        loss, logits = objective.train_step(model, optimizer, images[idx], y if targets is None else targets[idx])
        if ema is not None:
            ema.update_parameters(model.module if isinstance(model, DDP) else model)
        step += 1
        y = objective.context.shard(y)  # the faces this rank stepped on
        position.total_loss += loss * len(y)
        position.correct += (logits.argmax(1) == y).sum().item()
        position.seen += len(y)
        position.done += 1
        bar.set_postfix(loss=f"{position.total_loss / position.seen:.3f}",
                        acc=f"{position.correct / position.seen:.3f}", refresh=False)  # fmt: skip
        if after_step is not None:
            after_step(step)
    total_loss, correct, seen = all_reduce_sum([position.total_loss, position.correct, position.seen], process)
    return total_loss / seen, correct / seen, step


def epoch_batches(objective: CrossEntropy, labels: torch.Tensor, position: EpochPosition) -> list[torch.Tensor]:
    """The epoch's batches, drawn now (the generator's state before the draw kept in ``position``), or, for an
    epoch resumed in its middle, the same batches drawn again from that state, the generator then set back to
    the state it was saved in."""
    generator = objective.generator
    if position.batches_rng is None:
        position.batches_rng = generator.get_state()
        return objective.batches(labels)
    saved = generator.get_state()
    generator.set_state(position.batches_rng)
    batches = objective.batches(labels)
    generator.set_state(saved)
    return batches


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


def _stop_early(cfg: TrainConfig, progress: Progress, epoch: int) -> bool:
    """Whether ``cfg.early_stop`` epochs have passed without a better validation accuracy."""
    if not cfg.early_stop or epochs_without_improvement(progress.val_accs) < cfg.early_stop:
        return False
    log.info("early stop before epoch %d: no better %s accuracy for %d epochs (best %.4f at epoch %d)",
             epoch, cfg.val_split, cfg.early_stop, progress.best["val_acc"], progress.best["epoch"])  # fmt: skip
    return True


def _log_epoch(cfg: TrainConfig, row: dict, progress: Progress) -> None:
    """The epoch's figures, the best so far and an ETA (:func:`eta_seconds`)."""
    eta = eta_seconds([h["seconds"] for h in progress.history], cfg.epochs - row["epoch"])
    log.info(
        "epoch %d/%d  train loss %.4f acc %.4f  %s loss %.4f acc %.4f  best %.4f (epoch %d)  %.0f s  ETA %s",
        row["epoch"], cfg.epochs, row["train_loss"], row["train_acc"], cfg.val_split, row["val_loss"], row["val_acc"],
        progress.best["val_acc"], progress.best["epoch"], row["seconds"], _duration(eta),
    )  # fmt: skip


def eta_seconds(epoch_seconds: list[float], remaining: int) -> float:
    """Seconds left for ``remaining`` epochs at the median pace of the last five: one epoch slowed by a paused
    process or a test run beside it does not multiply the estimate (the mean of the five did, by up to 4×)."""
    recent = epoch_seconds[-5:]
    return remaining * float(np.median(recent)) if recent else 0.0


def _duration(seconds: float) -> str:
    """3725 → '1h02m'; 95 → '1m35s'."""
    minutes, secs = divmod(int(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m" if hours else f"{minutes}m{secs:02d}s"
