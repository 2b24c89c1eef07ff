"""The training configuration, defined once: ``TrainConfig`` with its nested ``AugmentConfig`` and
``ObjectiveConfig``, and ``SRPretrainConfig``.

Everything else is generated from these fields: ``mien train``'s flags (``training/cli.py``: name →
``--kebab-name``, type from the annotation, help, choices and group from the field's metadata, default
from the field), the TOML recipes (``training/recipe.py``) and the ``train_config`` a checkpoint and a
model card record. A new field is a new flag and a new recipe key with nothing else to edit.

Field names and defaults are a file format: runs in progress resume from ``last.pt`` files that hold
them, and cards and recipes name them. Stdlib and numpy only, so that building ``mien``'s parser (for
``--help`` or ``mien serve``) never imports torch.
"""

from __future__ import annotations

import dataclasses
import typing
from dataclasses import MISSING, asdict, dataclass, fields
from typing import Any

from mien.paths import DEFAULT_DATA
from mien.training.data import VAL_FRACTION, VAL_SEED
from mien.training.ferplus import LABEL_SOURCES, TARGETS
from mien.training.schedule import SCHEDULES

OPTIMIZERS = ("adam", "sgd")
#: auto: bf16 where the device computes it natively, fp32 elsewhere (training/hardware.py, resolve_amp).
AMP_MODES = ("none", "bf16", "fp16", "auto")
#: pretrain-sr runs on the CPU only: no fp16 (it needs a GPU's GradScaler).
SR_AMP_MODES = ("none", "bf16", "auto")
DEVICES = ("auto", "cpu", "cuda")

SCHEDULE = "schedule, early stopping, clipping (training/schedule.py)"
DISTILLATION = "distillation (training/distill.py)"


def option(
    default: Any = MISSING,
    help: str = "",
    *,
    factory: Any = MISSING,
    choices: tuple[str, ...] = (),
    group: str = "",
    show_default: bool = True,
) -> Any:
    """A dataclass field that carries its flag's help, choices and help group in its metadata.

    ``show_default=False`` when the help says what the default means better than the value would.
    """
    metadata = {"help": help, "choices": choices, "group": group, "show_default": show_default}
    return dataclasses.field(default=default, default_factory=factory, metadata=metadata)


@dataclass(frozen=True)
class AugmentConfig:
    flip: bool = option(True, "mirror each face left-right with probability 1/2")
    rotation_deg: float = option(10.0, "rotate by a uniform angle within ±this many degrees")
    shift: float = option(0.1, "translate by up to this fraction of the image size")
    zoom: float = option(0.1, "scale uniformly within 1 ± zoom")
    crop: int = option(0, "train on random crop×crop windows of the face at its own scale; 0 = the whole face")
    erasing: float = option(0.0, "probability of random erasing (Zhong et al. 2020): a noise rectangle per face")
    mixup: float = option(0.0, "α of mixup's Beta(α, α) (Zhang et al. 2018); 0 = off")
    cutmix: float = option(0.0, "α of CutMix's Beta(α, α) (Yun et al. 2019); 0 = off; with both, each batch picks one")


@dataclass(frozen=True)
class ObjectiveConfig:
    triplet_weight: float = option(1.0, "λ of the triplet loss beside cross-entropy, stn_resnet10_triplet's objective")
    triplet_margin: float = option(0.2, "triplet margin, in chord distance between unit embeddings: 0 to 2")
    triplet_per_class: int = option(8, "K: at least K faces of each class in a balanced batch")
    occlusion_prob: float = option(0.5, "share of training faces given a grey patch, triplet objective")
    occlusion_area: float = option(0.25, "the patch's share of the face area")
    sgan_unsupervised_weight: float = option(1.0, "weight of the real-vs-fake loss in the sgan discriminator's loss")


