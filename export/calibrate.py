"""`mien calibrate`: temperature scaling per model, fitted on the validation split, applied inside the ONNX graph
(for an ensemble, which has no graph of its own: in its ``*.ensemble.json``, applied after averaging).

The exported graphs end in logits (the runtime takes the softmax, ``spec.output == "logits"``), so
calibration is a division of the logits appended after them: by a scalar initializer ``mien_temperature``
(``--method temperature``), or by a temperature per face ``T · exp(b · h + c · h²)``, h the face's normalised
entropy, b and c the initializers ``mien_entropy_slope`` and ``mien_entropy_curve`` (``--method entropy``: b
alone; ``--method top-label``, the default: both; see :func:`mien.export.calibration.fit_calibration`). The
file that ``/predict``, ``/v2``, Triton and ``mien eval`` all run gives the calibrated probabilities, and the
runtime applies nothing (one place). T, b and c are fitted on the split carved from Training (``val``), on the
uncalibrated logits: refitting a calibrated file first removes its calibration, so calibration never stacks.
The card records them, the method, the split they were fitted on, and ECE/NLL/Brier before and after on that
split and on the test split; the file's version gets a ``-t<T>`` (``-e<b>``, ``-c<c>``) suffix, since its
probabilities changed.

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
from mien.ensemble import ENSEMBLE_SUFFIX, EnsembleClassifier, calibration_suffix
from mien.export.calibration import calibration_report, fit_calibration, rescale
from mien.export.evaluate import eval_split
from mien.runtime import MODEL_VERSION_KEY, OnnxClassifier
from mien.spec import METADATA_KEY, PreprocessSpec

log = logging.getLogger(__name__)


class CalibrationError(ValueError):
    """A model that cannot be calibrated honestly on the split asked for."""


TEMPERATURE = "mien_temperature"  # the scalar initializer the logits are divided by
SLOPE = "mien_entropy_slope"  # b of the per-face temperature T · exp(b · h + c · h²), when there is one
CURVE = "mien_entropy_curve"  # its c, when there is one
TEMPERATURE_KEY = "mien.temperature"  # the same values in the file's metadata, for a reader of the file
SLOPE_KEY = "mien.entropy_slope"
CURVE_KEY = "mien.entropy_curve"
UNCALIBRATED = "_uncalibrated"  # suffix of the logits tensor before the division
NODE = "mien_calibration"  # the calibration's nodes and private initializers are named with this prefix


def _initializer(model: onnx.ModelProto, name: str) -> float | None:
    for init in model.graph.initializer:
        if init.name == name:
            return float(numpy_helper.to_array(init))
    return None


def calibration_of(model: onnx.ModelProto) -> tuple[float, float, float]:
    """(temperature, entropy slope, entropy curve) inside ``model``: (1.0, 0.0, 0.0) for a file never calibrated."""
    temperature = _initializer(model, TEMPERATURE)
    slope, curve = (_initializer(model, name) or 0.0 for name in (SLOPE, CURVE))
    return (1.0 if temperature is None else temperature), slope, curve


def temperature_of(model: onnx.ModelProto) -> float:
    """The temperature inside ``model`` (1.0 for a file never calibrated)."""
    return calibration_of(model)[0]


def _set_metadata(model: onnx.ModelProto, key: str, value: str | None) -> None:
    """Set ``key`` to ``value`` in the file's metadata; None removes it."""
    for i, prop in enumerate(model.metadata_props):
        if prop.key == key:
            if value is None:
                del model.metadata_props[i]
            else:
                prop.value = value
            return
    if value is not None:
        model.metadata_props.add(key=key, value=value)


