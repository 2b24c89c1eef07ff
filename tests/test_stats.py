"""export/stats.py against cases worked out by hand: McNemar's test, the bootstrap intervals, Holm, the verdict."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest

from mien.export.stats import (
    EXACT_BELOW,
    bootstrap_ci,
    holm,
    independent_bootstrap_diff,
    mcnemar,
    paired_bootstrap_diff,
    verdict,
)

ROOT = Path(__file__).resolve().parents[1]


def pairs(b10: int, b01: int, both_right: int = 30, both_wrong: int = 10) -> tuple[np.ndarray, np.ndarray]:
    """Per-face correctness of models a and b: ``b10`` faces only a gets right, ``b01`` only b."""
    a = [1] * b10 + [0] * b01 + [1] * both_right + [0] * both_wrong
    b = [0] * b10 + [1] * b01 + [1] * both_right + [0] * both_wrong
    return np.array(a, bool), np.array(b, bool)


def test_mcnemar_chi_squared_with_continuity_correction_textbook_case():
    a, b = pairs(b10=15, b01=5)
    test = mcnemar(a, b, exact=False)
    assert (test["b10"], test["b01"]) == (15, 5)
    assert test["statistic"] == pytest.approx((abs(15 - 5) - 1) ** 2 / 20) == pytest.approx(4.05)
    assert test["p_value"] == pytest.approx(0.0442, abs=5e-5) and not test["exact"]
    # 20 discordant faces are fewer than EXACT_BELOW: by default the exact binomial test answers
    assert EXACT_BELOW == 25
    auto = mcnemar(a, b)
    assert auto["exact"] and auto["p_value"] == pytest.approx(2 * sum(_binom(20, k) for k in range(6)) / 2**20)


def _binom(n: int, k: int) -> int:
    from math import comb

    return comb(n, k)


def test_mcnemar_exact_binomial_case_and_symmetry():
    a, b = pairs(b10=6, b01=1)
    test = mcnemar(a, b)
    assert test["exact"] and test["statistic"] == 1.0
    assert test["p_value"] == pytest.approx(0.125)  # 2 · (1 + 7) / 2**7
    swapped = mcnemar(b, a)
    assert (swapped["b01"], swapped["b10"]) == (6, 1) and swapped["p_value"] == pytest.approx(0.125)


def test_mcnemar_switches_to_chi_squared_at_25_discordant_faces():
    a, b = pairs(b10=30, b01=10)
    test = mcnemar(a, b)
    assert not test["exact"] and test["statistic"] == pytest.approx(19**2 / 40)
    assert test["p_value"] == pytest.approx(0.002663, rel=1e-3)
    balanced = mcnemar(*pairs(b10=20, b01=20))
    assert balanced["statistic"] == 0.0 and balanced["p_value"] == 1.0  # the correction never goes negative


def test_identical_predictors_have_p_one_and_a_zero_difference():
    correct = np.random.default_rng(0).random(300) < 0.6
    test = mcnemar(correct, correct)
    assert (test["b01"], test["b10"], test["p_value"]) == (0, 0, 1.0)
    assert paired_bootstrap_diff(correct, correct) == (0.0, 0.0)
    assert verdict(0.0, test["p_value"]) == "no measurable effect"


def test_bootstrap_ci_contains_the_accuracy_narrows_with_n_and_is_deterministic():
    rng = np.random.default_rng(1)
    widths = []
    for n in (100, 1000, 10000):
        correct = rng.random(n) < 0.65
        low, high = bootstrap_ci(correct)
        assert low <= correct.mean() <= high
        widths.append(high - low)
        assert bootstrap_ci(correct, seed=3) == bootstrap_ci(correct, seed=3)
        # the width of a 95% interval of a proportion: about 2 · 1.96 · sqrt(p(1-p)/n)
        assert high - low == pytest.approx(2 * 1.96 * np.sqrt(0.65 * 0.35 / n), rel=0.15)
    assert widths[0] > widths[1] > widths[2]
    low90, high90 = bootstrap_ci(correct, confidence=0.9)
    low95, high95 = bootstrap_ci(correct, confidence=0.95)
    assert low95 <= low90 and high90 <= high95
    assert bootstrap_ci(np.ones(50, bool)) == (1.0, 1.0)


def test_paired_bootstrap_interval_of_the_difference():
    a, b = pairs(b10=10, b01=40, both_right=400, both_wrong=150)  # b is 5 points better on 600 faces
    low, high = paired_bootstrap_diff(a, b)
    assert b.mean() - a.mean() == pytest.approx(0.05) and low < 0.05 < high
    assert low > 0  # clearly better: the interval excludes 0 ...
    assert mcnemar(a, b)["p_value"] < 0.001 and verdict(0.05, mcnemar(a, b)["p_value"]) == "helps"
    # ... and pairing matters: the unpaired intervals of the two accuracies overlap
    assert bootstrap_ci(a)[1] > bootstrap_ci(b)[0]
    assert paired_bootstrap_diff(a, b, seed=7) == paired_bootstrap_diff(a, b, seed=7)
    back = paired_bootstrap_diff(b, a)
    assert back[0] == pytest.approx(-high, abs=0.01) and back[1] == pytest.approx(-low, abs=0.01)


def test_independent_interval_matches_the_normal_approximation_of_two_samples():
    # 70% right on 2,872 faces against 68.5% on 3,589 (a val split and a test set, different faces)
    a = np.arange(2872) < round(0.70 * 2872)
    b = np.arange(3589) < round(0.685 * 3589)
    low, high = independent_bootstrap_diff(a, b)
    diff = b.mean() - a.mean()
    half = 1.96 * np.sqrt(a.mean() * (1 - a.mean()) / len(a) + b.mean() * (1 - b.mean()) / len(b))
    assert low < diff < high
    assert (low, high) == pytest.approx((diff - half, diff + half), abs=0.002)  # ±2.25 points here
    assert low < 0 < high  # a 1.5-point drop between two such samples is within chance
    # ten points apart, it is not
    assert independent_bootstrap_diff(a, np.arange(3589) < round(0.60 * 3589))[1] < 0
    assert independent_bootstrap_diff(a, b, seed=4) == independent_bootstrap_diff(a, b, seed=4)
    assert independent_bootstrap_diff(np.ones(10, bool), np.zeros(20, bool)) == (-1.0, -1.0)
    with pytest.raises(ValueError, match="non-empty 1-D"):
        independent_bootstrap_diff(a, np.array([], bool))


def test_verdict_and_input_checks():
    assert verdict(0.02, 0.01) == "helps" and verdict(-0.02, 0.01) == "hurts"
    assert verdict(0.02, 0.2) == "no measurable effect" and verdict(0.02, None) == "no measurable effect"
    with pytest.raises(ValueError, match="different faces"):
        mcnemar(np.ones(3, bool), np.ones(4, bool))
    with pytest.raises(ValueError, match="non-empty 1-D"):
        bootstrap_ci(np.array([], bool))


def _benchmark(name: str):
    spec = importlib.util.spec_from_file_location(name, ROOT / "benchmarks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_selection_optimism_is_the_kept_epoch_over_the_epochs_before_it():
    module = _benchmark("selection_optimism")
    history = [{"epoch": i + 1, "val_acc": v} for i, v in enumerate([0.5, 0.6, 0.6, 0.62, 0.6, 0.7, 0.65])]
    row = module.optimism(history, 4)
    assert row["epoch"] == 6 and row["val_acc"] == 0.7
    assert row["mean_before"] == pytest.approx(0.605) and row["optimism"] == pytest.approx(0.095)
    assert module.optimism(history, 6) is None  # only five epochs before the kept one


def test_split_overlap_drop_is_val_less_public_test_on_the_masked_faces():
    module = _benchmark("split_overlap")
    correct = {"val": np.arange(1000) < 720, "public_test": np.arange(1200) < 840}  # 72% and 70%
    every = {split: np.ones(len(c), bool) for split, c in correct.items()}
    drop = module.accuracy_drop(correct, every)
    assert drop["points"] == pytest.approx(2.0) and drop["ci95"][0] < 2.0 < drop["ci95"][1]
    # on a subset: the val faces 0-499 are 100% right, the test faces 600-1199 are 40% right
    subset = {"val": np.arange(1000) < 500, "public_test": np.arange(1200) >= 600}
    assert module.accuracy_drop(correct, subset)["points"] == pytest.approx(60.0)


def test_compare_curves_reads_runs_and_cards_and_puts_the_first_against_the_others(tmp_path):
    module = _benchmark("compare_curves")
    run = tmp_path / "run_a"
    run.mkdir()
    rows = [{"epoch": e, "val_acc": 0.5 + 0.01 * e} for e in range(1, 13)]
    rows.insert(5, {"epoch": 3, "val_acc": 0.0})  # an epoch written twice by a resume: the last row counts
    rows[6:6] = [{"epoch": 3, "val_acc": 0.535}]
    (run / "history.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    card = tmp_path / "b.card.json"
    card.write_text(json.dumps({"training": {"history": [{"epoch": e, "val_acc": 0.5} for e in range(1, 21)]}}))
    histories = {module.label(p): module.load_history(p) for p in (run, card)}
    assert list(histories) == ["run_a", "b"] and [r["epoch"] for r in histories["run_a"]] == list(range(1, 13))
    assert histories["run_a"][2]["val_acc"] == 0.535
    table = module.compare(histories, "val_acc", 5)
    assert [line.split("|")[1].strip() for line in table[2:-1]] == ["5", "10", "12"]  # every 5th and the last
    assert table[-2] == "| 12 | 62.00 | 50.00 | +12.00 |"
    assert table[-1] == "| best so far | 62.00 (epoch 12 of 12) | 50.00 (epoch 1 of 20) | |"
    module.plot(histories, "val_acc", tmp_path / "curves.png")
    assert (tmp_path / "curves.png").read_bytes()[:4] == b"\x89PNG"
    with pytest.raises(SystemExit, match="no history.jsonl"):
        module.load_history(tmp_path)


def test_calibration_cv_merges_only_a_file_of_the_same_split_and_repeats(tmp_path):
    module = _benchmark("calibration_cv")
    out = tmp_path / "calibration_cv.json"
    assert module.kept(out, "val", 5) == {}  # nothing measured yet
    out.write_text(json.dumps({"split": "val", "repeats": 5, "models": {"vgg_fer": {"faces": 2872}}}))
    assert module.kept(out, "val", 5) == {"vgg_fer": {"faces": 2872}}
    for split, repeats in (("public_test", 5), ("val", 3)):
        with pytest.raises(SystemExit, match="without --merge"):
            module.kept(out, split, repeats)


def test_holm_steps_down_from_the_smallest_p_and_stops_at_the_first_that_fails():
    # four tests at 0.05: thresholds 0.0125, 0.0167, 0.025, 0.05 for the sorted p-values
    assert holm([0.01, 0.04, 0.03, 0.005]) == [True, False, False, True]  # 0.005 < .0125, 0.01 < .0167, 0.03 ≥ .025
    assert holm([0.01, 0.015, 0.02, 0.04]) == [True, True, True, True]  # each under its own threshold
    # significant alone (p < 0.05) is not enough among sixteen: the smallest must be under 0.05 / 16
    assert holm([0.006] + [0.5] * 15) == [False] * 16
    assert holm([0.003] + [0.5] * 15) == [True] + [False] * 15
    # a p equal to its threshold is not below it; no tests, no rejections
    assert holm([0.025, 0.9]) == [False, False] and holm([]) == []
