"""Per-model training objectives: what one training step and one validation pass mean for each pipeline.

The loop in ``train.py`` is the same for every model; what differs between the papers lives here, one
small class per objective, chosen by model id in :data:`OBJECTIVES` (a model id not listed trains with
the default :class:`CrossEntropy`):

* ``cross_entropy`` (default; mini_xception, base/stn/sr/stn_sr_cnn, se_sepconv, row_lstm): label-smoothed
  cross-entropy. ``row_lstm`` runs in fp32 whatever the loop does: its forward disables autocast
  because oneDNN has no bf16 LSTM on these CPUs, so it needs nothing of its own here.
* ``triplet`` (stn_resnet10_triplet): cross-entropy on the logits + λ · batch-hard triplet loss on the
  L2-normalised embedding, over class-balanced batches, with random-occlusion augmentation.
* ``ten_crop`` (dcnn): trains on one random 42×42 ten-crop view of each augmented 48×48 face; validates
  on the single resized view the exported model sees, and reports ten-crop averaging beside it.
* ``sgan`` (sgan): semi-supervised GAN; the discriminator learns the classes, real-vs-fake, and the
  generator learns by feature matching (Salimans et al., 2016), each with its own optimiser.

Every objective adds ``stn_reg`` · mean ‖θ − I‖² to the loss of a model with a spatial transformer
(``training/layers/stn.py``), so the warp starts at the identity and stays near it unless moving pays; the
epoch's mean penalty (``stn_penalty``) and what the warps do to the validation faces (``stn_scale``,
``stn_rotation_deg``, ``stn_translation``) go into the run's history. Every optimiser is built on
:func:`param_groups`, which gives the spatial transformer and the SR front end their own learning-rate scale.

Every random draw comes from the run's ``torch.Generator`` (or the seeded global RNG), whose states
``last.pt`` saves, so resuming a run reproduces the uninterrupted one exactly.
"""

from __future__ import annotations

from contextlib import AbstractContextManager
from dataclasses import dataclass, field, replace

import torch
import torch.nn as nn
import torch.nn.functional as F

from mien.spec import PreprocessSpec
from mien.training.distill import distillation_loss, load_teachers, teacher_targets
from mien.training.hardware import in_layout
from mien.training.layers import EDSR, SpatialTransformer
from mien.training.layers.stn import affine_stats, has_spatial_transformer, identity_penalty, recorded_thetas
from mien.training.losses import batch_hard_triplet_loss, feature_matching_loss, sgan_discriminator_loss
from mien.training.occlusion import random_occlusion
from mien.training.sampling import balanced_batches, shuffled_batches
from mien.training.tencrop import FACE_SIZE, random_ten_crop, ten_crop_logits
from mien.training.transforms import build_transforms, mix_batch


@dataclass(frozen=True)
class StepContext:
    """How a training step runs, beside what it computes: device, precision, clipping, data-parallel share.

    ``amp``: ``none`` (fp32), ``bf16`` (autocast to bfloat16, CPU or GPU) or ``fp16`` (autocast to float16
    with a GradScaler; GPU only). ``grad_clip``: the max global L2 norm of the gradients (0 = off).
    Under torchrun every rank draws and augments the same global batch and steps on its own share of
    it (every ``world_size``-th face from position ``rank``), so one global batch means the same faces
    and the same augmentation whatever the number of processes.
    """

    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    amp: str = "none"
    grad_clip: float = 0.0
    rank: int = 0
    world_size: int = 1

    def autocast(self) -> AbstractContextManager:
        dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(self.amp)
        return torch.autocast(self.device.type, dtype=dtype, enabled=dtype is not None)

    def shard(self, batch: torch.Tensor) -> torch.Tensor:
        """This rank's share of a global batch."""
        return batch if self.world_size == 1 else batch[self.rank :: self.world_size]