def without_calibration(model: onnx.ModelProto) -> onnx.ModelProto:
    """A copy of ``model`` with whatever calibration ``mien calibrate`` put in it taken out."""
    out = onnx.ModelProto()
    out.CopyFrom(model)
    (output,) = out.graph.output
    before = output.name + UNCALIBRATED
    if not any(node.name.startswith(NODE) for node in out.graph.node):
        return out
    kept = [node for node in out.graph.node if not node.name.startswith(NODE)]
    del out.graph.node[:]
    out.graph.node.extend(kept)
    for node in out.graph.node:
        node.output[:] = [output.name if name == before else name for name in node.output]
        node.input[:] = [output.name if name == before else name for name in node.input]
    ours = {TEMPERATURE, SLOPE, CURVE}
    inits = [init for init in out.graph.initializer if init.name not in ours and not init.name.startswith(NODE)]
    del out.graph.initializer[:]
    out.graph.initializer.extend(inits)
    for key in (TEMPERATURE_KEY, SLOPE_KEY, CURVE_KEY):
        _set_metadata(out, key, None)
    return out


def _scalar(name: str, value: float) -> onnx.TensorProto:
    return numpy_helper.from_array(np.array(value, dtype=np.float32), name)


def _entropy_temperature(before: str, classes: int, opset: int, curve: bool) -> tuple[list, list, str]:
    """Nodes and initializers computing the per-face temperature ``T · exp(b · h)`` (``T · exp(b · h + c · h²)``
    with ``curve``) from the logits ``before``; returns them and the name of the (N × 1) temperature tensor."""
    n = f"{NODE}_"
    inits = [_scalar(n + "eps", 1e-12), _scalar(n + "log_classes", float(np.log(classes)))]
    if opset >= 13:
        inits.append(numpy_helper.from_array(np.array([-1], dtype=np.int64), n + "axes"))
        reduce = helper.make_node("ReduceSum", [n + "p_log_p", n + "axes"], [n + "neg_entropy"], keepdims=1,
                                  name=n + "sum")  # fmt: skip
    else:
        reduce = helper.make_node("ReduceSum", [n + "p_log_p"], [n + "neg_entropy"], axes=[-1], keepdims=1,
                                  name=n + "sum")  # fmt: skip
    nodes = [
        helper.make_node("Softmax", [before], [n + "p"], axis=-1, name=n + "softmax"),
        helper.make_node("Max", [n + "p", n + "eps"], [n + "p_floor"], name=n + "floor"),
        helper.make_node("Log", [n + "p_floor"], [n + "log_p"], name=n + "log"),
        helper.make_node("Mul", [n + "p", n + "log_p"], [n + "p_log_p"], name=n + "p_log_p"),
        reduce,
        helper.make_node("Div", [n + "neg_entropy", n + "log_classes"], [n + "neg_h"], name=n + "normalise"),
        helper.make_node("Neg", [n + "neg_h"], [n + "h"], name=n + "h"),
        helper.make_node("Mul", [n + "h", SLOPE], [n + "slope_h"], name=n + "slope_h"),
    ]
    exponent = n + "slope_h"
    if curve:  # b·h + c·h² as (b + c·h)·h
        nodes += [
            helper.make_node("Mul", [n + "h", CURVE], [n + "curve_h"], name=n + "curve_h"),
            helper.make_node("Add", [SLOPE, n + "curve_h"], [n + "local_slope"], name=n + "local_slope"),
            helper.make_node("Mul", [n + "local_slope", n + "h"], [n + "exponent"], name=n + "exponent"),
        ]
        exponent = n + "exponent"
    nodes += [
        helper.make_node("Exp", [exponent], [n + "factor"], name=n + "exp"),
        helper.make_node("Mul", [n + "factor", TEMPERATURE], [n + "temperature"], name=n + "temperature"),
    ]
    return nodes, inits, n + "temperature"


def _classes(model: onnx.ModelProto) -> int:
    """The number of classes the model answers: its output's last dimension, or, where the graph leaves it
    symbolic (a ten-crop file averages its views with a ReduceMean the exporter does not size), its spec's labels."""
    classes = model.graph.output[0].type.tensor_type.shape.dim[-1].dim_value
    if classes:
        return classes
    metadata = {prop.key: prop.value for prop in model.metadata_props}
    if METADATA_KEY not in metadata:
        raise ValueError("the model's output has no fixed number of classes to normalise the entropy by, nor a spec")
    return len(PreprocessSpec.from_metadata(metadata).labels)


