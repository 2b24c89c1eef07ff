"""Which bundled models to average, and with what weights: greedy forward selection, the k most accurate,
and weights fitted by minimising the negative log-likelihood, all on one split (the validation split).

Every candidate is scored once (its probabilities for the split's faces, and with ``flip`` also for their
mirror images); sets are then scored by averaging those probabilities, which is what
:class:`mien.ensemble.EnsembleClassifier` serves. The chosen set goes to ``mien ensemble``, which measures it
again through the served code path. Choose on a validation split: the figure of an ensemble on the split
that chose it is optimistic by construction.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np

from mien.card import card_for
from mien.ensemble import select_columns
from mien.export.evaluate import SplitFaces, eval_split
from mien.export.prob_cache import cached
from mien.runtime import OnnxClassifier

Probabilities = dict[str, np.ndarray]  # model id -> (faces × scored classes)


def not_held_out(model_dir: str | Path, names: list[str], split: str) -> dict[str, str]:
    """The models among ``names`` whose cards do not say ``split`` was held out from their training, each with
    the reason: choosing members or fitting weights on faces a member trained on would favour that member.

    A card says so by ``metrics.selected_on == split`` (`mien train` carves the validation split by default);
    the models trained before issue 14 were selected on public_test and trained on all of Training.
    """
    refused = {}
    for name in names:
        card = card_for(Path(model_dir) / f"{name}.onnx")
        selected_on = card.selected_on if card is not None else None
        if selected_on != split:
            refused[name] = "no card" if card is None else f"selected on {selected_on!r}, trained on the {split} faces"
    return refused


def member_probabilities(
    model_dir: str | Path,
    names: list[str],
    data: str,
    split: str,
    flip: bool = False,
    on_model: Callable[[str, float], None] | None = None,
    cache: str | Path | None = None,
) -> tuple[Probabilities, np.ndarray]:
    """Each model's probabilities for the faces of ``split`` (averaged with their mirrors' with ``flip``),
    and the truth. ``on_model(name, accuracy)`` is called after each model; ``cache``: a folder keeping the
    probabilities of unchanged files between calls (:mod:`mien.export.prob_cache`)."""
    probs: Probabilities = {}
    faces: dict[tuple[str, ...], SplitFaces] = {}  # one data load per label set, not per model
    truth = np.zeros(0, np.int64)
    for name in names:
        path = Path(model_dir) / f"{name}.onnx"
        clf = cached(OnnxClassifier.from_path(path, providers=("CPUExecutionProvider",)), path, cache)
        labels = tuple(clf.spec.labels)
        if labels not in faces:
            faces[labels] = eval_split(data, split, labels)
        images, truth, _, columns = faces[labels]
        p = clf.predict_crops(list(images))
        if flip:
            p = 0.5 * (p + clf.predict_crops([np.ascontiguousarray(im[:, ::-1]) for im in images]))
        probs[name] = select_columns(p, columns)  # what the served ensemble averages for such a member
        if on_model:
            on_model(name, accuracy(probs, [name], truth))
    return probs, truth


def accuracy(probs: Probabilities, members: list[str], truth: np.ndarray) -> float:
    """Accuracy of the mean of the members' probabilities (the sum has the same argmax)."""
    return float(np.mean(sum(probs[m] for m in members).argmax(1) == truth))


def greedy_members(probs: Probabilities, truth: np.ndarray) -> list[tuple[str, float]]:
    """Add, one at a time, the model that raises the ensemble's accuracy most, until none does;
    each step's (model added, accuracy after)."""
    chosen: list[str] = []
    steps: list[tuple[str, float]] = []
    best = 0.0
    while True:
        scores = {n: accuracy(probs, [*chosen, n], truth) for n in probs if n not in chosen}
        if not scores:
            break
        name, score = max(scores.items(), key=lambda kv: kv[1])
        if score <= best:
            break
        chosen.append(name)
        steps.append((name, score))
        best = score
    return steps


