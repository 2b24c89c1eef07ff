"""Calibration measures against hand-computed cases, the temperature fit on synthetic over- and under-confident
models, and calibration in the scoring report."""

from __future__ import annotations

import math

import numpy as np
import pytest

from mien.export.calibration import (
    TEMPERATURE_BOUNDS,
    brier_score,
    calibration_report,
    coverage_curve,
    ece_consistency,
    expected_calibration_error,
    fit_calibration,
    fit_temperature,
    negative_log_likelihood,
    plot_coverage,
    plot_reliability,
    reliability_bins,
    rescale,
)
from mien.export.evaluate import SplitFaces, score_faces
from mien.spec import PreprocessSpec

# Four faces, two classes: top confidences 0.9 (right), 0.9 (wrong), 0.62 (right), 0.78 (right).
PROBS = np.array([[0.9, 0.1], [0.9, 0.1], [0.62, 0.38], [0.22, 0.78]])
TRUTH = np.array([0, 1, 0, 1])


def test_ece_by_hand():
    # 15 bins of width 1/15: 0.9 and 0.9 share a bin (accuracy 0.5), 0.62 and 0.78 are alone (accuracy 1).
    expected = 2 / 4 * abs(0.5 - 0.9) + 1 / 4 * abs(1 - 0.62) + 1 / 4 * abs(1 - 0.78)
    assert expected_calibration_error(PROBS, TRUTH) == pytest.approx(expected)  # 0.35
    filled = [b for b in reliability_bins(PROBS, TRUTH) if b["count"]]
    assert [(b["count"], b["accuracy"]) for b in filled] == [(1, 1.0), (1, 1.0), (2, 0.5)]
    assert sum(b["count"] for b in reliability_bins(PROBS, TRUTH)) == 4


def test_a_confidence_of_one_lands_in_the_last_bin_and_perfect_calibration_scores_zero():
    probs = np.array([[1.0, 0.0], [0.0, 1.0]])
    assert reliability_bins(probs, np.array([0, 1]))[-1]["count"] == 2
    assert expected_calibration_error(probs, np.array([0, 1])) == 0.0


def test_nll_and_brier_by_hand():
    nll = -(math.log(0.9) + math.log(0.1) + math.log(0.62) + math.log(0.78)) / 4
    assert negative_log_likelihood(PROBS, TRUTH) == pytest.approx(nll)
    brier = (2 * 0.1**2 + 2 * 0.9**2 + 2 * 0.38**2 + 2 * 0.22**2) / 4
    assert brier_score(PROBS, TRUTH) == pytest.approx(brier)
    report = calibration_report(PROBS, TRUTH)
    assert set(report) == {"ece", "nll", "brier", "mean_confidence", "overconfidence", "ece_floor", "ece_floor_95",
                           "ece_p_calibrated", "ece_within_target", "bins", "coverage"}  # fmt: skip
    assert len(report["bins"]) == 15


def test_overconfidence_is_the_mean_top_probability_less_the_accuracy_with_its_sign():
    report = calibration_report(PROBS, TRUTH)
    assert report["mean_confidence"] == pytest.approx((0.9 + 0.9 + 0.62 + 0.78) / 4)  # 0.80
    assert report["overconfidence"] == pytest.approx(0.80 - 3 / 4)  # claims 80%, gets 75% right
    humble = calibration_report(np.array([[0.6, 0.4], [0.3, 0.7]]), np.array([0, 1]))
    assert humble["overconfidence"] == pytest.approx(0.65 - 1.0)  # under-confident: negative


