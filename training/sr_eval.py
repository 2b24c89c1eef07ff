"""``mien sr-eval``: PSNR and SSIM of an SR front end against bicubic upsampling, on a split's faces.

The front end is a ``mien pretrain-sr`` checkpoint, its exported ONNX file (``models/frontends/``), or the EDSR
inside an SR arm's ``mien train`` checkpoint, so the arms' fine-tuned front ends are scored the way their
pre-trained start was (:func:`sr_front_end`). The faces are degraded as pre-training degrades them
(:func:`~mien.training.sr_pretrain.downscale`).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from mien.training.data import CARVED_SPLIT, load_dataset, load_with_validation
from mien.training.layers import EDSR, EDSR_SMALL
from mien.training.models import default_spec
from mien.training.sr_pretrain import downscale, load_sr_checkpoint
from mien.training.transforms import normalize


def psnr(reference: np.ndarray, images: np.ndarray, data_range: float = 255.0) -> np.ndarray:
    """Per-image PSNR in dB of N×H×W ``images`` against ``reference`` on a [0, ``data_range``] scale:
    10·log10(range² / MSE); inf for an identical image."""
    diff = np.asarray(reference, dtype=np.float64) - np.asarray(images, dtype=np.float64)
    mse = (diff**2).reshape(len(diff), -1).mean(1)
    with np.errstate(divide="ignore"):
        return 10 * np.log10(data_range**2 / mse)


def ssim(reference: np.ndarray, images: np.ndarray, data_range: float = 255.0) -> np.ndarray:
    """Per-image SSIM of N×H×W ``images`` against ``reference`` (scikit-image's ``structural_similarity`` with
    the settings of Wang et al. 2004: an 11×11 Gaussian window of σ = 1.5, population covariances)."""
    from skimage.metrics import structural_similarity

    return np.array(
        [
            structural_similarity(
                r, i, data_range=data_range, gaussian_weights=True, sigma=1.5, use_sample_covariance=False
            )
            for r, i in zip(np.asarray(reference, np.float64), np.asarray(images, np.float64), strict=True)
        ]
    )


def to_grey_levels(x: torch.Tensor, spec) -> np.ndarray:
    """Normalised N×1×H×W → the N×H×W image it stands for, rounded to grey levels 0..255 (an image file's)."""
    mean = torch.tensor(spec.mean).view(1, -1, 1, 1)
    std = torch.tensor(spec.std).view(1, -1, 1, 1)
    return ((x * std + mean) / spec.scale).round().clamp(0, 255)[:, 0].numpy()


def _summary(values: np.ndarray) -> dict[str, float]:
    return {"mean": float(values.mean()), "std": float(values.std())}


def _margin(sr: np.ndarray, bicubic: np.ndarray) -> dict[str, float]:
    """SR minus bicubic on the same faces: mean, a normal-approximation 95% interval of the mean, and the
    share of faces where SR is better."""
    diff = sr - bicubic
    half = 1.96 * diff.std(ddof=1) / np.sqrt(len(diff)) if len(diff) > 1 else float("nan")
    return {"mean": float(diff.mean()), "ci95": [float(diff.mean() - half), float(diff.mean() + half)],
            "sr_better_share": float((diff > 0).mean())}  # fmt: skip


def sr_front_end(checkpoint: str | Path) -> tuple[EDSR, dict, str]:
    """(the EDSR in eval mode, its kwargs, where it came from) of a ``mien pretrain-sr`` checkpoint or its exported
    ONNX file, or of a ``mien train`` checkpoint of an SR model (sr_cnn, stn_sr_cnn): its front end as training
    left it, so the arms' fine-tuned SR can be scored the way its pre-trained start was."""
    path = Path(checkpoint).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such checkpoint (a `mien pretrain-sr` sr.pt or a `mien train` best.pt)")
    onnx_file = path.suffix == ".onnx"
    ckpt = load_sr_checkpoint(path) if onnx_file else torch.load(path, map_location="cpu", weights_only=False)
    if isinstance(ckpt, dict) and ckpt.get("kind") == "sr_pretrain":
        sr = EDSR(default_spec("sr_cnn").channels, **ckpt["sr_kwargs"])
        sr.load_state_dict(ckpt["state_dict"])
        return sr.eval(), dict(ckpt["sr_kwargs"]), "exported pretrain-sr" if onnx_file else "pretrain-sr"
    from mien.training.checkpoint import load_model

    model, _, trained = load_model(path)
    sr = getattr(model, "sr", None)
    if not isinstance(sr, EDSR):
        raise ValueError(f"{path}: a {trained['model_id']} checkpoint has no SR front end to score")
    kwargs = {**EDSR_SMALL, **trained["model_kwargs"].get("sr_kwargs", {})}
    return sr.eval(), kwargs, f"mien train ({trained['model_id']})"


@torch.no_grad()
def evaluate_sr(
    checkpoint: str | Path, data: str | Path, split: str = "public_test", batch_size: int = 256, limit: int = 0
) -> dict:
    """PSNR and SSIM of an SR front end against bicubic upsampling, on the faces of ``split``: a pre-trained SR
    checkpoint, or the front end inside an SR arm's ``mien train`` checkpoint (:func:`sr_front_end`).

    HR: each 48×48 face; LR: its ×2 area downscale (:func:`downscale`, what pre-training learns to undo);
    SR: the network's 48×48 output; bicubic: LR upsampled ×2 by bicubic interpolation. Both are turned back
    into grey levels (0..255, rounded) and scored against HR: PSNR on the [0, 255] scale and SSIM, averaged
    over faces (each face scored alone, the usual SR protocol), with the SR − bicubic margin. No border is
    shaved: both methods are scored on the same whole face. A front end that does not beat bicubic by a
    clear margin is not testing super-resolution. ``split = "val"`` scores the validation faces carved from
    Training (those pre-training held out), so the check can be made before PublicTest is looked at.
    """
    sr, sr_kwargs, source = sr_front_end(checkpoint)
    spec = default_spec("sr_cnn")
    # "val": the faces mien train and pretrain-sr hold out of Training (default fraction and seed)
    faces = (load_with_validation(data) if split == CARVED_SPLIT else load_dataset(data)).subset(split)[0]
    if limit:
        faces = faces[:limit]
    # A blank frame (one grey level; FER2013 has 11 in Training, 1 in PublicTest) has no detail to restore:
    # bicubic gives it back exactly and its PSNR is infinite, which would swamp every mean. Left out, and counted.
    flat = faces.reshape(len(faces), -1)
    blank = flat.max(1) == flat.min(1)
    faces = faces[~blank]
    if len(faces) == 0:
        raise ValueError(f"{data}: no faces in split {split!r}")
    hr_levels, sr_levels, bicubic_levels = [], [], []
    for i in range(0, len(faces), batch_size):
        hr = normalize(torch.from_numpy(faces[i : i + batch_size]), spec)
        small = downscale(hr)
        hr_levels.append(to_grey_levels(hr, spec))
        sr_levels.append(to_grey_levels(sr(small), spec))
        bicubic = F.interpolate(small, size=hr.shape[-2:], mode="bicubic", align_corners=False)
        bicubic_levels.append(to_grey_levels(bicubic, spec))
    hr, up, bicubic = (np.concatenate(v) for v in (hr_levels, sr_levels, bicubic_levels))
    scores = {"sr": (psnr(hr, up), ssim(hr, up)), "bicubic": (psnr(hr, bicubic), ssim(hr, bicubic))}
    return {
        "checkpoint": str(checkpoint),
        "data": str(data),
        "split": split,
        "faces": int(len(faces)),
        "blank_faces_left_out": int(blank.sum()),
        "sr_kwargs": sr_kwargs,
        "source": source,
        "psnr_db": {name: _summary(p) for name, (p, _) in scores.items()},
        "ssim": {name: _summary(s) for name, (_, s) in scores.items()},
        "psnr_margin_db": _margin(scores["sr"][0], scores["bicubic"][0]),
        "ssim_margin": _margin(scores["sr"][1], scores["bicubic"][1]),
    }


def write_sr_evaluation(report: dict, out: str | Path) -> Path:
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=1) + "\n")
    return out


