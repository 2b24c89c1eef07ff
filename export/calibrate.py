"""`mien calibrate`: one temperature per model, fitted on the validation split, applied inside the ONNX graph
(for an ensemble, which has no graph of its own: in its ``*.ensemble.json``, applied after averaging).

The exported graphs end in logits (the runtime takes the softmax, ``spec.output == "logits"``), so
calibration is a ``Div`` by a scalar initializer ``mien_temperature`` appended after them: the file that
``/predict``, ``/v2``, Triton and ``mien eval`` all run gives the calibrated probabilities, and the runtime
applies nothing (one place). The temperature is fitted on the split carved from Training (``val``) by
minimising NLL (:func:`mien.export.calibration.fit_temperature`), on the uncalibrated logits: refitting a
calibrated file first sets its temperature back to 1, so calibration never stacks. The card records the
temperature, the split it was fitted on, and ECE/NLL/Brier before and after on that split and on the test
split; the file's version gets a ``-t<T>`` suffix, since its probabilities changed.

A temperature is only as honest as the faces it is fitted on: they must be held out from training. The
command refuses a model whose card does not say it was selected on the fit split (the models trained
before the validation split existed saw those faces in training: fitted there, mini_xception's temperature
came out 0.77, sharpening, and its PublicTest ECE rose from 1.9% to 7.5%); ``force`` overrides.
"""

from __future__ import annotations

import hashlib
import json
import logging
import tempfile
from pathlib import Path

import numpy as np
import onnx
from onnx import helper, numpy_helper

from mien.card import Calibration, card_for, card_path, write_card
from mien.ensemble import ENSEMBLE_SUFFIX, EnsembleClassifier
from mien.export.calibration import calibration_report, fit_temperature, rescale
from mien.export.evaluate import eval_split
from mien.runtime import MODEL_VERSION_KEY, OnnxClassifier

log = logging.getLogger(__name__)


class CalibrationError(ValueError):
    """A model that cannot be calibrated honestly on the split asked for."""


TEMPERATURE = "mien_temperature"  # the scalar initializer the logits are divided by
TEMPERATURE_KEY = "mien.temperature"  # the same value in the file's metadata, for a reader of the file
UNCALIBRATED = "_uncalibrated"  # suffix of the logits tensor before the division


def temperature_of(model: onnx.ModelProto) -> float:
    """The temperature inside ``model`` (1.0 for a file never calibrated)."""
    for init in model.graph.initializer:
        if init.name == TEMPERATURE:
            return float(numpy_helper.to_array(init))
    return 1.0


def _set_metadata(model: onnx.ModelProto, key: str, value: str) -> None:
    for prop in model.metadata_props:
        if prop.key == key:
            prop.value = value
            return
    model.metadata_props.add(key=key, value=value)


def with_temperature(model: onnx.ModelProto, temperature: float) -> onnx.ModelProto:
    """A copy of ``model`` whose output is its logits divided by ``temperature`` (replacing any earlier one)."""
    if not temperature > 0:
        raise ValueError(f"a temperature must be positive, got {temperature}")
    out = onnx.ModelProto()
    out.CopyFrom(model)
    value = numpy_helper.from_array(np.array(temperature, dtype=np.float32), TEMPERATURE)
    existing = [i for i, init in enumerate(out.graph.initializer) if init.name == TEMPERATURE]
    if existing:
        out.graph.initializer[existing[0]].CopyFrom(value)
    else:
        (output,) = out.graph.output
        before = output.name + UNCALIBRATED
        for node in out.graph.node:
            node.output[:] = [before if name == output.name else name for name in node.output]
        out.graph.initializer.append(value)
        out.graph.node.append(helper.make_node("Div", [before, TEMPERATURE], [output.name], name="mien_calibration"))
    _set_metadata(out, TEMPERATURE_KEY, f"{temperature:.6g}")
    onnx.checker.check_model(out)
    return out


def _probabilities(model: onnx.ModelProto, data: str | Path, split: str) -> tuple[np.ndarray, np.ndarray]:
    """``model``'s probabilities over all its classes on ``split``, and the truth as model class indices."""
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "model.onnx"
        onnx.save(model, path)
        classifier = OnnxClassifier.from_path(path, providers=("CPUExecutionProvider",))
        faces = eval_split(data, split, tuple(classifier.spec.labels))
        probs = classifier.predict_crops(list(faces.images))
    return probs, np.asarray(faces.columns)[faces.truth]


def _measures(probs: np.ndarray, truth: np.ndarray) -> dict[str, float]:
    report = calibration_report(probs, truth)
    return {key: round(report[key], 6) for key in ("ece", "nll", "brier")}