def top_k(probs: Probabilities, truth: np.ndarray) -> tuple[list[str], dict[int, float]]:
    """The models ranked by their own accuracy, and the accuracy of the k best for every k ≥ 2.

    Greedy selection stops at the first step that does not help; a larger set can still, so this is
    scored too.
    """
    ranked = sorted(probs, key=lambda n: -accuracy(probs, [n], truth))
    return ranked, {k: accuracy(probs, ranked[:k], truth) for k in range(2, len(ranked) + 1)}


def mixture(probs: Probabilities, members: list[str], weights: list[float] | None = None) -> np.ndarray:
    """The weighted mean of the members' probabilities (equal weights when None)."""
    weights = weights or [1.0 / len(members)] * len(members)
    return sum(w * probs[m] for m, w in zip(members, weights, strict=True))


def nll(p: np.ndarray, truth: np.ndarray) -> float:
    """Mean negative log-likelihood of the true class."""
    return float(-np.mean(np.log(np.clip(p[np.arange(len(truth)), truth], 1e-12, None))))


def fit_weights(probs: Probabilities, members: list[str], truth: np.ndarray) -> list[float]:
    """Member weights on the simplex that minimise the NLL of the weighted mean on these faces.

    Weights are softmax(θ), so they stay positive and sum to 1; L-BFGS from equal weights. The NLL (not
    the accuracy, which is flat almost everywhere) is what is fitted: it rewards a member for the faces
    it is right about with confidence, and the fitted mixture is never worse than the equal one on it.
    """
    from scipy.optimize import minimize

    stacked = np.stack([probs[m][np.arange(len(truth)), truth] for m in members], 1).astype(np.float64)

    def objective(theta: np.ndarray) -> tuple[float, np.ndarray]:
        w = np.exp(theta - theta.max())
        w /= w.sum()
        p = np.clip(stacked @ w, 1e-12, None)
        grad_w = -(stacked / p[:, None]).mean(0)  # d NLL / d w
        return float(-np.log(p).mean()), w * (grad_w - grad_w @ w)  # chain rule through the softmax

    result = minimize(objective, np.zeros(len(members)), jac=True, method="L-BFGS-B")
    w = np.exp(result.x - result.x.max())
    return (w / w.sum()).tolist()


def cross_fitted(
    probs: Probabilities, members: list[str], truth: np.ndarray, repeats: int = 5
) -> dict[str, float | list[float]]:
    """A member set scored with weights that never saw the faces they are scored on.

    ``repeats`` times the faces are cut into two stratified halves (seeds 0, 1, ...); weights fitted on each
    half score the other, so every face is scored by a fit on the other half. Returned: the equal-weight
    accuracy and NLL, the in-sample figures (weights fitted on all the faces, the weights ``mien ensemble
    --weights fit`` would write, and their accuracy on those same faces: optimistic) and the cross-fitted
    ones (mean over the repeats). Comparing sets by their cross-fitted figures keeps the weights' own fit
    out of the comparison.
    """
    from sklearn.model_selection import StratifiedKFold

    equal = mixture(probs, members)
    weights = fit_weights(probs, members, truth)
    fitted = mixture(probs, members, weights)
    acc, loss = [], []
    for seed in range(repeats):
        p = np.zeros_like(equal)
        for fit, score in StratifiedKFold(2, shuffle=True, random_state=seed).split(equal, truth):
            w = fit_weights({m: probs[m][fit] for m in members}, members, truth[fit])
            p[score] = mixture({m: probs[m][score] for m in members}, members, w)
        acc.append(float(np.mean(p.argmax(1) == truth)))
        loss.append(nll(p, truth))
    return {
        "equal_accuracy": float(np.mean(equal.argmax(1) == truth)),
        "equal_nll": nll(equal, truth),
        "fitted_weights": weights,
        "fitted_accuracy": float(np.mean(fitted.argmax(1) == truth)),
        "fitted_nll": nll(fitted, truth),
        "cross_fitted_accuracy": float(np.mean(acc)),
        "cross_fitted_nll": float(np.mean(loss)),
    }
