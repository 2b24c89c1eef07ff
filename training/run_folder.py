"""The run folder ``mien train`` writes, and how a run resumes from it.

``last.pt`` holds what an interrupted run needs to continue exactly as if it had not stopped (weights,
optimiser, the batch/augmentation generator, torch's RNG, the objective's own state, the EMA, the
history), written at the end of every epoch and, every ``checkpoint_minutes``, in the middle of one (with
``epoch_position``: how far into the epoch, so a resume draws the same batches and goes on from the next);
``best.pt`` the served weights and what export needs to rebuild the model. Both also hold the model id and
kwargs, spec, train config, objective, notes, command, history, best metrics and recipe. The key names are
a file format: runs started by older code resume from their ``last.pt``, so a key is never renamed or
dropped. ``history.jsonl`` gets one line per epoch, ``train.log`` the log, ``curves.png`` the curves.
"""

from __future__ import annotations

import json
import logging
import shlex
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn as nn
from torch.optim.swa_utils import AveragedModel

from mien.spec import PreprocessSpec
from mien.training.config import TrainConfig
from mien.training.curves import plot_curves
from mien.training.objectives import CrossEntropy

log = logging.getLogger("mien.train")


def command_line(subcommand: str) -> str:
    """``mien <subcommand>`` with the options this process was given, for a checkpoint to record ("" without any
    argument: not run from a command line)."""
    return f"mien {subcommand} " + shlex.join(sys.argv[2:]) if len(sys.argv) > 1 else ""


@contextmanager
def run_log(out: Path, is_main: bool) -> Iterator[None]:
    """Log the run's progress to ``<out>/train.log``, from rank 0 only (the others log warnings alone)."""
    handler = None
    if is_main:
        out.mkdir(parents=True, exist_ok=True)
        handler = logging.FileHandler(out / "train.log")
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
        log.addHandler(handler)
    log.setLevel(logging.INFO if is_main else logging.WARNING)
    try:
        yield
    finally:
        if handler is not None:  # also after an interrupted run, so a resume in this process logs each line once
            log.removeHandler(handler)
            handler.close()


@dataclass
class EpochPosition:
    """How far an epoch under way has got: ``last.pt`` written in the middle of epoch ``epoch`` holds it, so that
    a resume draws the epoch's batches again from the generator's state before they were drawn
    (``batches_rng``), skips the ``done`` ones and goes on with the saved weights, optimiser, EMA and RNG
    states, as if it had not stopped. The running sums of the epoch's training loss and accuracy and the
    seconds it has taken come along, so its history line is the whole epoch's. (Under torchrun they are rank
    0's, which writes the file; the weights are every rank's.)"""

    epoch: int
    batches_rng: torch.Tensor | None = None
    done: int = 0
    total_loss: float = 0.0
    correct: int = 0
    seen: int = 0
    seconds: float = 0.0
    cpu_seconds: float = 0.0


@dataclass
class Progress:
    """Where a run stands: every epoch's figures, the best epoch's metrics, the optimiser step, and how far
    into the next epoch ``last.pt`` was written (None: at its start)."""

    history: list[dict] = field(default_factory=list)
    best: dict = field(default_factory=lambda: {"val_acc": -1.0})
    step: int = 0
    position: EpochPosition | None = None

    @property
    def start_epoch(self) -> int:
        return self.history[-1]["epoch"] + 1 if self.history else 1

    @property
    def val_accs(self) -> list[float]:
        return [h["val_acc"] for h in self.history]

    def record(self, row: dict, metrics: dict, split: str) -> bool:
        """Add an epoch's row; return whether its validation accuracy is the best so far."""
        self.history.append(row)
        improved = metrics["val_acc"] > self.best["val_acc"]
        if improved:
            self.best = {**metrics, "epoch": row["epoch"], "split": split}
        return improved


def save(obj: dict, path: Path) -> None:
    tmp = path.with_suffix(".tmp")
    torch.save(obj, tmp)
    tmp.replace(path)  # atomic: a run killed mid-save never leaves a broken checkpoint


