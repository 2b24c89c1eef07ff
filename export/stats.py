"""How sure a measured accuracy is, and whether two models differ on the same faces (numpy + scipy only).

* :func:`bootstrap_ci`: the percentile bootstrap interval of one model's accuracy.
* :func:`paired_bootstrap_diff`: the interval of the accuracy difference of two models scored on the same
  faces (the faces are resampled together, so what both get right or wrong cancels).
* :func:`independent_bootstrap_diff`: the interval of the accuracy difference of one model (or two) on two
  different sets of faces (each set resampled on its own), e.g. a validation split against the test set.
* :func:`mcnemar`: McNemar's test of two models on the same faces, from the faces where they disagree.
* :func:`holm`: which of several p-values stay significant when all are tested at once (Holm's step-down).
* :func:`verdict`: "helps", "hurts" or "no measurable effect", from a difference and its p-value.

Resampling faces with replacement makes the count of right answers binomial (one model) or the counts of
the four (right, wrong) pairs multinomial (two models) with the observed shares, so the bootstraps draw
those counts directly: the same distribution as resampling index arrays, without n_boot × n indices.
"""

from __future__ import annotations

import numpy as np
from scipy.stats import binomtest, chi2

#: Below this many discordant faces McNemar's p-value is the exact binomial one (the χ² approximation is poor).
EXACT_BELOW = 25


def _bools(values, name: str) -> np.ndarray:
    array = np.asarray(values)
    if array.ndim != 1 or len(array) == 0:
        raise ValueError(f"{name}: expected a non-empty 1-D array of per-face correctness, got shape {array.shape}")
    return array.astype(bool)


def _pair(a_correct, b_correct) -> tuple[np.ndarray, np.ndarray]:
    a, b = _bools(a_correct, "a_correct"), _bools(b_correct, "b_correct")
    if len(a) != len(b):
        raise ValueError(f"the two models were scored on different faces: {len(a)} against {len(b)}")
    return a, b


def _percentiles(samples: np.ndarray, confidence: float) -> tuple[float, float]:
    if not 0 < confidence < 1:
        raise ValueError(f"confidence must be in (0, 1), got {confidence}")
    tail = (1 - confidence) / 2
    low, high = np.quantile(samples, [tail, 1 - tail])
    return float(low), float(high)


def bootstrap_ci(correct, n_boot: int = 10_000, confidence: float = 0.95, seed: int = 0) -> tuple[float, float]:
    """Percentile bootstrap interval of the accuracy ``correct.mean()`` (``correct``: one bool per face)."""
    correct = _bools(correct, "correct")
    n = len(correct)
    rng = np.random.default_rng(seed)
    accuracies = rng.binomial(n, correct.mean(), size=n_boot) / n
    return _percentiles(accuracies, confidence)


def paired_bootstrap_diff(
    a_correct, b_correct, n_boot: int = 10_000, confidence: float = 0.95, seed: int = 0
) -> tuple[float, float]:
    """Percentile bootstrap interval of accuracy(b) − accuracy(a), faces resampled in pairs."""
    a, b = _pair(a_correct, b_correct)
    n = len(a)
    # shares of the pairs (a wrong, b right), (a right, b wrong) and the two concordant kinds together
    b_only, a_only = np.mean(~a & b), np.mean(a & ~b)
    rng = np.random.default_rng(seed)
    counts = rng.multinomial(n, [b_only, a_only, max(0.0, 1.0 - b_only - a_only)], size=n_boot)
    return _percentiles((counts[:, 0] - counts[:, 1]) / n, confidence)


def independent_bootstrap_diff(
    a_correct, b_correct, n_boot: int = 10_000, confidence: float = 0.95, seed: int = 0
) -> tuple[float, float]:
    """Percentile bootstrap interval of accuracy(b) − accuracy(a) on two different sets of faces, each resampled
    on its own (no pairing: the sets may differ in size). Its half-width is about 1.96 · √(p(1−p)/n_a +
    p(1−p)/n_b): two samples of a few thousand faces differ by a point or two by chance alone."""
    a, b = _bools(a_correct, "a_correct"), _bools(b_correct, "b_correct")
    rng = np.random.default_rng(seed)
    acc_a = rng.binomial(len(a), a.mean(), size=n_boot) / len(a)
    acc_b = rng.binomial(len(b), b.mean(), size=n_boot) / len(b)
    return _percentiles(acc_b - acc_a, confidence)


def mcnemar(a_correct, b_correct, exact: bool | None = None) -> dict:
    """McNemar's test of two models on the same faces.

    ``b01``: faces ``a`` gets wrong and ``b`` right; ``b10``: the reverse. Under the null hypothesis (equal
    accuracy) each discordant face goes either way with probability 1/2. With fewer than
    :data:`EXACT_BELOW` discordant faces the p-value is the exact two-sided binomial test
    (``statistic``: the smaller count); otherwise χ² with continuity correction,
    (|b01 − b10| − 1)² / (b01 + b10) on one degree of freedom. ``exact`` True or False forces one of the
    two. No discordant face: p = 1.
    """
    a, b = _pair(a_correct, b_correct)
    b01, b10 = int(np.sum(~a & b)), int(np.sum(a & ~b))
    n = b01 + b10
    if n == 0:
        return {"b01": 0, "b10": 0, "statistic": 0.0, "p_value": 1.0, "exact": True}
    if exact if exact is not None else n < EXACT_BELOW:
        p = binomtest(b01, n, 0.5, alternative="two-sided").pvalue
        return {"b01": b01, "b10": b10, "statistic": float(min(b01, b10)), "p_value": float(min(1.0, p)),
                "exact": True}  # fmt: skip
    statistic = max(0, abs(b01 - b10) - 1) ** 2 / n
    return {"b01": b01, "b10": b10, "statistic": float(statistic), "p_value": float(chi2.sf(statistic, 1)),
            "exact": False}  # fmt: skip


def holm(p_values, alpha: float = 0.05) -> list[bool]:
    """Which of several hypotheses Holm's step-down procedure rejects with a family-wise error of at most
    ``alpha``: the k-th smallest p (k from 0) is rejected while it, and every smaller one, is below
    alpha / (n - k)."""
    p = [float(v) for v in p_values]
    reject = [False] * len(p)
    for rank, i in enumerate(sorted(range(len(p)), key=p.__getitem__)):
        if p[i] >= alpha / (len(p) - rank):
            break
        reject[i] = True
    return reject


def verdict(difference: float, p_value: float | None, alpha: float = 0.05) -> str:
    """What a difference means at level ``alpha``: "helps" (better, p < alpha), "hurts" (worse, p < alpha) or
    "no measurable effect" (p ≥ alpha, or no test)."""
    if p_value is None or p_value >= alpha or difference == 0:
        return "no measurable effect"
    return "helps" if difference > 0 else "hurts"