@dataclass
class TrainConfig:
    data: str = option(DEFAULT_DATA, "fer2013.csv, fer2013.npz or image-folder root")
    model: str = option("mini_xception", "model id, see `mien train --list-models`")
    # `mien train` puts a run without --out or a recipe's `out` in runs/<model>, whatever the model
    out: str = option("runs/mini_xception", "run folder (default runs/<model>)", show_default=False)
    epochs: int = option(100, "epochs to train; the schedule spans them all")
    batch_size: int = option(64, "the global batch, over all torchrun processes")
    lr: float = option(2e-3, "peak learning rate, reached after the warm-up; then the schedule")
    optimizer: str = option("adam", "adam, or sgd with Nesterov momentum", choices=OPTIMIZERS)
    momentum: float = option(0.9, "sgd's momentum")
    ema: float = option(
        0.0, "decay of an exponential moving average of the weights (e.g. 0.999), which validation scores and "
        "best.pt keeps; 0 = off"
    )  # fmt: skip
    teacher: str = option(
        "", "distil from these frozen models: comma-separated .onnx files or best.pt checkpoints", group=DISTILLATION
    )
    distill_temperature: float = option(4.0, "T softening teachers and student in the KL term", group=DISTILLATION)
    distill_weight: float = option(0.5, "α: loss = (1-α)·CE + α·T²·KL; 0 = plain cross-entropy", group=DISTILLATION)
    warmup_epochs: int = option(2, "linear warm-up before the schedule")
    weight_decay: float = option(1e-4, "the optimiser's weight decay")
    label_smoothing: float = option(0.05, "label smoothing of the cross-entropy")
    train_split: str = option("train", "the split of --data that training fits")
    # "val" is carved, not the test set, so that selecting best.pt and stopping early never see PublicTest
    val_split: str = option(
        "val", "the split that selects best.pt and stops early; val = a stratified --val-fraction of "
        "--train-split carved with --val-seed, the same on every run"
    )  # fmt: skip
    val_fraction: float = option(VAL_FRACTION, "share of each class of --train-split carved into the val split")
    val_seed: int = option(VAL_SEED, "seed of the carve; fixed, not --seed, so every run and model sees the same split")
    seed: int = option(0, "seed of the initialisation, batch order and augmentation")
    threads: int = option(0, "torch CPU threads per process; 0 = torch's default")
    channels_last: bool = option(
        True, "channels-last memory layout (~1.8x faster on CPU for mini-Xception, docs/training.md); NCHW where "
        "torch 2.13 CPU would crash"
    )  # fmt: skip
    limit: int = option(0, "use only the first N training images, for smoke tests; 0 = all")
    checkpoint_minutes: float = option(
        2.0, "also write last.pt every this many minutes inside an epoch, so that a run stopped mid-epoch "
        "resumes from its last such step, exactly as if it had not stopped; 0 = at the end of each epoch only "
        "(a write takes well under a second, so a SIGKILL costs at most this many minutes of training)"
    )  # fmt: skip
    augment: AugmentConfig = option(help="augmentation (training/transforms.py)", factory=AugmentConfig)
    objective: ObjectiveConfig = option(help="objective options (see training/objectives.py)", factory=ObjectiveConfig)
    labels: tuple[str, ...] | None = option(
        None, "train on these classes only, in this output order, e.g. angry,sad,happy,fear,neutral (default all)"
    )
    label_map: dict[str, str] = option(
        help="rename or merge classes before --labels picks, e.g. surprise=happy", factory=dict
    )
    model_kwargs: dict = option(
        help='builder options as JSON, e.g. \'{"sr_kwargs": {"num_blocks": 16, "features": 128}}\'', factory=dict
    )
    sr_init: str = option("", "SR front end weights from `mien pretrain-sr` (sr_cnn, stn_sr_cnn)")
    freeze_sr: bool = option(False, "keep the --sr-init front end fixed, as recommended on CPU")
    init: str = option(
        "", "warm start from a best.pt: copy its layers that match by name and shape (e.g. base_cnn's classifier "
        "into sr_cnn)"
    )  # fmt: skip
    stn_reg: float = option(
        0.0, "weight of the spatial transformer's pull to the identity warp, mean ‖θ − I‖² added to the loss "
        "(models with an STN only; 0 = off, as every recipe written before it; issue 17's arms use 0.01)"
    )  # fmt: skip
    # the STN paper trains its localisation net slower than the classifier: at the classifier's rate it jumps out of
    # the image within tens of steps and its gradient dies (docs/training.md, issue 17's plan)
    stn_lr_scale: float = option(
        1.0, "the spatial transformer's learning rate as a multiple of the scheduled rate, through warm-up and "
        "schedule (models with an STN only; 1 = the classifier's rate, as every recipe written before it)"
    )  # fmt: skip
    # issue 17: "pre-train it to convergence, then train the classifier behind it; fine-tune SR jointly for the last
    # epochs". A fixed front end also costs no backward pass through it (28% of an +SR epoch, docs/training.md).
    sr_finetune_epochs: int = option(
        0, "with --sr-init: keep the SR front end fixed until the last N epochs, then train it with the classifier "
        "(at --sr-lr-scale); 0 = train it from the first epoch, as every recipe written before it"
    )  # fmt: skip
    sr_lr_scale: float = option(
        1.0, "the SR front end's learning rate as a multiple of the scheduled rate, e.g. 0.1 to fine-tune an "
        "--sr-init net gently (1 = the classifier's rate, as every recipe written before it; --freeze-sr: none)"
    )  # fmt: skip
    label_source: str = option(
        "fer2013", "FER2013's labels, or the FER+ votes: 8 FER+ classes (ferplus) or FER2013's 7 (ferplus7, "
        "contempt votes dropped); see training/ferplus.py", choices=LABEL_SOURCES
    )  # fmt: skip
    ferplus_votes: str = option("", "FER+ votes csv (default: ferplus_votes.csv beside --data)")
    ferplus_target: str = option(
        "majority", "majority: train on the majority label; soft: on the distribution of the votes",
        choices=TARGETS,
    )  # fmt: skip
    schedule: str = option("cosine", "the learning rate after warm-up", choices=SCHEDULES, group=SCHEDULE)
    lr_step_epochs: int = option(30, "step: epochs between cuts", group=SCHEDULE)
    lr_step_gamma: float = option(0.1, "step: the cut", group=SCHEDULE)
    plateau_patience: int = option(5, "plateau: epochs without a better val_acc before a cut", group=SCHEDULE)
    plateau_factor: float = option(0.5, "plateau: the cut", group=SCHEDULE)
    early_stop: int = option(0, "stop after N epochs without a better val_acc; 0 = never", group=SCHEDULE)
    grad_clip: float = option(0.0, "max global L2 norm of the gradients; 0 = off", group=SCHEDULE)
    amp: str = option(
        "none", "mixed precision: bf16 autocast (CPU or GPU), fp16 autocast + GradScaler (GPU only), auto = bf16 "
        "where the device computes it natively (a GPU with bf16; a CPU with AMX or AVX-512 BF16), fp32 elsewhere; "
        "see docs/training.md for what bf16 does on a CPU", choices=AMP_MODES
    )  # fmt: skip
    device: str = option("auto", "auto = this rank's GPU if any, else the CPU", choices=DEVICES)