def synthetic(scale: float, n: int = 20_000, classes: int = 7, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Truth drawn from softmax(z) (a calibrated model), and the probabilities of a model whose logits are
    ``scale`` × z: over-confident for scale > 1, under-confident below."""
    rng = np.random.default_rng(seed)
    z = rng.normal(0, 1.5, (n, classes))
    calibrated = np.exp(z) / np.exp(z).sum(axis=1, keepdims=True)
    truth = np.array([rng.choice(classes, p=row) for row in calibrated])
    scaled = np.exp(scale * z) / np.exp(scale * z).sum(axis=1, keepdims=True)
    return scaled, truth


@pytest.mark.parametrize("scale", [2.0, 0.5])
def test_the_temperature_fit_recovers_the_known_temperature(scale):
    probs, truth = synthetic(scale)
    temperature = fit_temperature(probs, truth)
    assert temperature == pytest.approx(scale, rel=0.05)
    fixed = rescale(probs, temperature)
    assert expected_calibration_error(fixed, truth) < expected_calibration_error(probs, truth)
    assert expected_calibration_error(fixed, truth) < 0.02
    assert negative_log_likelihood(fixed, truth) < negative_log_likelihood(probs, truth)


@pytest.mark.parametrize("method", ["entropy", "top-label"])
def test_a_fit_on_faces_of_one_entropy_stays_inside_its_bounds(method):
    """An untrained network answers every face almost uniformly: every face has entropy ≈ 1, so only the per-face
    temperature at h = 1 is determined, and an unbounded search drifted to T ≈ 1e-312 with slope 247 (which
    `mien calibrate` then refused). The fit keeps the per-face temperature inside the bounds at every entropy."""
    rng = np.random.default_rng(0)
    logits = rng.normal(0, 0.05, (28, 7))
    probs = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    truth = rng.integers(0, 7, 28)
    temperature, slope, curve = fit_calibration(probs, truth, method)
    h = np.linspace(0, 1, 11)
    per_face = temperature * np.exp(slope * h + curve * h * h)
    low, high = TEMPERATURE_BOUNDS
    assert np.all((per_face >= low * (1 - 1e-6)) & (per_face <= high * (1 + 1e-6))), (temperature, slope, curve)
    assert np.isfinite(rescale(probs, temperature, slope, curve)).all()


def test_rescaling_never_changes_the_argmax_and_keeps_probabilities():
    probs, _ = synthetic(3.0, n=2000)
    for temperature in (0.3, 1.0, 2.5):
        out = rescale(probs, temperature)
        assert (out.argmax(1) == probs.argmax(1)).all()
        np.testing.assert_allclose(out.sum(1), 1.0, atol=1e-9)
    np.testing.assert_allclose(rescale(probs, 1.0), probs, atol=1e-9)


def test_the_ece_floor_by_hand():
    # One face at confidence 0.5 alone in its bin: every draw is |right − 0.5| = 0.5 whatever it draws.
    one = ece_consistency(np.array([[0.5, 0.3, 0.2]]), ece=0.5, draws=200)
    assert one["ece_floor"] == pytest.approx(0.5) and one["ece_floor_95"] == pytest.approx(0.5)
    assert one["ece_p_calibrated"] == 1.0
    # Confidence 1 is right in every draw: the floor is 0, and any measured gap is certainly miscalibration.
    sure = ece_consistency(np.array([[1.0, 0.0], [0.0, 1.0]]), ece=0.1, draws=200)
    assert sure["ece_floor"] == 0.0 and sure["ece_p_calibrated"] == 0.0
    assert sure["bands"][-1] == (1.0, 1.0) and sure["bands"][0] == (None, None)
    # The share of calibrated draws within the target (2%): the lone 0.5 face always scores 0.5, confidence 1
    # always 0.
    assert one["ece_within_target"] == 0.0 and sure["ece_within_target"] == 1.0


def test_the_share_within_the_target_is_the_share_of_draws_at_or_under_it():
    # Two faces at confidence 0.6 share a bin: a draw gets 0, 1 or 2 right, ECE |k/2 − 0.6| = 0.6, 0.1 or 0.4
    # with chances 0.16, 0.48 and 0.36.
    probs = np.array([[0.6, 0.4], [0.4, 0.6]])
    assert ece_consistency(probs, target=0.1, draws=20000)["ece_within_target"] == pytest.approx(0.48, abs=0.02)
    assert ece_consistency(probs, target=0.4, draws=20000)["ece_within_target"] == pytest.approx(0.84, abs=0.02)
    assert ece_consistency(probs, target=0.05, draws=200)["ece_within_target"] == 0.0


def test_a_calibrated_model_is_within_its_floor_and_a_miscalibrated_one_is_not():
    calibrated, truth = synthetic(1.0, n=3000, seed=1)
    report = calibration_report(calibrated, truth)
    assert report["ece"] > 0.0  # a finite set: never 0 even for the true probabilities
    assert report["ece"] <= report["ece_floor_95"] and report["ece_p_calibrated"] > 0.05
    for b in report["bins"]:
        if b["count"] >= 50:  # well-filled bins of calibrated probabilities sit inside their 95% range (by margin)
            assert b["calibrated_low"] - 0.05 <= b["accuracy"] <= b["calibrated_high"] + 0.05
    over, truth = synthetic(2.0, n=3000, seed=1)
    report = calibration_report(over, truth)
    assert report["ece"] > report["ece_floor_95"] and report["ece_p_calibrated"] < 0.01


def test_the_floor_shrinks_as_the_faces_grow():
    probs, _ = synthetic(1.0, n=8000, seed=2)
    small, large = ece_consistency(probs[:500])["ece_floor"], ece_consistency(probs)["ece_floor"]
    assert large < small / 2  # about 1/sqrt(faces): 4× fewer faces would be 2×, 16× gives about 4×


def test_the_reliability_diagram_and_the_coverage_curve_are_drawn(tmp_path):
    for plot, name in ((plot_reliability, "reliability.png"), (plot_coverage, "coverage.png")):
        plot(calibration_report(PROBS, TRUTH), tmp_path / name, "four faces")
        assert (tmp_path / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_coverage_by_hand():
    # top confidences 0.9 (right), 0.9 (wrong), 0.62 (right), 0.78 (right)
    curve = {c["min_confidence"]: c for c in coverage_curve(PROBS, TRUTH, (0.5, 0.62, 0.7, 0.85, 0.95))}
    assert [(t, c["coverage"], c["accuracy"]) for t, c in curve.items()] == [
        (0.5, 1.0, 0.75),  # every face labelled
        (0.62, 1.0, 0.75),  # a top probability equal to the threshold is labelled (only below is uncertain)
        (0.7, 0.75, 2 / 3),
        (0.85, 0.5, 0.5),
        (0.95, 0.0, None),  # no label left: no accuracy to report
    ]
    default = coverage_curve(PROBS, TRUTH)
    assert [c["min_confidence"] for c in default] == pytest.approx([0.3 + 0.05 * i for i in range(13)])
    assert default[0]["min_confidence"] == 0.3 and default[-1]["min_confidence"] == 0.9


class Fixed:
    """A classifier that answers fixed probabilities over three classes."""

    spec = PreprocessSpec(labels=("a", "b", "c"))

    def __init__(self, probs: np.ndarray) -> None:
        self.probs = probs

    def predict_crops(self, crops, batch_size=256):
        return self.probs[: len(crops)]


def test_scoring_reports_calibration_of_the_scored_classes():
    # Scored on classes a and c only: b's probability is left out and the rest renormalised.
    probs = np.array([[0.6, 0.2, 0.2], [0.1, 0.5, 0.4]])
    faces = SplitFaces(np.zeros((2, 48, 48), np.uint8), np.array([0, 1]), ("a", "c"), [0, 2])
    report = score_faces(Fixed(probs), faces)
    scored = np.array([[0.75, 0.25], [0.2, 0.8]])
    assert report["calibration"]["nll"] == pytest.approx(negative_log_likelihood(scored, np.array([0, 1])))
    assert report["calibration"]["ece"] == pytest.approx(expected_calibration_error(scored, np.array([0, 1])))
    assert report["accuracy"] == 1.0