@dataclass
class RunFolder:
    """What a run's checkpoints are made of, and where they go."""

    out: Path
    cfg: TrainConfig
    spec: PreprocessSpec
    model_kwargs: dict
    model: nn.Module
    objective: CrossEntropy
    optimizer: torch.optim.Optimizer
    generator: torch.Generator
    ema: AveragedModel | None = None
    recipe: str = ""  # the configs/<model>.toml the config came from; the exported card names it

    @property
    def served(self) -> nn.Module:
        """The weights validation scores and best.pt keeps (so export serves them): the EMA copy if any."""
        return self.ema.module if self.ema is not None else self.model

    def resume(self, device: torch.device) -> Progress:
        """Load ``last.pt`` into the run's parts and return its progress; a fresh start when there is none."""
        last = self.out / "last.pt"
        if not last.exists():
            return Progress()
        state = torch.load(last, map_location=device, weights_only=False)
        self.model.load_state_dict(state["state_dict"])
        saved = [g.get("lr_scale", 1.0) for g in state["optimizer"]["param_groups"]]
        asked = [g.get("lr_scale", 1.0) for g in self.optimizer.param_groups]
        if saved != asked:  # the loaded groups would silently keep the run's scales, or fail to load
            raise ValueError(
                f"{last} trained its parameter groups at learning-rate scales {saved}; this run asks {asked}: "
                "resume with the run's stn_lr_scale/sr_lr_scale or use a new --out"
            )
        self.optimizer.load_state_dict(state["optimizer"])
        self.generator.set_state(state["generator"].cpu())
        torch.set_rng_state(state["torch_rng"].cpu())
        self.objective.load_state_dict(state.get("objective_state", {}))
        if self.ema is not None:
            self.ema.load_state_dict(state["ema"])
        progress = Progress(state["history"], state["metrics"], state["step"])
        position = state.get("epoch_position")  # absent: written at the end of an epoch (or by older code)
        if position is not None and position["epoch"] == progress.start_epoch:
            progress.position = EpochPosition(**position)
        log.info("resuming from %s at epoch %d%s", last, progress.start_epoch,
                 f", after {progress.position.done} of its batches" if progress.position else "")  # fmt: skip
        return progress

    def write_epoch(self, row: dict, improved: bool, progress: Progress) -> None:
        """The epoch's line in history.jsonl, best.pt when it improved, last.pt and the curves."""
        with (self.out / "history.jsonl").open("a") as fh:
            fh.write(json.dumps(row) + "\n")
        recipe_note = {"recipe": self.recipe} if self.recipe else {}
        if improved:
            save(self.checkpoint(self.served, progress, recipe_note), self.out / "best.pt")
        save(self.checkpoint(self.model, progress, self.resume_state(progress.step)), self.out / "last.pt")
        plot_curves(progress.history, self.out / "curves.png")

    def write_position(self, progress: Progress, step: int, position: EpochPosition) -> None:
        """``last.pt`` in the middle of an epoch, after optimiser step ``step``: the weights and states of now,
        ``position`` saying how far into the epoch they are."""
        extra = {**self.resume_state(step), "epoch_position": asdict(position)}
        save(self.checkpoint(self.model, progress, extra), self.out / "last.pt")

    def resume_state(self, step: int) -> dict:
        """What ``last.pt`` holds beyond the weights. The RNG states are read now, after the last draw, so that
        a resume continues from exactly here."""
        return {
            "optimizer": self.optimizer.state_dict(), "generator": self.generator.get_state(), "step": step,
            "torch_rng": torch.get_rng_state(), "objective_state": self.objective.state_dict(),
            **({"ema": self.ema.state_dict()} if self.ema is not None else {}),
            **({"recipe": self.recipe} if self.recipe else {}),
        }  # fmt: skip

    def checkpoint(self, model: nn.Module, progress: Progress, extra: dict) -> dict:
        """``model``'s weights with everything needed to rebuild it, and ``extra`` keys."""
        return {
            "model_id": self.cfg.model,
            "model_kwargs": self.model_kwargs,
            "spec": self.spec.to_dict(),
            "state_dict": model.state_dict(),
            "train_config": asdict(self.cfg),
            "objective": self.objective.name,
            "notes": self.objective.notes,
            "command": command_line("train"),
            "history": progress.history,
            "metrics": progress.best,
            **extra,
        }
