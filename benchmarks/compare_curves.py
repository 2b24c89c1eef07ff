"""A run under way against finished ones, epoch by epoch: is it ahead, level or behind?

    .venv/bin/python benchmarks/compare_curves.py ~/mien-runs/vgg_fer_ba models/vgg_fer.card.json \
        models/vgg_fer_seed1.card.json [--every 10] [--plot curves.png] [--metric val_acc]

Each argument is a run folder (its ``history.jsonl``, written by ``mien train`` every epoch) or a model card (the
history its training left in it, which ends at the epoch the exported weights were kept from). Prints a markdown
table of the metric at every ``--every``-th epoch and at the last epoch the first run has reached, the first run's
difference from the mean of the others at that epoch, and each run's best so far; ``--plot`` draws the curves (PNG).
Reads only what the runs wrote: no model is run.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def load_history(source: Path) -> list[dict]:
    """The per-epoch rows of a run folder (history.jsonl) or of a model card (training.history), by epoch; an
    epoch written twice (a resume after a crash) keeps its last row."""
    if source.is_dir():
        path = source / "history.jsonl"
        if not path.exists():
            raise SystemExit(f"{source}: no history.jsonl (is it a `mien train` run folder?)")
        rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    elif source.suffix == ".json":
        card = json.loads(source.read_text())
        rows = (card.get("training") or {}).get("history") or []
        if not rows:
            raise SystemExit(f"{source}: the card has no training history")
    else:
        raise SystemExit(f"{source}: neither a run folder nor a card (.json)")
    return sorted({row["epoch"]: row for row in rows}.values(), key=lambda row: row["epoch"])


def label(source: Path) -> str:
    return source.name.removesuffix(".card.json") if source.is_file() else source.name


def compare(histories: dict[str, list[dict]], metric: str, every: int) -> list[str]:
    """The markdown table: the metric (%) per run at the chosen epochs, the first run against the others' mean."""
    names = list(histories)
    first, others = names[0], names[1:]
    by_epoch = {name: {row["epoch"]: row[metric] for row in rows if metric in row} for name, rows in histories.items()}
    if not by_epoch[first]:
        raise SystemExit(f"{first}: no epoch has {metric!r}")
    reached = max(by_epoch[first])
    epochs = sorted({e for e in by_epoch[first] if e % every == 0} | {reached})
    header = f"| epoch | {' | '.join(names)} |" + (f" {first} − mean of the others |" if others else "")
    lines = [header, "|---:|" + "---:|" * (len(names) + bool(others))]
    for epoch in epochs:
        cells = [f"{100 * by_epoch[n][epoch]:.2f}" if epoch in by_epoch[n] else "" for n in names]
        row = f"| {epoch} | {' | '.join(cells)} |"
        level = [by_epoch[n][epoch] for n in others if epoch in by_epoch[n]]
        if others:
            row += f" {100 * (by_epoch[first][epoch] - statistics.fmean(level)):+.2f} |" if level else " |"
        lines.append(row)
    best = []
    for name in names:
        epoch = max(by_epoch[name], key=lambda e: (by_epoch[name][e], -e))
        best.append(f"{100 * by_epoch[name][epoch]:.2f} (epoch {epoch} of {max(by_epoch[name])})")
    lines.append(f"| best so far | {' | '.join(best)} |" + (" |" if others else ""))
    return lines


def plot(histories: dict[str, list[dict]], metric: str, path: Path) -> None:
    fig, ax = plt.subplots(figsize=(7, 4.2))
    for i, (name, rows) in enumerate(histories.items()):
        points = [(row["epoch"], 100 * row[metric]) for row in rows if metric in row]
        ax.plot(*zip(*points, strict=True), label=name, linewidth=2.2 if i == 0 else 1.2)
    ax.set_xlabel("epoch")
    ax.set_ylabel(f"{metric} (%)")
    ax.grid(alpha=0.3)
    ax.legend()
    ax.set_title(f"{metric} by epoch")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("sources", nargs="+", type=Path, help="run folders or model cards; the first is compared")
    parser.add_argument("--metric", default="val_acc", help="a history column (default val_acc)")
    parser.add_argument("--every", type=int, default=10, help="a table row every this many epochs")
    parser.add_argument("--plot", type=Path, default=None, help="also draw the curves to this PNG")
    args = parser.parse_args(argv)
    if args.every < 1:
        parser.error("--every must be at least 1")
    sources = [source.expanduser() for source in args.sources]
    histories = {label(source): load_history(source) for source in sources}
    if len(histories) < len(sources):
        parser.error("two sources have the same name; pass each run once")
    print("\n".join(compare(histories, args.metric, args.every)))
    if args.plot:
        plot(histories, args.metric, args.plot)
        print(f"wrote {args.plot}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
