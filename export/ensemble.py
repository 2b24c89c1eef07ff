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

from mien.service.registry import read_card
from mien.training.evaluate import classification_report, split_for_labels

from mien.ensemble import ENSEMBLE_SUFFIX, EnsembleClassifier

log = logging.getLogger("mien.export")


def write_ensemble(
    members: list[str],
    model_dir: str | Path = "models",
    model_id: str = "ensemble",
    flip: bool = False,
    data: str = "../shared/data/fer2013.npz",
    split: str = "public_test",
) -> dict:
    """Write the ensemble file and its card into ``model_dir``; return the card."""
    model_dir = Path(model_dir)
    path = model_dir / f"{model_id}{ENSEMBLE_SUFFIX}"
    config = {"model_id": model_id, "members": list(members), "flip": flip}
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(config, indent=2) + "\n")
    try:
        ensemble = EnsembleClassifier.from_path(tmp.rename(path), providers=("CPUExecutionProvider",))
    except Exception:
        path.unlink(missing_ok=True)  # never leave a file the service would refuse
        raise
    images, labels = split_for_labels(data, split, ensemble.spec.labels)
    report = classification_report(labels, ensemble.predict_crops(list(images)).argmax(1), ensemble.spec.labels)
    cards = {m: read_card(model_dir / f"{m}.onnx") or {} for m in members}
    views = 2 if flip else 1
    card = {
        "model_id": model_id,
        "version": ensemble.version,
        "file": path.name,
        "kind": "ensemble",
        "members": [
            {
                "model_id": m.model_id,
                "version": m.version,
                "accuracy": cards[m.model_id].get("metrics", {}).get("accuracy"),
            }
            for m in ensemble.members
        ],  # fmt: skip
        "flip": flip,
        "labels": list(ensemble.spec.labels),
        "parameters": sum(cards[m].get("parameters", 0) for m in members),
        "macs": views * sum(cards[m].get("macs", 0) for m in members),
        "metrics": {
            "split": split,
            "accuracy": report["accuracy"],
            "macro_f1": report["macro_f1"],
            "num_images": report["num_images"],
            "per_class": report["per_class"],
            "measured_by": f"mien eval {path} --data {data} --split {split}",
        },
        "export": {
            "command": f"mien ensemble {','.join(members)} --model-dir {model_dir} --model-id {model_id}"
            + (" --flip" if flip else "")
            + f" --data {data} --split {split}",
            "date": time.strftime("%Y-%m-%d"),
        },  # fmt: skip
    }
    card_path = model_dir / f"{model_id}.card.json"
    card_path.write_text(json.dumps(card, indent=2) + "\n")
    log.info("%s (%s%s) on %s: accuracy %.4f; card %s", model_id, ", ".join(members), ", flip" if flip else "",
             split, report["accuracy"], card_path)  # fmt: skip
    return card
