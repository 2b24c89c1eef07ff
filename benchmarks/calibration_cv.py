"""Which calibration method to trust, decided on the validation split alone (PublicTest never chooses).

    .venv/bin/python benchmarks/calibration_cv.py [--models vgg_fer,mini_xception_kd] [--repeats 5] [--merge]

For each bundled model whose card says the split was held out from its training (others are listed and left
out), ensembles (``*.ensemble.json``) included, the uncalibrated probabilities of the split's faces are computed
once (the file with its calibration taken out; for an ensemble its own, applied after averaging, while its
members' stays, as `mien calibrate` fits it); then, ``--repeats`` times, the faces are cut into two stratified
halves, each method is fitted on one half and scored on the other (and the other way round), so every face is
scored by a fit that never saw it. Printed per model and method: ECE, NLL and the ECE a calibrated model would
show on the same number of faces (the floor, :func:`mien.export.calibration.ece_consistency`) with the p-value
of "calibrated", averaged over the repeats ("none": the network's own probabilities, for reference); the figures
also go to ``--out`` as JSON (docs/figures/calibration_cv.json).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import onnx

from mien.ensemble import ENSEMBLE_SUFFIX
from mien.export.calibrate import _probabilities, ensemble_probabilities, uncalibrated_ensemble, without_calibration
from mien.export.calibration import (
    METHODS,
    ece_consistency,
    expected_calibration_error,
    fit_calibration,
    negative_log_likelihood,
    rescale,
)
from mien.export.ensemble_search import not_held_out
from mien.paths import DEFAULT_DATA


def cross_fitted(probs: np.ndarray, truth: np.ndarray, method: str, seed: int) -> np.ndarray:
    """Every face's probabilities calibrated by a fit on the other stratified half of the faces."""
    from sklearn.model_selection import StratifiedKFold

    if method == "none":
        return np.array(probs, copy=True)
    out = np.zeros_like(probs)
    for fit, score in StratifiedKFold(2, shuffle=True, random_state=seed).split(probs, truth):
        out[score] = rescale(probs[score], *fit_calibration(probs[fit], truth[fit], method=method))
    return out


def model_ids(model_dir: Path) -> list[str]:
    """The ids of the bundled classifiers and ensembles in ``model_dir``."""
    files = [*model_dir.glob("*.onnx"), *model_dir.glob(f"*{ENSEMBLE_SUFFIX}")]
    return sorted(p.name.removesuffix(ENSEMBLE_SUFFIX).removesuffix(".onnx") for p in files)


def uncalibrated(model_dir: Path, name: str, data: str, split: str) -> tuple[np.ndarray, np.ndarray]:
    """Model ``name``'s probabilities for the faces of ``split`` with its own calibration taken out, and the truth."""
    ensemble = model_dir / f"{name}{ENSEMBLE_SUFFIX}"
    if ensemble.exists():
        return ensemble_probabilities(uncalibrated_ensemble(ensemble)[0], data, split)
    return _probabilities(without_calibration(onnx.load(model_dir / f"{name}.onnx")), data, split)


def kept(out: Path, split: str, repeats: int) -> dict:
    """The entries already in ``out`` (for --merge); a file measured on another split or with other repeats
    cannot be merged with this run's figures."""
    if not out.exists():
        return {}
    earlier = json.loads(out.read_text())
    if (earlier["split"], earlier["repeats"]) != (split, repeats):
        raise SystemExit(f"{out} holds {earlier['repeats']} cuts of {earlier['split']}, not {repeats} of {split}: "
                         "measure every model again without --merge")  # fmt: skip
    return dict(earlier["models"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model-dir", default="models")
    parser.add_argument("--models", default="", help="default: every models/*.onnx and *.ensemble.json held out "
                        "from --split")  # fmt: skip
    parser.add_argument("--data", default=DEFAULT_DATA)
    parser.add_argument("--split", default="val")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--out", default="docs/figures/calibration_cv.json")
    parser.add_argument("--merge", action="store_true",
                        help="keep the other models' entries already in --out (measured on the same split with the "
                             "same repeats), so a model added later is measured alone")  # fmt: skip
    args = parser.parse_args()
    names = args.models.split(",") if args.models else model_ids(Path(args.model_dir))
    for name, why in not_held_out(args.model_dir, names, args.split).items():
        print(f"left out {name}: {why}")
        names.remove(name)
    results = kept(Path(args.out), args.split, args.repeats) if args.merge else {}
    for name in names:
        probs, truth = uncalibrated(Path(args.model_dir), name, args.data, args.split)
        rows = {}
        for method in ("none", *METHODS):
            scored = [cross_fitted(probs, truth, method, seed) for seed in range(args.repeats)]
            eces = [expected_calibration_error(p, truth) for p in scored]
            consistency = [ece_consistency(p, ece) for p, ece in zip(scored, eces, strict=True)]
            rows[method] = {
                "ece": float(np.mean(eces)),
                "ece_floor": float(np.mean([c["ece_floor"] for c in consistency])),
                "ece_p_calibrated": float(np.mean([c["ece_p_calibrated"] for c in consistency])),
                "nll": float(np.mean([negative_log_likelihood(p, truth) for p in scored])),
                # mean top probability minus accuracy: > 0 over-confident on the whole
                "overconfidence": float(np.mean([p.max(1).mean() - (p.argmax(1) == truth).mean() for p in scored])),
            }
        keys = ("temperature", "entropy_slope", "entropy_curve")
        fitted = {method: dict(zip(keys, fit_calibration(probs, truth, method), strict=True)) for method in METHODS}
        results[name] = {"faces": len(truth), "methods": rows, "fit_on_all": fitted}
        print(f"\n{name}: {len(truth)} {args.split} faces, scored by fits on the other half ({args.repeats} cuts)")
        print(f"  {'method':<12} {'ECE %':>7} {'floor %':>8} {'p':>6} {'NLL':>7} {'conf-acc %':>10}")
        for method, row in rows.items():
            print(f"  {method:<12} {100 * row['ece']:7.2f} {100 * row['ece_floor']:8.2f} "
                  f"{row['ece_p_calibrated']:6.3f} {row['nll']:7.4f} {100 * row['overconfidence']:+10.2f}")  # fmt: skip
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"split": args.split, "repeats": args.repeats, "models": results}, indent=2) + "\n")
    print(f"\nwrote {out}")


if __name__ == "__main__":
    main()
