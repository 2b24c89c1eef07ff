"""`mien export` of a `mien pretrain-sr` checkpoint: the pre-trained EDSR front end as an ONNX file and a card.

The SR arms of issue 17 start from a pre-trained EDSR (``sr_init``). A checkpoint lives in a run folder outside the
checkout and is lost with the machine; the exported file is what the repository keeps (models/frontends/), and
``mien train --sr-init models/frontends/edsr_x2.onnx`` and ``mien sr-eval`` read it back
(:func:`~mien.training.sr_pretrain.sr_checkpoint_from_onnx`), so a lost run folder costs no second pre-training.

The file: input ``low_res`` (N×1×H×W, normalised as ``sr_cnn``'s spec says), output ``high_res`` (N×1×2H×2W), every
axis dynamic; metadata ``mien.kind = sr_front_end``, ``mien.sr_kwargs`` and the spec. It is checked three ways
before the card is written: onnxruntime against PyTorch on real low-resolution faces and random input at two sizes,
the weights read back from the file equal to the checkpoint's bit for bit, and PSNR/SSIM against bicubic upsampling
(:func:`~mien.training.sr_eval.evaluate_sr`) scored on the val faces and on PublicTest through the weights read
back, the form training uses. The card (``<stem>.card.json``) records the pre-training command, its history and
CPU time, the parity and both evaluations. It is not a classifier: the service does not serve models/frontends/.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shlex
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch

from mien.card import FRONT_ENDS_DIR, SR_FRONT_END_KIND, card_path
from mien.export.onnx_export import to_onnx, toolchain
from mien.paths import DEFAULT_DATA
from mien.runtime import MODEL_ID_KEY
from mien.training.config import SRPretrainConfig
from mien.training.data import load_with_validation
from mien.training.layers import EDSR
from mien.training.models import default_spec
from mien.training.sr_eval import evaluate_sr
from mien.training.sr_pretrain import KIND_KEY, SR_KWARGS_KEY, downscale, load_sr_checkpoint
from mien.training.transforms import normalize

log = logging.getLogger("mien.export")

INPUT_NAME, OUTPUT_NAME = "low_res", "high_res"
#: Where the repository keeps exported SR front ends, and the file the SR recipes name.
DEFAULT_OUT = f"models/{FRONT_ENDS_DIR}/edsr_x2.onnx"
#: The splits the card scores: val (what gates the SR arms) and PublicTest (the test set, what issue 17 reports).
SPLITS = ("val", "public_test")


@dataclass
class SRParity:
    max_abs_diff: float
    atol: float
    shapes: list[list[int]]
    weights_read_back_equal: bool

    @property
    def passed(self) -> bool:
        return self.max_abs_diff <= self.atol and self.weights_read_back_equal


def is_sr_checkpoint(path: str | Path) -> bool:
    """Whether ``path`` is a checkpoint written by `mien pretrain-sr` (so `mien export` exports a front end)."""
    path = Path(path).expanduser()
    if path.suffix != ".pt" or not path.is_file():
        return False
    ckpt = torch.load(path, map_location="cpu", weights_only=False, mmap=True)  # a look at its kind, not its weights
    return isinstance(ckpt, dict) and ckpt.get("kind") == "sr_pretrain"


def pretrain_command(ckpt: dict) -> str:
    """The `mien pretrain-sr` command that wrote ``ckpt``: as it recorded it, else rebuilt from its config (every
    option that differs from the default; the two give the same run)."""
    if ckpt.get("command"):
        return ckpt["command"]
    config, words = ckpt.get("config", {}), []
    for f in fields(SRPretrainConfig):
        value = config.get(f.name, getattr(SRPretrainConfig(), f.name))
        if value == getattr(SRPretrainConfig(), f.name) and f.name != "out":
            continue
        flag = "--" + f.name.replace("_", "-")
        if isinstance(value, bool):
            words.append(flag)
        else:
            words += [flag, json.dumps(value) if isinstance(value, dict) else str(value)]
    return "mien pretrain-sr " + shlex.join(words)


def _parity(sr: EDSR, path: Path, real: torch.Tensor, atol: float) -> SRParity:
    """onnxruntime against PyTorch on ``real`` low-resolution faces and random input at two sizes, and the weights
    as training reads them back from the file."""
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    rng = np.random.default_rng(0)
    batches = [real.numpy(), rng.normal(0, 1.5, (4, 1, 24, 24)).astype(np.float32),
               rng.normal(0, 1.5, (2, 1, 48, 48)).astype(np.float32)]  # fmt: skip
    worst = 0.0
    for batch in batches:
        with torch.no_grad():
            expected = sr(torch.from_numpy(batch)).numpy()
        got = session.run([OUTPUT_NAME], {INPUT_NAME: batch})[0]
        worst = max(worst, float(np.abs(expected - got).max()))
    read_back, state = load_sr_checkpoint(path)["state_dict"], sr.state_dict()
    equal = read_back.keys() == state.keys() and all(torch.equal(read_back[k], state[k]) for k in state)
    return SRParity(max_abs_diff=worst, atol=atol, shapes=[list(b.shape) for b in batches],
                    weights_read_back_equal=equal)  # fmt: skip


def _run(ckpt: dict) -> dict:
    """What the pre-training cost, from its history: epochs, seconds and CPU-hours (seconds x threads; threads
    0, torch's default, counts this machine's cores)."""
    history = ckpt.get("history", [])
    seconds = sum(float(h.get("seconds", 0.0)) for h in history)
    threads = int(ckpt.get("config", {}).get("threads") or 0) or (os.cpu_count() or 1)
    return {"epochs": len(history), "seconds": round(seconds, 1), "threads": threads,
            "cpu_hours": round(seconds * threads / 3600, 3), "cpu_hours_from": "seconds x threads",
            "precision": sorted({h.get("precision", "fp32") for h in history})}  # fmt: skip


def export_sr_front_end(checkpoint: str | Path, out: str | Path = DEFAULT_OUT, data: str | Path = DEFAULT_DATA,
                        opset: int = 20, atol: float = 1e-4) -> SRParity:  # fmt: skip
    """Export, check and score the EDSR of a `mien pretrain-sr` checkpoint; write the file and its card, and return
    the parity verdict (the card is written only when it passed)."""
    ckpt = load_sr_checkpoint(checkpoint)
    spec = default_spec("sr_cnn")
    sr = EDSR(spec.channels, **ckpt["sr_kwargs"])
    sr.load_state_dict(ckpt["state_dict"])
    sr.eval()
    out = Path(out)
    metadata = {**spec.to_metadata(), KIND_KEY: SR_FRONT_END_KIND, SR_KWARGS_KEY: json.dumps(sr.kwargs),
                MODEL_ID_KEY: out.name.removesuffix(".onnx")}  # fmt: skip
    to_onnx(sr, torch.zeros(1, 1, 24, 24), out, opset, metadata, names=(INPUT_NAME, OUTPUT_NAME),
            axes={0: "batch", 2: "height", 3: "width"})  # any size: the arms feed it 48x48 faces  # fmt: skip
    faces = load_with_validation(data).subset("val")[0][:64]
    real = downscale(normalize(torch.from_numpy(faces), spec))
    parity = _parity(sr, out, real, atol)
    log.log(
        logging.INFO if parity.passed else logging.ERROR,
        "SR front end parity %s: max |torch - onnx| = %.2e (atol %.0e), weights read back equal: %s",
        "passed" if parity.passed else "FAILED",
        parity.max_abs_diff,
        atol,
        parity.weights_read_back_equal,
    )
    if not parity.passed:
        return parity
    evaluation = {}
    for split in SPLITS:  # through the file, as `mien train --sr-init` and `mien sr-eval` read it
        report = evaluate_sr(out, data, split)
        evaluation[split] = {k: report[k] for k in ("faces", "blank_faces_left_out", "psnr_db", "ssim",
                                                     "psnr_margin_db", "ssim_margin")}  # fmt: skip
        log.info("%s: PSNR %.2f dB (bicubic %.2f), SSIM %.4f (bicubic %.4f)", split,
                 report["psnr_db"]["sr"]["mean"], report["psnr_db"]["bicubic"]["mean"],
                 report["ssim"]["sr"]["mean"], report["ssim"]["bicubic"]["mean"])  # fmt: skip
    card = {
        "model_id": out.name.removesuffix(".onnx"),
        "kind": SR_FRONT_END_KIND,
        "description": "EDSR x2 super-resolution front end of sr_cnn/stn_sr_cnn, pre-trained on FER2013 Training "
        "faces (24 -> 48, L1); `mien train --sr-init` loads it. Not served.",
        "file": out.name,
        "sha256": hashlib.sha256(out.read_bytes()).hexdigest(),
        "parameters": sum(p.numel() for p in sr.parameters()),
        "sr_kwargs": sr.kwargs,
        "spec": spec.to_dict(),
        "io": {"input": INPUT_NAME, "output": OUTPUT_NAME, "scale": sr.kwargs["scale"]},
        "training": {
            "command": pretrain_command(ckpt),
            "config": ckpt.get("config", {}),
            "train_split": ckpt.get("config", {}).get("train_split"),
            "val_split": ckpt.get("config", {}).get("val_split"),
            **({"train_faces": ckpt["train_faces"]} if "train_faces" in ckpt else {}),
            "run": _run(ckpt),
            "history": ckpt.get("history", []),
        },
        "parity": asdict(parity),
        "evaluation": evaluation,
        "export": {
            "command": f"mien export {checkpoint} --out {out} --data {data}",
            "opset": opset,
            **toolchain(),
        },
    }
    card_path(out).write_text(json.dumps(card, indent=2) + "\n", encoding="utf-8")
    log.info("wrote %s and %s", out, card_path(out))
    return parity