def with_temperature(
    model: onnx.ModelProto, temperature: float, entropy_slope: float = 0.0, entropy_curve: float = 0.0
) -> onnx.ModelProto:
    """A copy of ``model`` whose output is its logits divided by ``temperature`` (replacing any earlier
    calibration), or with ``entropy_slope`` b and ``entropy_curve`` c by the per-face
    ``temperature · exp(b · h + c · h²)`` (:func:`mien.ensemble.temper`)."""
    if not temperature > 0:
        raise ValueError(f"a temperature must be positive, got {temperature}")
    out = without_calibration(model)
    (output,) = out.graph.output
    before = output.name + UNCALIBRATED
    for node in out.graph.node:
        node.output[:] = [before if name == output.name else name for name in node.output]
    out.graph.initializer.append(_scalar(TEMPERATURE, temperature))
    divisor = TEMPERATURE
    if entropy_slope or entropy_curve:
        classes = _classes(out)
        opset = next((o.version for o in out.opset_import if o.domain in ("", "ai.onnx")), 0)
        nodes, inits, divisor = _entropy_temperature(before, classes, opset, curve=bool(entropy_curve))
        out.graph.initializer.append(_scalar(SLOPE, entropy_slope))
        if entropy_curve:
            out.graph.initializer.append(_scalar(CURVE, entropy_curve))
        out.graph.initializer.extend(inits)
        out.graph.node.extend(nodes)
    out.graph.node.append(helper.make_node("Div", [before, divisor], [output.name], name=NODE))
    _set_metadata(out, TEMPERATURE_KEY, f"{temperature:.6g}")
    _set_metadata(out, SLOPE_KEY, f"{entropy_slope:.6g}" if entropy_slope else None)
    _set_metadata(out, CURVE_KEY, f"{entropy_curve:.6g}" if entropy_curve else None)
    onnx.checker.check_model(out)
    return out


def _probabilities(
    model: onnx.ModelProto, data: str | Path, split: str, label_source: str = "fer2013"
) -> tuple[np.ndarray, np.ndarray]:
    """``model``'s probabilities over all its classes on ``split``, and the truth (``label_source``'s labels: FER2013's
    or the FER+ majority votes, from the votes file beside ``data``) as model class indices."""
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "model.onnx"
        onnx.save(model, path)
        classifier = OnnxClassifier.from_path(path, providers=("CPUExecutionProvider",))
        faces = eval_split(data, split, tuple(classifier.spec.labels), label_source)
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


def _fit(path: Path, fit: tuple, test: tuple, fit_split: str, test_split: str, previous: float,
         method: str) -> dict:  # fmt: skip
    """The temperature (slope, curve) fitted on ``fit`` (probabilities, truth) and the card's calibration block."""
    temperature, slope, curve = (round(value, 6) for value in fit_calibration(*fit, method=method))  # as in the file
    return {
        "temperature": temperature,
        "entropy_slope": slope,
        "entropy_curve": curve,
        "method": method,
        "fitted_on": fit_split,
        "previous_temperature": previous,
        "before": {fit_split: _measures(*fit), test_split: _measures(*test)},
        "after": {
            fit_split: _measures(rescale(fit[0], temperature, slope, curve), fit[1]),
            test_split: _measures(rescale(test[0], temperature, slope, curve), test[1]),
        },
        "bins": 15,
        "measured_by": f"mien calibrate {path} --method {method} --fit-split {fit_split} --test-split {test_split}",
    }


def _log(out: Path, block: dict, test_split: str) -> None:
    before, after = block["before"][test_split], block["after"][test_split]
    log.info("%s: temperature %.4f, entropy slope %.4f, curve %.4f (%s, fitted on %s); %s ECE %.4f -> %.4f, "
             "NLL %.4f -> %.4f", out, block["temperature"], block["entropy_slope"], block["entropy_curve"],
             block["method"], block["fitted_on"], test_split, before["ece"], after["ece"], before["nll"],
             after["nll"])  # fmt: skip