@dataclass
class SRPretrainConfig:
    data: str = option(DEFAULT_DATA, "fer2013.csv, fer2013.npz or image-folder root")
    out: str = option("runs/sr_pretrain/sr.pt", "the checkpoint that `mien train --sr-init` points at")
    sr_kwargs: dict = option(help="EDSR options over EDSR_SMALL, e.g. '{\"num_blocks\": 16}'", factory=dict)
    epochs: int = option(5, "epochs to train")
    batch_size: int = option(64, "faces per step")
    lr: float = option(1e-3, "Adam learning rate, cosine decay to 0 over the run")
    train_split: str = option("train", "the split whose faces the SR net learns from")
    # "val", as in `mien train`: the faces the classifiers are selected on are held out of SR's training too, and
    # PublicTest stays the test set. Recipes written before it said public_test (the default then), which only
    # reported there and trained on all of Training.
    val_split: str = option(
        "val", "the split its L1 is reported on each epoch; val = the stratified --val-fraction of --train-split "
        "carved with --val-seed, exactly as `mien train` carves it, and left out of SR training"
    )  # fmt: skip
    val_fraction: float = option(VAL_FRACTION, "share of each class of --train-split carved into the val split")
    val_seed: int = option(VAL_SEED, "seed of the carve; fixed, so the SR net never learns from mien train's val faces")
    seed: int = option(0, "seed of the initialisation, batch order and flips")
    threads: int = option(0, "torch CPU threads; 0 = torch's default")
    # Off by default so that every SR command written before them still reproduces its network; issue 17's
    # pre-training uses both (~1.9x faster a step on the 2-core AMD EPYC with AVX-512 BF16, docs/training.md).
    channels_last: bool = option(False, "channels-last memory layout for the EDSR's training steps")
    amp: str = option(
        "none", "bf16 autocast for the training steps (validation and the checkpoint stay fp32); auto = bf16 on a "
        "CPU with AMX or AVX-512 BF16, fp32 elsewhere", choices=SR_AMP_MODES
    )  # fmt: skip
    limit: int = option(0, "use only the first N training faces, for smoke tests; 0 = all")


def nested_configs(cls: type = TrainConfig) -> dict[str, type]:
    """The fields of ``cls`` that are themselves configs (a recipe's tables), by name."""
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in fields(cls) if dataclasses.is_dataclass(hints[f.name])}


def leaf_fields(cls: type = TrainConfig) -> list[tuple[str | None, dataclasses.Field, Any]]:
    """Every option of ``cls`` as (nested config it sits in or None, field, resolved type), in field order.

    Nested configs are flattened: their fields are options like any other (``--mixup``, ``--triplet-weight``).
    """
    hints, nested = typing.get_type_hints(cls), nested_configs(cls)
    leaves = []
    for f in fields(cls):
        if f.name in nested:
            inner = typing.get_type_hints(nested[f.name])
            leaves += [(f.name, g, inner[g.name]) for g in fields(nested[f.name])]
        else:
            leaves.append((None, f, hints[f.name]))
    return leaves


def config_from_dict(values: dict, base: TrainConfig | None = None) -> TrainConfig:
    """A TrainConfig from ``base`` (default: the defaults) with ``values`` on top; unknown keys are an error.

    ``values`` is shaped like a recipe: nested options as dicts (``{"augment": {"mixup": 0.2}}``), which
    update the base's nested options rather than replace them.
    """
    base = base or TrainConfig()
    known = {f.name for f in fields(TrainConfig)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise ValueError(f"unknown training option(s) {unknown}; known: {sorted(known)}")
    nested = nested_configs()
    merged = asdict(base)
    for key, value in values.items():
        if key in nested and value is not None:
            inner = {f.name for f in fields(nested[key])}
            bad = sorted(set(value) - inner)
            if bad:
                raise ValueError(f"unknown {key} option(s) {bad}; known: {sorted(inner)}")
            merged[key] = {**merged[key], **value}
        else:
            merged[key] = value
    for key, cls in nested.items():
        merged[key] = cls(**merged[key])
    if merged["labels"] is not None:
        merged["labels"] = tuple(merged["labels"])
    return TrainConfig(**merged)