def _blank_note(blank: int) -> str:
    return f", {blank} blank face{'s' if blank > 1 else ''} (one grey level) left out" if blank else ""


def format_sr_evaluation(report: dict) -> str:
    """The evaluation as three lines a person reads."""
    p, s = report["psnr_db"], report["ssim"]
    pm, sm = report["psnr_margin_db"], report["ssim_margin"]
    kwargs = report["sr_kwargs"]
    return (
        f"EDSR(B={kwargs['num_blocks']}, F={kwargs['features']}) on {report['faces']} {report['split']} faces, "
        f"x2 (24 -> 48){_blank_note(report.get('blank_faces_left_out', 0))}:\n"
        f"PSNR {p['sr']['mean']:.2f} dB (bicubic {p['bicubic']['mean']:.2f}): margin {pm['mean']:+.3f} dB "
        f"[95% CI {pm['ci95'][0]:+.3f}, {pm['ci95'][1]:+.3f}], "
        f"SR better on {100 * pm['sr_better_share']:.1f}% of faces\n"
        f"SSIM {s['sr']['mean']:.4f} (bicubic {s['bicubic']['mean']:.4f}): margin {sm['mean']:+.4f} "
        f"[95% CI {sm['ci95'][0]:+.4f}, {sm['ci95'][1]:+.4f}], "
        f"SR better on {100 * sm['sr_better_share']:.1f}% of faces"
    )
