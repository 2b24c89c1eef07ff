"""`mien ensemble`: write ``models/<id>.ensemble.json`` and its card, scored on a split by the real thing.

The card lists the members (id, version, their own accuracy from their cards), whether flip
test-time augmentation is on, the ensemble's accuracy and macro-F1 measured through
:class:`mien.ensemble.EnsembleClassifier` (the class the service serves), and its total parameters
and MACs per face (each member's MACs, twice with ``flip``).
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

from mien.card import Card, CardError, card_for, card_path, write_card
from mien.ensemble import ENSEMBLE_SUFFIX, EnsembleClassifier, normalised_weights
from mien.export.ensemble_search import fit_weights, member_probabilities, not_held_out
from mien.export.evaluate import score_classifier
from mien.paths import DEFAULT_DATA
from mien.training.data import CARVED_SPLIT

log = logging.getLogger("mien.export")


def write_ensemble(
    members: list[str],
    model_dir: str | Path = "models",
    model_id: str = "ensemble",
    flip: bool = False,
    data: str = DEFAULT_DATA,
    split: str = "public_test",
    weights: list[float] | str | None = None,
    fit_split: str = CARVED_SPLIT,
    force: bool = False,
) -> dict:
    """Write the ensemble file and its card into ``model_dir``; return the card (as written).

    ``weights``: None (equal), one number per member, or ``"fit"``: fitted on ``fit_split`` (the validation
    split, never the split the card reports) by :func:`mien.export.ensemble_search.fit_weights`, and only
    when every member's card says ``fit_split`` was held out from its training (unless ``force``).
    """
    model_dir = Path(model_dir)
    path = model_dir / f"{model_id}{ENSEMBLE_SUFFIX}"
    fitted_on, refused = None, {}
    if weights == "fit":
        if fit_split == split:
            raise ValueError(f"fit the weights on another split than the one the card reports ({split})")
        refused = not_held_out(model_dir, list(members), fit_split)
        if refused and not force:
            reasons = "; ".join(f"{name}: {why}" for name, why in refused.items())
            raise ValueError(f"cannot fit weights on {fit_split}: its faces were not held out from every member "
                             f"({reasons}); pass --force to fit anyway")  # fmt: skip
        probs, truth = member_probabilities(model_dir, list(members), data, fit_split, flip)
        weights, fitted_on = fit_weights(probs, list(members), truth), fit_split
        fitted = ", ".join(f"{m} {w:.3f}" for m, w in zip(members, weights, strict=True))
        log.info("weights fitted on %s: %s", fit_split, fitted)
    config = {"model_id": model_id, "members": list(members), "flip": flip}
    if weights is not None:
        config["weights"] = normalised_weights(list(weights), len(members))
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(config, indent=2) + "\n")
    try:
        ensemble = EnsembleClassifier.from_path(tmp.rename(path), providers=("CPUExecutionProvider",))
    except Exception:
        path.unlink(missing_ok=True)  # never leave a file the service would refuse
        raise
    report, _ = score_classifier(ensemble, data, split)
    command = (f"mien ensemble {','.join(members)} --model-dir {model_dir} --model-id {model_id}"
               + (" --flip" if flip else "") + (f" --weights fit --fit-split {fit_split}" if fitted_on else "")
               + (" --force" if refused else "")
               + (f" --weights {','.join(f'{w:.6g}' for w in config['weights'])}" if weights and not fitted_on else "")
               + f" --data {data} --split {split}")  # fmt: skip
    card = ensemble_card(ensemble, path, report, data, split, command, fitted_on)
    write_card(card_path(path), card)
    log.info("%s (%s%s) on %s: accuracy %.4f; card %s", model_id, ", ".join(members), ", flip" if flip else "",
             split, report["accuracy"], card_path(path))  # fmt: skip
    return card.to_dict()


def ensemble_card(
    ensemble: EnsembleClassifier, path: Path, report: dict, data: str, split: str, command: str, fitted_on: str | None
) -> Card:
    """The card of an ensemble file: its members (with their own cards' accuracy), weights and measured figures."""
    cards = {m.model_id: _member_card(path.with_name(f"{m.model_id}.onnx")) for m in ensemble.members}
    return Card(
        model_id=ensemble.model_id,
        version=ensemble.version,
        file=path.name,
        kind="ensemble",
        members=[
            {
                "model_id": m.model_id,
                "version": m.version,
                "accuracy": cards[m.model_id].accuracy if cards[m.model_id] else None,
            }
            for m in ensemble.members
        ],  # fmt: skip
        flip=ensemble.flip,
        weights=ensemble.weights,
        weights_fitted_on=fitted_on,
        labels=list(ensemble.spec.labels),
        # a member without a card counts 0: its size is unknown, not absent
        parameters=sum(c.parameters or 0 for c in cards.values() if c),
        macs=(2 if ensemble.flip else 1) * sum(c.macs or 0 for c in cards.values() if c),
        metrics={
            "split": split,
            "selected_on": members_selected_on(list(cards.values())),
            "accuracy": report["accuracy"],
            "macro_f1": report["macro_f1"],
            "num_images": report["num_images"],
            "per_class": report["per_class"],
            "measured_by": f"mien eval {path} --data {data} --split {split}",
        },
        export={"command": command, "date": time.strftime("%Y-%m-%d")},
    )


def members_selected_on(cards: list[Card | None]) -> str | None:
    """The split that selected the members' checkpoints, when every member's card names the same one.

    None when a member's card does not say or they differ: the ensemble's figure is then only as clean as its
    least clean member, and the member cards say which that is.
    """
    splits = {card.selected_on if card else None for card in cards}
    return splits.pop() if len(splits) == 1 else None


def _member_card(path: Path) -> Card | None:
    """A member's card; a missing or broken one leaves its accuracy, size and selection unknown."""
    try:
        return card_for(path)
    except CardError as exc:
        log.warning("ignoring %s", exc)
        return None
