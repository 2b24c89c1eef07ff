"""Every served model's calibration on public_test, before and after its fit, as one markdown table.

    .venv/bin/python benchmarks/calibration_table.py [--results docs/figures/results/results.json] [--models models]

Reads what other commands measured, measures nothing: ECE, NLL and Brier before and after from each card's
``calibration`` block (written by ``mien calibrate``), the p-value of "calibrated" from ``mien results``'s JSON
(the served file's figures, on the labels the model was trained on), and for a model served without a calibration
its own figures from that JSON too.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from mien.card import card_path, read_card


def rows(results: list[dict], models: Path) -> list[str]:
    lines = ["| model | ECE % before → after | NLL before → after | Brier before → after | p (after) | T (b, c) |",
             "|---|---|---|---|---|---|"]  # fmt: skip
    for r in results:
        own = r.get("own_labels") or r  # a model trained on other labels (FER+) is scored, and calibrated, on them
        cal = read_card(card_path(models / r["file"])).calibration
        test = cal.before.get("public_test") if cal else None
        if cal is None or test is None:
            lines.append(f"| `{r['model_id']}` (not calibrated) | {100 * own['ece']:.2f} (own) | {own['nll']:.3f} | "
                         f"{own['brier']:.3f} | {own['ece_p_calibrated']:.3f} | — |")  # fmt: skip
            continue
        after = cal.after["public_test"]
        lines.append(f"| `{r['model_id']}` | {100 * test['ece']:.2f} → **{100 * after['ece']:.2f}** | "
                     f"{test['nll']:.3f} → {after['nll']:.3f} | {test['brier']:.3f} → {after['brier']:.3f} | "
                     f"{own['ece_p_calibrated']:.3f} | {cal.temperature:.3f} ({cal.entropy_slope:+.3f}, "
                     f"{cal.entropy_curve:+.3f}) |")  # fmt: skip
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--results", default="docs/figures/results/results.json", help="written by `mien results`")
    parser.add_argument("--models", type=Path, default=Path("models"), help="the served files and their cards")
    args = parser.parse_args()
    print("\n".join(rows(json.loads(Path(args.results).read_text()), args.models)))


if __name__ == "__main__":
    main()
