"""What a training run refuses before it starts: the combinations an objective or a device cannot train in.

Every check names the flag to change, so a run that cannot work fails in its first second, not hours in.
"""

from __future__ import annotations

from mien.training.config import OPTIMIZERS, TrainConfig
from mien.training.hardware import Process, check_amp
from mien.training.objectives import CrossEntropy
from mien.training.schedule import SCHEDULES

#: Objectives whose loss takes a probability row per face (FER+ soft targets) as well as a class index.
SOFT_TARGET_OBJECTIVES = ("cross_entropy", "ten_crop")


def check_supported(cfg: TrainConfig, objective: CrossEntropy, process: Process, soft_targets: bool) -> None:
    """Refuse, with the reason, the combinations an objective cannot train in."""
    check_amp(cfg.amp, process.device)
    if cfg.schedule not in SCHEDULES:
        raise ValueError(f"--schedule must be one of {SCHEDULES}, got {cfg.schedule!r}")
    if soft_targets and objective.name not in SOFT_TARGET_OBJECTIVES:
        raise ValueError(f"{cfg.model} trains with the {objective.name} objective, which needs hard labels; "
                         "use --ferplus-target majority")  # fmt: skip
    if objective.name == "sgan":
        _check_sgan(cfg, process)
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
    if cfg.stn_lr_scale <= 0 or cfg.sr_lr_scale <= 0:
        raise ValueError(f"--stn-lr-scale and --sr-lr-scale multiply the learning rate and must be positive, got "
                         f"{cfg.stn_lr_scale} and {cfg.sr_lr_scale} (--freeze-sr fixes the SR front end)")  # fmt: skip
    if cfg.sr_finetune_epochs:
        if cfg.sr_finetune_epochs < 0 or not cfg.sr_init or cfg.freeze_sr:
            raise ValueError("--sr-finetune-epochs N fixes an --sr-init front end until the last N epochs; it needs "
                             f"--sr-init, N >= 0 and no --freeze-sr (got {cfg.sr_finetune_epochs})")  # fmt: skip
        if process.distributed:
            raise ValueError("--sr-finetune-epochs changes which parameters train during the run, which "
                             "DistributedDataParallel does not follow; train it in one process")  # fmt: skip
    if not cfg.checkpoint_minutes >= 0:  # NaN too
        raise ValueError(f"--checkpoint-minutes is how often last.pt is written inside an epoch: >= 0 minutes "
                         f"(0: at the end of each epoch only), got {cfg.checkpoint_minutes}")  # fmt: skip
    if process.distributed and cfg.batch_size % process.world_size:
        raise ValueError(f"--batch-size {cfg.batch_size} (the global batch) must divide evenly over "
                         f"{process.world_size} processes")  # fmt: skip


def _check_sgan(cfg: TrainConfig, process: Process) -> None:
    """The SGAN's own two-optimiser step runs in one fp32 CPU process only."""
    asked = [what for what, on in (("torchrun (several processes)", process.distributed),
                                   (f"--amp {cfg.amp}", cfg.amp != "none"), ("--grad-clip", cfg.grad_clip > 0),
                                   (f"device {process.device}", process.device.type != "cpu")) if on]  # fmt: skip
    if asked:
        raise ValueError(f"the sgan objective takes its own two-optimiser step in one fp32 CPU process; "
                         f"it does not support {', '.join(asked)}")  # fmt: skip