def _held_out(path: Path, fit_split: str, force: bool):
    """``path``'s card, after checking it says ``fit_split`` was held out from training (unless ``force``)."""
    card = card_for(path)
    selected_on = card.selected_on if card is not None else None
    if selected_on != fit_split and not force:
        raise CalibrationError(
            f"{path.name}: its card says it was selected on {selected_on!r}, not {fit_split!r}, so the {fit_split} "
            f"faces may have been training faces and a temperature fitted on them would not hold on new faces; "
            "retrain it with the validation split (mien train carves it by default), or pass --force"
        )
    return card


def _fit(path: Path, fit: tuple, test: tuple, fit_split: str, test_split: str, previous: float) -> dict:
    """The temperature fitted on ``fit`` (probabilities, truth) and the card's calibration block."""
    temperature = round(fit_temperature(*fit), 6)  # the value in the file and in the card
    return {
        "temperature": temperature,
        "fitted_on": fit_split,
        "previous_temperature": previous,
        "before": {fit_split: _measures(*fit), test_split: _measures(*test)},
        "after": {
            fit_split: _measures(rescale(fit[0], temperature), fit[1]),
            test_split: _measures(rescale(test[0], temperature), test[1]),
        },
        "bins": 15,
        "measured_by": f"mien calibrate {path} --fit-split {fit_split} --test-split {test_split}",
    }


def _log(out: Path, block: dict, test_split: str) -> None:
    before, after = block["before"][test_split], block["after"][test_split]
    log.info("%s: temperature %.4f (fitted on %s); %s ECE %.4f -> %.4f, NLL %.4f -> %.4f", out, block["temperature"],
             block["fitted_on"], test_split, before["ece"], after["ece"], before["nll"], after["nll"])  # fmt: skip


def calibrate(path: str | Path, data: str | Path, fit_split: str = "val", test_split: str = "public_test",
              out: str | Path | None = None, force: bool = False) -> dict:  # fmt: skip
    """Fit ``path``'s temperature on ``fit_split``, write the calibrated file (in place unless ``out``) and its
    card; returns the card's calibration block. CalibrationError when the card does not show ``fit_split``
    was held out from training (unless ``force``). ``path`` is an ONNX file or an ``*.ensemble.json``."""
    if str(path).endswith(ENSEMBLE_SUFFIX):
        return calibrate_ensemble(path, data, fit_split, test_split, out, force)
    path, out = Path(path), Path(out or path)
    card = _held_out(path, fit_split, force)
    model = onnx.load(path)
    raw = with_temperature(model, 1.0)
    fit, test = _probabilities(raw, data, fit_split), _probabilities(raw, data, test_split)
    block = _fit(path, fit, test, fit_split, test_split, temperature_of(model))
    calibrated = with_temperature(model, block["temperature"])
    versions = {prop.key: prop.value for prop in calibrated.metadata_props}
    version = versions.get(MODEL_VERSION_KEY, "").split("-t")[0] + f"-t{block['temperature']:.3f}"
    _set_metadata(calibrated, MODEL_VERSION_KEY, version)
    onnx.save(calibrated, out)
    if card is not None:
        card.version = version
        if card.sha256 is not None:
            card.sha256 = hashlib.sha256(out.read_bytes()).hexdigest()
        card.calibration = Calibration(**block)
        write_card(card_path(out), card)
    _log(out, block, test_split)
    return block


def calibrate_ensemble(path: str | Path, data: str | Path, fit_split: str = "val", test_split: str = "public_test",
                       out: str | Path | None = None, force: bool = False) -> dict:  # fmt: skip
    """The same for an ensemble: one temperature for its averaged probabilities (after the members' weights and
    flip), written as ``"temperature"`` into the ensemble file, which :class:`mien.ensemble.EnsembleClassifier`
    applies. The members' own temperatures (inside their files) stay as they are."""
    path, out = Path(path), Path(out or path)
    card = _held_out(path, fit_split, force)
    ensemble = EnsembleClassifier.from_path(path, providers=("CPUExecutionProvider",))
    previous = ensemble.temperature or 1.0
    ensemble.temperature = None  # fitted on the untempered average, so calibration never stacks

    def probabilities(split: str) -> tuple[np.ndarray, np.ndarray]:
        faces = eval_split(data, split, tuple(ensemble.spec.labels))
        return ensemble.predict_crops(list(faces.images)), np.asarray(faces.columns)[faces.truth]

    block = _fit(path, probabilities(fit_split), probabilities(test_split), fit_split, test_split, previous)
    config = json.loads(path.read_text(encoding="utf-8"))
    config["temperature"] = block["temperature"]
    out.write_text(json.dumps(config, indent=2) + "\n")
    calibrated = EnsembleClassifier.from_path(out, providers=("CPUExecutionProvider",))  # refuses a bad file
    if card is not None:
        card.version = calibrated.version
        card.calibration = Calibration(**block)
        write_card(card_path(out), card)
    _log(out, block, test_split)
    return block
