"""The STN/SR ablation part of `mien results`: the paper's Table 2 retrained, each arm against Base with a bootstrap
interval, a paired bootstrap of the difference and McNemar's test, a verdict per seed and over seeds, and the SR front
end against bicubic upsampling. The rows are what :mod:`mien.export.results` measured; this module only compares and
renders them (and saves the cells README's table is written from).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from mien.card import FRONT_ENDS_DIR, SR_FRONT_END_KIND
from mien.export.stats import EXACT_BELOW, mcnemar, paired_bootstrap_diff, verdict

#: The STN/SR paper's Table 2 (FER2013 test accuracy, %), for the ablation rows.
PAPER_ABLATION = {"base_cnn": 66.5, "stn_cnn": 71.4, "sr_cnn": 72.7, "stn_sr_cnn": 73.4}
ABLATION_ROWS = {"base_cnn": "Base", "stn_cnn": "+STN", "sr_cnn": "+SR", "stn_sr_cnn": "+STN+SR"}
#: What the ablation's arms may differ in (their front end) and where a run happened to run; any other difference
#: between an arm's training configuration and Base's makes the pair something other than an ablation.
FRONT_END_KEYS = frozenset({"model", "stn_reg", "stn_lr_scale", "sr_init", "sr_lr_scale", "freeze_sr",
                            "sr_finetune_epochs", "model_kwargs.sr_kwargs"})  # fmt: skip
#: ``amp``: the precision follows the machine (``auto``: bf16 autocast where the CPU or GPU computes it natively,
#: fp32 elsewhere; the first arms' cards say ``bf16``, what ``auto`` gave on their machine), so it is where a run
#: ran, not its recipe; the table shows the precision each arm trained in (``precision`` of its card's history).
RUN_KEYS = frozenset({"data", "out", "threads", "device", "checkpoint_minutes", "amp"})
#: The level of the ablation's tests and the confidence of its intervals.
ALPHA = 0.05


def pct(value: float | None) -> str:
    """A fraction as a percentage with two decimals; "" for none."""
    return "" if value is None else f"{100 * value:.2f}"


def ablation_table(by_id: dict[str, dict], split: str) -> list[str]:
    """The STN/SR rows beside the paper's Table 2, with intervals, paired tests against Base and a verdict."""
    confidence = f"{1 - ALPHA:.0%}"
    lines = [
        "",
        "## STN / SR ablation (the paper's Table 2)",
        "",
        "The same classifier (`base_cnn`) alone, with a spatial transformer, with the super-resolution front "
        "end, and with both.",
        "",
        f"Accuracy with its {confidence} percentile bootstrap interval (10,000 resamples of the {split} faces); Δ: "
        f"the arm's accuracy minus Base's, with the {confidence} interval of a paired bootstrap (the same faces "
        "resampled for both); McNemar: the faces only Base gets right / only the arm gets right, and the p-value "
        f"of McNemar's test (exact binomial below {EXACT_BELOW} such faces, else χ² with continuity correction). "
        f"Verdict: helps or hurts when p < {ALPHA}, otherwise no measurable effect (three arms are tested "
        f"against Base: with a Holm correction the smallest p must be below {ALPHA / 3:.4f}). STN: the mean "
        "scale (sqrt|det| of the warp's 2×2 part; below 1 the transformer zooms in) and rotation (degrees) it "
        f"applies to the {split} faces. An arm trained with another recipe than Base (other than its front end: "
        "epochs, learning rate, widths...) is no ablation of it: its verdict says so and names the differences. "
        "Epochs: the run's schedule, the epoch whose weights were kept (the best on the validation split) and the "
        'precision it trained in: the recipes say `amp = "auto"`, bf16 autocast where the machine computes it '
        "natively and fp32 elsewhere, so an arm's precision is the machine it ran on, not a recipe difference.",
        "",
        f"| | model | epochs, kept | {split} accuracy % [{confidence} CI] | Δ vs Base, points [{confidence} CI] "
        "| McNemar vs Base | paper, FER2013 test % | occluded % | STN scale / rotation | verdict |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for c in ablation_cells(by_id):
        lines.append(f"| {c['arm']} | `{c['model_id']}` | {c['epochs']} | {c['accuracy']} | {c['delta']} | {c['test']} "
                     f"| {c['paper']} | {c['occluded']} | {c['stn']} | {c['verdict']} |")  # fmt: skip
    return lines


def ablation_cells(by_id: dict[str, dict]) -> list[dict]:
    """The ablation table's cells, one dict per arm in the paper's order (saved as ``ablation.json`` and shown in
    README): accuracy with its interval, Δ and McNemar against Base, the verdict ("reference" for Base; "not
    comparable, trained differently: ..." for an arm trained with another recipe than Base), the paper's figure."""
    base = by_id["base_cnn"]
    cells = []
    for model_id, name in ABLATION_ROWS.items():
        r = by_id[model_id]
        accuracy, epochs, stn_cell = _arm_cells(r)
        if model_id == "base_cnn":
            delta, test, conclusion = "", "", "reference"
        else:
            delta, test, conclusion = _versus(base, r)
            differences = recipe_differences(base.get("train_config"), r.get("train_config"))
            if differences:
                conclusion = f"not comparable, trained differently: {differences}"
        cells.append({"arm": name, "model_id": model_id, "epochs": epochs, "accuracy": accuracy, "delta": delta,
                      "test": test, "verdict": conclusion, "paper": PAPER_ABLATION[model_id],
                      "occluded": pct(r["occluded_accuracy"]), "stn": stn_cell})  # fmt: skip
    return cells


def _arm_cells(r: dict) -> tuple[str, str, str]:
    """An ablation row's accuracy with its interval, its epochs (the schedule, the epoch kept and the precision it
    trained in) and its STN's mean scale / rotation ("" without one)."""
    ci = r.get("accuracy_ci95")
    accuracy = pct(r["accuracy"]) + (f" [{pct(ci[0])}, {pct(ci[1])}]" if ci else "")
    schedule = (r.get("train_config") or {}).get("epochs")
    epochs = f"{schedule}, kept {r['epochs']}" if schedule and r.get("epochs") else str(r.get("epochs") or "")
    epochs += f", {r['precision']}" if r.get("precision") and epochs else ""
    stn = r.get("stn_affine")
    return accuracy, epochs, f"{stn['scale']:.3f} / {stn['rotation_deg']:+.1f}°" if stn else ""


def ablation_seeds_table(by_id: dict[str, dict], seeds: list[dict], split: str) -> list[str]:
    """Each arm once per seed: the bundled arm and its further seeds, each against Base trained with the same seed
    (the paired tests above, per seed), and a verdict over the seeds (helps or hurts only when every seed says so).
    Nothing when there is no further seed."""
    per_seed, summary = _seed_rows(by_id, seeds)
    if not summary:
        return []
    confidence = f"{1 - ALPHA:.0%}"
    lines = [
        "",
        "### Every seed of each arm",
        "",
        "Seed-to-seed spread, measured: each arm trained again with another seed and nothing else changed (the "
        "files in `models/seeds/`, scored here, not served), each compared with Base trained with the same seed "
        f"(Δ with its paired {confidence} interval, McNemar as above). Differs from the bundled arm: its training "
        "configuration against the bundled arm's (nothing but the seed, for a fair repeat). Over seeds: helps or "
        "hurts only when every seed's test says so, otherwise no measurable effect.",
        "",
        f"| | model | seed | epochs, kept | {split} accuracy % [{confidence} CI] | Δ vs Base of the same seed, "
        f"points [{confidence} CI] | McNemar vs that Base | STN scale / rotation | differs from the bundled arm |",
        "|---|---|---|---|---|---|---|---|---|",
        *per_seed,
    ]
    lines += ["", f"| over seeds | seeds | mean {split} accuracy % | mean Δ vs Base, points | verdict over seeds |",
              "|---|---|---|---|---|"]  # fmt: skip
    lines += [f"| {c['arm']} | {c['seeds']} | {c['mean_accuracy']} | {c['mean_delta']} | {c['verdict']} |"
              for c in summary]  # fmt: skip
    return lines


def sr_front_end_cards(model_dir: Path) -> list[dict]:
    """The cards of the exported SR front ends in ``model_dir``/frontends (``mien export`` of a pretrain-sr run)."""
    cards = []
    for path in sorted((model_dir / FRONT_ENDS_DIR).glob("*.card.json")):
        card = json.loads(path.read_text())
        if card.get("kind") == SR_FRONT_END_KIND:
            cards.append(card)
    return cards


def sr_front_end_table(cards: list[dict]) -> list[str]:
    """The pre-trained SR front ends against bicubic upsampling, as their export scored them (their cards)."""
    if not cards:
        return []
    lines = [
        "",
        "### The SR front end against bicubic upsampling",
        "",
        "The pre-trained EDSR the SR arms start from (`models/frontends/`, not served), scored when it was exported "
        "(`mien export` of its `mien pretrain-sr` checkpoint; `mien sr-eval FILE --split SPLIT` scores it again): "
        "each 48×48 face is the truth, its ×2 area downscale the input, and the network's output and bicubic "
        "upsampling are scored against the truth (PSNR on the 0–255 scale, SSIM; each face alone, then averaged). "
        "Margin: SR − bicubic, with its 95% interval over the faces. val: the faces carved from Training, which the "
        "pre-training held out; public_test: the test set.",
        "",
        "| front end | split | faces | PSNR dB (bicubic) | PSNR margin dB [95% CI] | SSIM (bicubic) "
        "| SSIM margin [95% CI] | pre-training |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for card in cards:
        kwargs, run = card["sr_kwargs"], card.get("training", {}).get("run", {})
        name = f"`{card['file']}`: EDSR B={kwargs['num_blocks']}, F={kwargs['features']}, {card['parameters']:,} params"
        epochs = run.get("epochs", 0)
        trained = f"{epochs} epoch{'s' * (epochs != 1)}, {run.get('cpu_hours', 0):.2f} CPU-h" if run else ""
        for split, e in card.get("evaluation", {}).items():
            p, q, pm, qm = e["psnr_db"], e["ssim"], e["psnr_margin_db"], e["ssim_margin"]
            lines.append(
                f"| {name} | {split} | {e['faces']:,} | {p['sr']['mean']:.2f} ({p['bicubic']['mean']:.2f}) "
                f"| {pm['mean']:+.2f} [{pm['ci95'][0]:+.2f}, {pm['ci95'][1]:+.2f}] "
                f"| {q['sr']['mean']:.4f} ({q['bicubic']['mean']:.4f}) "
                f"| {qm['mean']:+.4f} [{qm['ci95'][0]:+.4f}, {qm['ci95'][1]:+.4f}] | {trained} |"
            )
    return lines


def over_seeds(by_id: dict[str, dict], seeds: list[dict]) -> list[dict]:
    """The verdict over seeds, one dict per arm (arm, seeds, mean accuracy and mean Δ vs Base in points, verdict);
    [] when no arm has a further seed."""
    return _seed_rows(by_id, seeds)[1]


def _seed_rows(by_id: dict[str, dict], seeds: list[dict]) -> tuple[list[str], list[dict]]:
    """The per-seed table's rows, and the summary over seeds per arm (both empty without a further seed)."""
    seeds = [r for r in seeds if r["arm"] in ABLATION_ROWS]
    if not seeds:
        return [], []
    arms = {model_id: [by_id[model_id], *sorted((r for r in seeds if r["arm"] == model_id), key=lambda r: r["seed"])]
            for model_id in ABLATION_ROWS}  # fmt: skip
    base_of = {(r.get("train_config") or {}).get("seed"): r for r in arms["base_cnn"]}
    lines, summary = [], []
    for model_id, name in ABLATION_ROWS.items():
        verdicts, deltas = [], []
        for r in arms[model_id]:
            seed = (r.get("train_config") or {}).get("seed")
            accuracy, epochs, stn_cell = _arm_cells(r)
            base = base_of.get(seed)
            if model_id == "base_cnn":
                delta, test = "", "reference"
            elif base is None:
                delta, test = "", f"no Base with seed {seed}"
            else:
                delta, test, conclusion = _versus(base, r)
                if recipe_differences(base.get("train_config"), r.get("train_config")):
                    conclusion = "not comparable"  # trained differently from that Base: the table above names how
                verdicts.append(conclusion)
                deltas.append(r["accuracy"] - base["accuracy"])
            bundled = by_id[model_id]
            differs = "(bundled)" if r is bundled else recipe_differences(bundled.get("train_config"),
                                                                          r.get("train_config"))  # fmt: skip
            lines.append(f"| {name} | `{r['model_id']}` | {seed} | {epochs} | {accuracy} | {delta} | {test} "
                         f"| {stn_cell} | {differs or 'nothing'} |")  # fmt: skip
        over, mean_delta = "reference", ""
        if model_id != "base_cnn":
            over = verdicts[0] if verdicts and len(set(verdicts)) == 1 else "no measurable effect"
            if "not comparable" in verdicts:
                over = "not comparable (trained differently from Base, see above)"
            elif len(set(verdicts)) > 1:
                over += f" (seeds disagree: {', '.join(verdicts)})"
            mean_delta = f"{100 * float(np.mean(deltas)):+.2f}" if deltas else ""
        summary.append({"arm": name, "seeds": len(arms[model_id]),
                        "mean_accuracy": f"{100 * float(np.mean([r['accuracy'] for r in arms[model_id]])):.2f}",
                        "mean_delta": mean_delta, "verdict": over})  # fmt: skip
    return lines, summary


def recipe_differences(base: dict | None, arm: dict | None, shown: int = 4) -> str:
    """How an arm's training configuration differs from Base's beyond its front end (``FRONT_END_KEYS``) and where
    it ran (``RUN_KEYS``), as "key arm vs Base" items ("" when they agree; nested tables such as ``augment`` and
    ``model_kwargs`` are compared key by key, the SR arms' ``sr_kwargs`` being their front end; a key one card
    lacks counts as a difference unless the other's value is empty, such as ``init = ""``; both show as "—").
    "unknown" when a card has no configuration."""
    if base is None or arm is None:
        return "unknown (a card without its training configuration)"

    def flat(config: dict, prefix: str = "") -> dict:
        out = {}
        for key, value in config.items():
            if prefix + key in FRONT_END_KEYS | RUN_KEYS:
                continue
            if isinstance(value, dict):
                out.update(flat(value, f"{prefix}{key}."))
            else:
                out[prefix + key] = value
        return out

    a, b = flat(arm), flat(base)

    def value(config: dict, key: str):  # an absent key and an empty value ("", [], {}) mean the same: none set
        return config.get(key) if config.get(key) not in ("", [], {}) else None

    keys = [key for key in dict.fromkeys([*b, *a]) if value(a, key) != value(b, key)]
    shown_as = {None: "—"}
    items = [f"{key} {shown_as.get(value(a, key), value(a, key))} vs {shown_as.get(value(b, key), value(b, key))}"
             for key in keys[:shown]]  # fmt: skip
    return ", ".join(items) + (f" and {len(keys) - shown} more" if len(keys) > shown else "")


def _versus(base: dict, arm: dict) -> tuple[str, str, str]:
    """(Δ cell, McNemar cell, verdict) of ``arm`` against ``base`` on the same faces; blanks and no verdict
    when their per-face correctness is not at hand or covers different faces."""
    a, b = base.get("correct"), arm.get("correct")
    difference = arm["accuracy"] - base["accuracy"]
    if a is None or b is None or len(a) != len(b):
        return f"{100 * difference:+.2f}", "", "not tested (different faces)"
    low, high = paired_bootstrap_diff(a, b, confidence=1 - ALPHA)
    test = mcnemar(a, b)
    p = test["p_value"]
    p_text = f"{p:.3f}" if p >= 0.001 else f"{p:.1e}"
    return (f"{100 * difference:+.2f} [{100 * low:+.2f}, {100 * high:+.2f}]",
            f"{test['b10']} / {test['b01']}, p = {p_text}{' (exact)' if test['exact'] else ''}",
            verdict(difference, p, ALPHA))  # fmt: skip
