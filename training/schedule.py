"""Learning-rate schedules and early stopping, as pure functions of the step and the run's history.

Everything here is computed from the optimiser step and the validation history that ``last.pt``
already saves, so a resumed run follows exactly the schedule of an uninterrupted one.

* ``cosine`` (default): linear warm-up, then cosine decay to 0 at the last epoch.
* ``step``: linear warm-up, then the rate is multiplied by ``lr_step_gamma`` every ``lr_step_epochs``.
* ``plateau``: linear warm-up, then the rate is multiplied by ``plateau_factor`` whenever validation
  accuracy has not improved for ``plateau_patience`` epochs (like ``ReduceLROnPlateau`` in max mode).
* early stopping: stop when validation accuracy has not improved for ``early_stop`` epochs.

An optimiser group may carry an ``lr_scale`` (the spatial transformer's and the SR front end's, see
``param_groups`` in ``training/objectives.py``): :func:`apply_lr` gives it that multiple of the scheduled
rate at every step, so warm-up and decay move all groups together and keep their ratios.
"""

from __future__ import annotations

import math

SCHEDULES = ("cosine", "step", "plateau")


def plateau_scale(val_accs: list[float], patience: int, factor: float) -> float:
    """The plateau schedule's multiplier after these epochs' validation accuracies."""
    scale, best, bad = 1.0, -math.inf, 0
    for acc in val_accs:
        if acc > best:
            best, bad = acc, 0
        else:
            bad += 1
            if bad > patience:
                scale, bad = scale * factor, 0
    return scale


def get_lr(cfg, step: int, steps_per_epoch: int, val_accs: list[float] = ()) -> float:
    """The learning rate of optimiser step ``step`` (0-based) under ``cfg.schedule``."""
    warmup = cfg.warmup_epochs * steps_per_epoch
    if step < warmup:
        return cfg.lr * (step + 1) / warmup
    if cfg.schedule == "cosine":
        progress = (step - warmup) / max(1, cfg.epochs * steps_per_epoch - warmup)
        return cfg.lr * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
    if cfg.schedule == "step":
        return cfg.lr * cfg.lr_step_gamma ** ((step - warmup) // max(1, cfg.lr_step_epochs * steps_per_epoch))
    if cfg.schedule == "plateau":
        return cfg.lr * plateau_scale(list(val_accs), cfg.plateau_patience, cfg.plateau_factor)
    raise ValueError(f"unknown learning-rate schedule {cfg.schedule!r}; choose one of {SCHEDULES}")


def apply_lr(param_groups: list[dict], lr: float) -> None:
    """Set each optimiser group's rate to ``lr`` × its ``lr_scale`` (1 when absent, as in every optimiser and
    last.pt made before the scales)."""
    for group in param_groups:
        group["lr"] = lr * group.get("lr_scale", 1.0)


def epochs_without_improvement(val_accs: list[float]) -> int:
    """Epochs since the best validation accuracy (0 when the last epoch was the best)."""
    if not val_accs:
        return 0
    return len(val_accs) - 1 - max(range(len(val_accs)), key=lambda i: (val_accs[i], -i))