@torch.no_grad()
def predict_logits(
    model: nn.Module, images: torch.Tensor, transform, batch_size: int = 512, channels_last: bool = False
) -> torch.Tensor:
    """fp32 logits of ``images`` (uint8) through ``transform``; ``channels_last`` feeds a channels-last
    model its own layout (NCHW input makes every convolution convert, ~1.3x slower on CPU)."""
    model.eval()
    device = next(model.parameters()).device
    return torch.cat(
        [
            model(in_layout(transform(images[i : i + batch_size]).to(device), channels_last)).float().cpu()
            for i in range(0, len(images), batch_size)
        ]
    )


def param_groups(model: nn.Module, cfg) -> list[dict]:
    """``model``'s trainable parameters as optimiser groups, each with the ``lr_scale`` it steps at (a multiple of the
    scheduled rate, kept by ``schedule.apply_lr``): first everything at scale 1, then every spatial transformer's
    parameters at ``stn_lr_scale`` and the SR front end's at ``sr_lr_scale``, each in a group of its own only when
    its scale is not 1, so a run without scales has the one group it always had. Frozen parameters stay out.
    """
    scaled = [("stn", SpatialTransformer, getattr(cfg, "stn_lr_scale", 1.0)),
              ("sr", EDSR, getattr(cfg, "sr_lr_scale", 1.0))]  # fmt: skip
    groups = [{"name": "main", "params": [], "lr": cfg.lr, "lr_scale": 1.0}]
    owner: dict[int, dict] = {}  # id(parameter) → its group; the first claim wins, so none is listed twice
    for name, kind, scale in scaled:
        if scale == 1.0:
            continue
        group = {"name": name, "params": [], "lr": cfg.lr * scale, "lr_scale": scale}
        for module in (m for m in model.modules() if isinstance(m, kind)):
            for p in module.parameters():
                owner.setdefault(id(p), group)
        groups.append(group)
    for p in model.parameters():
        if p.requires_grad:
            owner.get(id(p), groups[0])["params"].append(p)
    return [g for g in groups if g["params"] or g["name"] == "main"]


