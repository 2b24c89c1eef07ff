"""How much of a model's validation accuracy is the luck of being picked on those faces.

    .venv/bin/python benchmarks/selection_optimism.py [--model-dir models] [--window 10] [--out FILE.json]

`mien train` keeps the epoch with the best accuracy on the validation split. Near the end of a run the epochs
differ by little more than noise, so the kept one is, in part, the epoch the val faces happened to favour: its
val accuracy is optimistic, and a calibration fitted on the same faces makes confidence match that optimistic
figure (over-confident on new faces by as much). Measured here from the training history each bundled card carries
(the epochs up to the kept one): the kept epoch's val accuracy, the mean of the ``--window`` epochs before it, and
their difference, the optimism; with the standard deviation of those epochs (the noise the maximum rides on).
Only models selected on val (by their card) are measured. Written to --out as JSON.
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

from mien.card import card_for


def optimism(history: list[dict], window: int) -> dict | None:
    """The kept (best) epoch's val accuracy against the mean of the ``window`` epochs before it; None when
    the history is shorter than the window plus one."""
    accs = [row["val_acc"] for row in history]
    best = max(range(len(accs)), key=accs.__getitem__)
    before = accs[max(0, best - window) : best]
    if len(before) < window:
        return None
    mean = statistics.fmean(before)
    return {"epoch": history[best]["epoch"], "val_acc": accs[best], "mean_before": mean,
            "sd_before": statistics.pstdev(before), "optimism": accs[best] - mean}  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model-dir", default="models")
    parser.add_argument("--window", type=int, default=10)
    parser.add_argument("--out", default="docs/figures/selection_optimism.json")
    args = parser.parse_args()
    rows = {}
    for path in sorted(Path(args.model_dir).glob("*.onnx")):
        card = card_for(path)
        if card is None or card.selected_on != "val" or not (card.training and card.training.history):
            continue
        row = optimism(card.training.history, args.window)
        if row is None:
            continue
        rows[card.model_id] = row | {"public_test_accuracy": card.metrics.accuracy if card.metrics else None}
        print(f"{card.model_id:22s} epoch {row['epoch']:3d}: val {100 * row['val_acc']:.2f}%, the {args.window} "
              f"epochs before {100 * row['mean_before']:.2f}% (sd {100 * row['sd_before']:.2f}): "
              f"optimism {100 * row['optimism']:+.2f} points")  # fmt: skip
    if not rows:
        parser.error(f"no model in {args.model_dir} selected on val with a history of more than {args.window} epochs")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"window": args.window, "models": rows}, indent=1) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
