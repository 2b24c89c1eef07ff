"""The check behind stn_lr_scale / sr_lr_scale (docs/training.md, the plan of issue 17): run an ablation recipe
(its own 50-epoch schedule) for a few epochs on the first LIMIT training faces and log, every 10 steps, the
optimiser groups' rates, the STN's warp (scale, rotation, shift, spread across faces, its last layer's gradient)
and the SR front end's output against bicubic; the run's history.jsonl (val accuracy, stn_* figures) is printed
at the end.

    .venv/bin/python benchmarks/stn_lr_check.py RECIPE OUT LIMIT EPOCHS STN_LR_SCALE SR_LR_SCALE [SR_INIT]
    e.g. configs/experiments/ablation_stn.toml /tmp/stn_0.01 6400 10 0.01 1
"""

from __future__ import annotations

import sys
import time
from dataclasses import replace

import torch
import torch.nn.functional as F

import mien.training.train as T
from mien.paths import DEFAULT_DATA
from mien.training.config import config_from_dict
from mien.training.layers.stn import affine_stats
from mien.training.objectives import CrossEntropy
from mien.training.recipe import load_recipe

recipe, out, limit, epochs = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
stn_scale, sr_scale = float(sys.argv[5]), float(sys.argv[6])
sr_init = sys.argv[7] if len(sys.argv) > 7 else ""
EVERY = 10
cfg = config_from_dict(load_recipe(recipe))
cfg = replace(
    cfg,
    data=DEFAULT_DATA,
    out=out,
    limit=limit,
    threads=1,
    stn_lr_scale=stn_scale,
    sr_lr_scale=sr_scale,
    sr_init=sr_init if cfg.sr_init else "",
)
print(cfg, flush=True)

real_step = CrossEntropy.train_step
state = {"step": 0, "t": time.perf_counter()}


def logged_step(self, model, optimizer, images, y):
    loss, logits = real_step(self, model, optimizer, images, y)
    state["step"] += 1
    if state["step"] % EVERY == 0 or state["step"] <= 3:
        parts = [f"step {state['step']} loss {loss:.3f} lrs {[round(g['lr'], 5) for g in optimizer.param_groups]}"]
        with torch.no_grad():
            x = self.val_tf(images[:64])
            if model.stn is not None:
                th = model.stn.theta(x).float()
                s = affine_stats(th)
                g = model.stn.fc.weight.grad
                parts.append(
                    f"|grad fc| {g.norm().item() if g is not None else 0:.3g} scale {s['scale']:.3f} "
                    f"rot {s['rotation_deg']:.1f} shift {s['translation']:.3f} "
                    f"theta_spread {th.std(0).mean().item():.4f}"
                )
                x = model.stn(x)
            if model.sr is not None:
                up = model.sr(x).float()
                bic = F.interpolate(x, scale_factor=2, mode="bicubic", align_corners=False)
                parts.append(
                    f"sr: L1 vs bicubic {F.l1_loss(up, bic).item():.4f} std {up.std().item():.3f} "
                    f"(bicubic std {bic.std().item():.3f})"
                )
        parts.append(f"{time.perf_counter() - state['t']:.0f}s")
        print("  ".join(parts), flush=True)
    return loss, logits


CrossEntropy.train_step = logged_step
real_epoch = T.train_one_epoch
calls = {"n": 0}


def limited_epoch(*args, **kwargs):
    calls["n"] += 1
    if calls["n"] > epochs:
        raise KeyboardInterrupt
    return real_epoch(*args, **kwargs)


T.train_one_epoch = limited_epoch
try:
    T.train(cfg)
except KeyboardInterrupt:
    print("stopped after", epochs, "epochs", flush=True)
print(open(f"{out}/history.jsonl").read())