class CrossEntropy:
    """Label-smoothed cross-entropy over shuffled batches: the default objective.

    Subclasses change one step at a time: ``batches`` (which faces form a batch), ``inputs`` (the
    augmented model input), ``loss``, ``train_step`` (for several optimisers) and ``validate``.
    """

    name = "cross_entropy"
    notes = ""
    context = StepContext()  # train() sets the run's; see set_context

    def __init__(self, cfg, spec: PreprocessSpec, model: nn.Module, generator: torch.Generator) -> None:
        self.cfg, self.spec, self.generator = cfg, spec, generator
        self.train_tf = build_transforms(spec, train=True, augment=cfg.augment, generator=generator)
        self.val_tf = build_transforms(spec, train=False)
        self.scaler = torch.amp.GradScaler("cpu", enabled=False)
        self.teachers = load_teachers(cfg.teacher, spec, cfg.threads, cfg.channels_last) if cfg.teacher else []
        self.has_stn = model is not None and has_spatial_transformer(model)
        self.stn_reg = getattr(cfg, "stn_reg", 0.0) if self.has_stn else 0.0
        self._stn_penalties: list[float] = []  # this epoch's, reported (and cleared) by validate

    def set_context(self, context: StepContext) -> None:
        self.context = context
        self.scaler = torch.amp.GradScaler(context.device.type, enabled=context.amp == "fp16")

    def build_optimizer(self, model: nn.Module) -> torch.optim.Optimizer:
        params = param_groups(model, self.cfg)  # frozen front ends stay out
        if self.cfg.optimizer == "sgd":
            return torch.optim.SGD(
                params, lr=self.cfg.lr, momentum=self.cfg.momentum, nesterov=True, weight_decay=self.cfg.weight_decay
            )
        return torch.optim.Adam(params, lr=self.cfg.lr, weight_decay=self.cfg.weight_decay)

    @property
    def mixes(self) -> bool:
        """Whether batches are mixed (mixup/CutMix); only the plain cross-entropy objective supports it."""
        return self.cfg.augment.mixup > 0 or self.cfg.augment.cutmix > 0

    def batches(self, labels: torch.Tensor) -> list[torch.Tensor]:
        return shuffled_batches(len(labels), self.cfg.batch_size, self.generator)

    def inputs(self, images: torch.Tensor) -> torch.Tensor:
        x = self.train_tf(images)
        return in_layout(x, self.cfg.channels_last)

    def loss(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        logits = model(x)
        return F.cross_entropy(logits, y, label_smoothing=self.cfg.label_smoothing), logits

    def train_step(
        self, model: nn.Module, optimizer: torch.optim.Optimizer, images: torch.Tensor, y: torch.Tensor
    ) -> tuple[float, torch.Tensor]:
        """One optimiser step on this rank's share of the batch; returns (loss, that share's logits)."""
        ctx, cfg = self.context, self.cfg
        x = self.inputs(images)
        if self.mixes:  # mixed over the global batch, so every rank sees the same partners
            x, order, lam = mix_batch(x, cfg.augment, self.generator)
            y_mix = ctx.shard(y[order]).to(ctx.device)
        soft = None
        if self.teachers:  # a checkpoint teacher runs under the run's autocast (bf16: ~2.7x faster on CPU)
            with ctx.autocast():
                soft = ctx.shard(teacher_targets(self.teachers, x, cfg.distill_temperature))
        x, y = ctx.shard(x).to(ctx.device), ctx.shard(y).to(ctx.device)
        with ctx.autocast(), recorded_thetas(model, enabled=self.stn_reg > 0) as thetas:
            loss, logits = self.loss(model, x, y)
            if self.mixes:
                loss = lam * loss + (1 - lam) * F.cross_entropy(logits, y_mix, label_smoothing=cfg.label_smoothing)
            if soft is not None:
                loss = distillation_loss(logits, loss, soft, cfg.distill_temperature, cfg.distill_weight)
        optimizer.zero_grad(set_to_none=True)
        # the STN's penalty is optimised but reported apart (stn_penalty), so train_loss compares across arms
        self.backward_and_step(self.add_stn_penalty(loss, thetas), optimizer)
        return loss.item(), logits.detach().float().cpu()

    def add_stn_penalty(self, loss: torch.Tensor, thetas: list[torch.Tensor]) -> torch.Tensor:
        """``loss`` + ``stn_reg`` · the identity penalty of every θ the step's forward predicted (none: ``loss``)."""
        if not thetas:
            return loss
        penalty = sum(identity_penalty(theta) for theta in thetas)
        self._stn_penalties.append(penalty.item())
        return loss + self.stn_reg * penalty

    def stn_metrics(self, thetas: list[torch.Tensor]) -> dict[str, float]:
        """The epoch's mean identity penalty (then cleared) and what the warps ``thetas`` (predicted for the
        validation faces) do: mean scale, rotation and shift (see :func:`affine_stats`). Empty without an STN."""
        if not self.has_stn:
            return {}
        metrics = {}
        if self._stn_penalties:
            metrics["stn_penalty"] = sum(self._stn_penalties) / len(self._stn_penalties)
            self._stn_penalties.clear()
        if thetas:
            stats = affine_stats(torch.cat(thetas))
            metrics.update({f"stn_{k}": stats[k] for k in ("scale", "rotation_deg", "translation")})
        return metrics

    def backward_and_step(self, loss: torch.Tensor, optimizer: torch.optim.Optimizer) -> None:
        """Backward (scaled for fp16), clip the gradients' global norm if asked, step."""
        self.scaler.scale(loss).backward()
        if self.context.grad_clip > 0:
            self.scaler.unscale_(optimizer)
            params = [p for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
            torch.nn.utils.clip_grad_norm_(params, self.context.grad_clip)
        self.scaler.step(optimizer)
        self.scaler.update()

    def validate(self, model: nn.Module, images: torch.Tensor, labels: torch.Tensor) -> dict[str, float]:
        """``val_loss`` and ``val_acc`` (which selects best.pt), plus any objective-specific figures."""
        with recorded_thetas(model, enabled=self.has_stn) as thetas:
            logits = predict_logits(model, images, self.val_tf, channels_last=self.cfg.channels_last)
        return {
            "val_loss": F.cross_entropy(logits, labels).item(),
            "val_acc": (logits.argmax(1) == labels).float().mean().item(),
            **self.stn_metrics(thetas),
        }

    def state_dict(self) -> dict:
        """Trained state outside the served model and its optimiser (saved in last.pt for resume)."""
        state = {"grad_scaler": self.scaler.state_dict()} if self.scaler.is_enabled() else {}
        if self._stn_penalties:  # written in the middle of an epoch: the epoch's penalties so far
            state["stn_penalties"] = list(self._stn_penalties)
        return state

    def load_state_dict(self, state: dict) -> None:
        if "grad_scaler" in state and self.scaler.is_enabled():
            self.scaler.load_state_dict(state["grad_scaler"])
        self._stn_penalties = list(state.get("stn_penalties", []))


class TripletObjective(CrossEntropy):
    """CE on the logits + λ · batch-hard triplet loss on the embedding, on balanced, partly occluded faces."""

    name = "triplet"

    def batches(self, labels: torch.Tensor) -> list[torch.Tensor]:
        return balanced_batches(labels, self.cfg.batch_size, self.cfg.objective.triplet_per_class, self.generator)

    def inputs(self, images: torch.Tensor) -> torch.Tensor:
        x = self.train_tf(images)
        ocfg = self.cfg.objective
        if ocfg.occlusion_prob > 0:
            grey = (128 * self.spec.scale - self.spec.mean[0]) / self.spec.std[0]  # mid-grey after normalising
            occluded = random_occlusion(x, ocfg.occlusion_area, grey, self.generator)
            pick = torch.rand(len(x), generator=self.generator) < ocfg.occlusion_prob
            x = torch.where(pick[:, None, None, None], occluded, x)
        return in_layout(x, self.cfg.channels_last)

    def loss(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        logits, embedding = model.forward_both(x)
        ce = F.cross_entropy(logits, y, label_smoothing=self.cfg.label_smoothing)
        triplet = batch_hard_triplet_loss(embedding, y, margin=self.cfg.objective.triplet_margin)
        return ce + self.cfg.objective.triplet_weight * triplet, logits


class TenCropObjective(CrossEntropy):
    """Train on random ten-crop views; validate on what the exported model sees, report ten-crop beside it.

    Training: the shared augmentation runs on the 48×48 face, then one of its ten 42×42 views (four
    corners + centre, each mirrored) is the input. Validation: ``val_acc``/``val_loss`` come from the
    whole face resized to 42×42 — the single view that ``mien eval`` and the exported ONNX score, so
    best.pt is selected on the figure that is served; ``val_acc_tencrop`` averages the logits of the
    ten views, the paper's test protocol, which a one-view ONNX graph does not run. A gap between the
    two is the price of serving one view (the crops are at the face's native scale, the resize shrinks
    it by 42/48); ``mien export --ten-crop 42`` closes it by putting the ten views into the graph, which then
    takes the 48×48 face and scores ``val_acc_tencrop`` (the bundled dcnn, scripts/train_plan.sh).
    """

    name = "ten_crop"
    notes = (
        "val_acc/val_loss: single view, the 48×48 face resized to 42×42 (what the exported model scores); "
        "val_acc_tencrop: logits averaged over the ten 42×42 crops of the 48×48 face (paper protocol)"
    )

    def __init__(self, cfg, spec: PreprocessSpec, model: nn.Module, generator: torch.Generator) -> None:
        super().__init__(cfg, spec, model, generator)
        self.crop = spec.input_size[0]
        full = replace(spec, input_size=(FACE_SIZE, FACE_SIZE))  # the FER2013 face the crops are cut from
        self.train_tf = build_transforms(full, train=True, augment=cfg.augment, generator=generator)
        self.full_tf = build_transforms(full, train=False)

    def inputs(self, images: torch.Tensor) -> torch.Tensor:
        x = random_ten_crop(self.train_tf(images), self.crop, self.generator)
        return in_layout(x, self.cfg.channels_last)

    def validate(self, model: nn.Module, images: torch.Tensor, labels: torch.Tensor) -> dict[str, float]:
        metrics = super().validate(model, images, labels)
        model.eval()
        device = next(model.parameters()).device
        # Ten views cost ten val passes: in the run's precision (bf16 where it trains in bf16; the selecting
        # val_acc above stays fp32), so the paper's protocol does not double the epoch. The served figure is the
        # exported graph's, scored in fp32 by `mien eval`.
        with self.context.autocast():
            logits = torch.cat(
                [
                    ten_crop_logits(model, self.full_tf(x).to(device), self.crop, self.cfg.channels_last).cpu()
                    for x in images.split(256)
                ]
            )
        metrics["val_acc_tencrop"] = (logits.argmax(1) == labels).float().mean().item()
        return metrics


class SGANObjective(CrossEntropy):
    """Semi-supervised GAN: the served model is the discriminator; the generator only trains it.

    Each step: one discriminator update on a real batch and as many generated faces, then one
    generator update by feature matching. Both optimisers are Adam with β1 = 0.5 (DCGAN's choice for
    stable adversarial training) and follow the run's learning-rate schedule. The generator and its
    optimiser travel in last.pt (``state_dict``) so resume is exact; best.pt holds only the
    discriminator, which is what ``load_model`` rebuilds.
    """

    name = "sgan"
    notes = "served model = SGAN discriminator's K real-class logits; the generator is kept in last.pt only"

    def __init__(self, cfg, spec: PreprocessSpec, model: nn.Module, generator: torch.Generator) -> None:
        from mien.training.models.sgan import real_stats_only, sgan_generator

        self.real_stats_only = real_stats_only

        super().__init__(cfg, spec, model, generator)
        self.gen = sgan_generator(out_channels=spec.channels)
        self.gen_optimizer = torch.optim.Adam(self.gen.parameters(), lr=cfg.lr, betas=(0.5, 0.999))

    def build_optimizer(self, model: nn.Module) -> torch.optim.Optimizer:
        params = param_groups(model, self.cfg)
        return torch.optim.Adam(params, lr=self.cfg.lr, betas=(0.5, 0.999), weight_decay=self.cfg.weight_decay)

    def _fake(self, n: int) -> torch.Tensor:
        fake = self.gen.sample(n, generator=self.generator)
        return in_layout(fake, self.cfg.channels_last)

    def train_step(
        self, model: nn.Module, optimizer: torch.optim.Optimizer, images: torch.Tensor, y: torch.Tensor
    ) -> tuple[float, torch.Tensor]:
        x = self.inputs(images)
        self.gen.train()
        real = model.discriminate(x)
        with self.real_stats_only(model):
            fake = model.discriminate(self._fake(len(x)).detach())
        loss = sgan_discriminator_loss(
            real, fake, y, self.cfg.label_smoothing, self.cfg.objective.sgan_unsupervised_weight
        )
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

        for group in self.gen_optimizer.param_groups:
            group["lr"] = optimizer.param_groups[0]["lr"]
        with torch.no_grad(), self.real_stats_only(model):
            real_features = model.features(x)
        with self.real_stats_only(model):
            g_loss = feature_matching_loss(real_features, model.features(self._fake(len(x))))
        self.gen_optimizer.zero_grad(set_to_none=True)
        optimizer.zero_grad(set_to_none=True)
        g_loss.backward()  # also fills the discriminator's grads; its next step zeroes them first
        self.gen_optimizer.step()
        return loss.item(), real[:, :-1].detach()

    def state_dict(self) -> dict:
        return {"generator": self.gen.state_dict(), "generator_optimizer": self.gen_optimizer.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.gen.load_state_dict(state["generator"])
        self.gen_optimizer.load_state_dict(state["generator_optimizer"])


#: Model id → objective; ids not listed train with :class:`CrossEntropy`.
OBJECTIVES: dict[str, type[CrossEntropy]] = {
    "stn_resnet10_triplet": TripletObjective,
    "dcnn": TenCropObjective,
    "sgan": SGANObjective,
}


def build_objective(cfg, spec: PreprocessSpec, model: nn.Module, generator: torch.Generator) -> CrossEntropy:
    """The objective the model id ``cfg.model`` trains with."""
    return OBJECTIVES.get(cfg.model, CrossEntropy)(cfg, spec, model, generator)