def calibrate(path: str | Path, data: str | Path, fit_split: str = "val", test_split: str = "public_test",
              out: str | Path | None = None, force: bool = False, method: str = "top-label") -> dict:  # fmt: skip
    """Fit ``path``'s calibration by ``method`` (:func:`~mien.export.calibration.fit_calibration`) on ``fit_split``,
    write the calibrated file (in place unless ``out``) and its card; returns the card's calibration block.
    CalibrationError when the card does not show ``fit_split`` was held out from training (unless ``force``).
    ``path`` is an ONNX file or an ``*.ensemble.json``."""
    if str(path).endswith(ENSEMBLE_SUFFIX):
        return calibrate_ensemble(path, data, fit_split, test_split, out, force, method)
    path, out = Path(path), Path(out or path)
    card = _held_out(path, fit_split, force)
    model = onnx.load(path)
    raw = without_calibration(model)
    # a model is calibrated on the labels it learnt (a FER+ model on the FER+ majority votes), as its card scores it
    label_source = card.label_source if card is not None else "fer2013"
    fit, test = (_probabilities(raw, data, split, label_source) for split in (fit_split, test_split))
    block = _fit(path, fit, test, fit_split, test_split, temperature_of(model), method) | {"label_source": label_source}
    shape = block["temperature"], block["entropy_slope"], block["entropy_curve"]
    calibrated = with_temperature(model, *shape)
    versions = {prop.key: prop.value for prop in calibrated.metadata_props}
    suffix = calibration_suffix(*shape)
    version = versions.get(MODEL_VERSION_KEY, "").split("-t")[0] + suffix
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


def uncalibrated_ensemble(path: str | Path) -> tuple[EnsembleClassifier, float]:
    """The ensemble of ``path`` with its own calibration taken out (its members' stays, inside their files), and
    the temperature it had (1 when none)."""
    ensemble = EnsembleClassifier.from_path(path, providers=("CPUExecutionProvider",))
    previous = ensemble.temperature or 1.0
    ensemble.temperature, ensemble.entropy_slope, ensemble.entropy_curve = None, 0.0, 0.0
    return ensemble, previous


def ensemble_probabilities(ensemble: EnsembleClassifier, data: str | Path, split: str) -> tuple[np.ndarray, np.ndarray]:
    """The ensemble's probabilities for the faces of ``split`` and their true columns."""
    faces = eval_split(data, split, tuple(ensemble.spec.labels))
    return ensemble.predict_crops(list(faces.images)), np.asarray(faces.columns)[faces.truth]


def calibrate_ensemble(path: str | Path, data: str | Path, fit_split: str = "val", test_split: str = "public_test",
                       out: str | Path | None = None, force: bool = False,
                       method: str = "top-label") -> dict:  # fmt: skip
    """The same for an ensemble: a temperature (slope, curve) for its averaged probabilities (after the members'
    weights and flip), written as ``"temperature"`` (``"entropy_slope"``, ``"entropy_curve"``) into the file, which
    :class:`mien.ensemble.EnsembleClassifier` applies. The members' own calibration (inside their files) stays."""
    path, out = Path(path), Path(out or path)
    card = _held_out(path, fit_split, force)
    ensemble, previous = uncalibrated_ensemble(path)  # never stacks
    fit, test = (ensemble_probabilities(ensemble, data, split) for split in (fit_split, test_split))
    block = _fit(path, fit, test, fit_split, test_split, previous, method)
    config = json.loads(path.read_text(encoding="utf-8"))
    config["temperature"] = block["temperature"]
    for key in ("entropy_slope", "entropy_curve"):
        config.pop(key, None)
        if block[key]:
            config[key] = block[key]
    out.write_text(json.dumps(config, indent=2) + "\n")
    calibrated = EnsembleClassifier.from_path(out, providers=("CPUExecutionProvider",))  # refuses a bad file
    if card is not None:
        card.version = calibrated.version
        card.calibration = Calibration(**block)
        write_card(card_path(out), card)
    _log(out, block, test_split)
    return block
