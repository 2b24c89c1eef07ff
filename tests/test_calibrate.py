"""`mien calibrate`: the temperature inside the graph, fitted on the held-out split, recorded in the card."""

from __future__ import annotations

import json
import shutil

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper

from mien.card import read_card
from mien.export.calibrate import CalibrationError, calibrate, temperature_of, with_temperature
from mien.export.calibration import rescale
from mien.runtime import OnnxClassifier

CPU = ("CPUExecutionProvider",)


def identity_model() -> onnx.ModelProto:
    """x (N×3) → logits: the smallest graph whose output is its input."""
    graph = helper.make_graph(
        [helper.make_node("Identity", ["x"], ["logits"])],
        "identity",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 3])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["n", 3])],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=9)


def run(model: onnx.ModelProto, x: np.ndarray) -> np.ndarray:
    session = ort.InferenceSession(model.SerializeToString(), providers=list(CPU))
    return session.run(["logits"], {"x": x})[0]


def test_the_graph_divides_its_logits_by_the_temperature_and_a_second_one_replaces_the_first():
    x = np.array([[1.0, -2.0, 0.5], [3.0, 0.0, -1.0]], np.float32)
    base = identity_model()
    assert temperature_of(base) == 1.0
    once = with_temperature(base, 2.0)
    np.testing.assert_allclose(run(once, x), x / 2.0, rtol=1e-6)
    assert temperature_of(once) == 2.0 and {p.key: p.value for p in once.metadata_props}["mien.temperature"] == "2"
    twice = with_temperature(once, 0.5)
    np.testing.assert_allclose(run(twice, x), x / 0.5, rtol=1e-6)  # replaced, not stacked
    assert sum(node.op_type == "Div" for node in twice.graph.node) == 1
    assert [o.name for o in twice.graph.output] == ["logits"]
    with pytest.raises(ValueError, match="positive"):
        with_temperature(base, 0.0)


@pytest.fixture
def model_copy(model_dir, tmp_path):
    for path in model_dir.glob("mini_xception.*"):
        shutil.copy(path, tmp_path / path.name)
    return tmp_path / "mini_xception.onnx"


def test_calibrate_fits_on_val_puts_the_temperature_in_the_graph_and_the_card(model_copy, tiny_npz):
    card = read_card(model_copy.with_name("mini_xception.card.json"))
    assert card.selected_on == "val"  # the tiny model was trained with the carved validation split
    faces = list(np.random.default_rng(0).integers(0, 255, (16, 48, 48), dtype=np.uint8))
    before = OnnxClassifier.from_path(model_copy, CPU).predict_crops(faces)

    block = calibrate(model_copy, tiny_npz)
    temperature = block["temperature"]
    assert temperature_of(onnx.load(model_copy)) == pytest.approx(temperature, rel=1e-6)
    after = OnnxClassifier.from_path(model_copy, CPU).predict_crops(faces)
    np.testing.assert_allclose(after, rescale(before, temperature), atol=1e-5)  # the runtime applies nothing more
    assert (after.argmax(1) == before.argmax(1)).all()
    assert block["after"]["val"]["nll"] <= block["before"]["val"]["nll"] + 1e-9  # the fit minimises val NLL
    assert set(block["before"]) == set(block["after"]) == {"val", "public_test"}

    written = json.loads(model_copy.with_name("mini_xception.card.json").read_text())
    assert written["calibration"]["temperature"] == temperature and written["calibration"]["fitted_on"] == "val"
    assert written["version"].endswith(f"-t{temperature:.3f}")
    assert OnnxClassifier.from_path(model_copy, CPU).version == written["version"]

    again = calibrate(model_copy, tiny_npz)  # refitted on the uncalibrated logits: the same temperature
    assert again["temperature"] == pytest.approx(temperature, rel=1e-4)
    assert again["previous_temperature"] == pytest.approx(temperature, rel=1e-6)


def test_a_model_not_selected_on_val_is_refused_unless_forced(model_copy, tiny_npz, capsys):
    from mien.cli import main

    card_file = model_copy.with_name("mini_xception.card.json")
    card = json.loads(card_file.read_text())
    card["metrics"]["selected_on"] = "public_test"  # as the bundled models trained before the val split
    card_file.write_text(json.dumps(card))
    with pytest.raises(CalibrationError, match="training faces"):
        calibrate(model_copy, tiny_npz)
    assert main(["calibrate", str(model_copy), "--data", str(tiny_npz)]) == 2
    assert "--force" in capsys.readouterr().err
    assert main(["calibrate", str(model_copy), "--data", str(tiny_npz), "--force"]) == 0
    assert temperature_of(onnx.load(model_copy)) != 1.0


def test_an_ensemble_is_calibrated_after_averaging_through_its_file(model_copy, tiny_npz):
    from mien.ensemble import EnsembleClassifier, EnsembleError, read_ensemble_config
    from mien.export.ensemble import write_ensemble
    from tests.test_ensemble import relabel

    folder = model_copy.parent
    relabel(model_copy, folder / "twin.onnx", "twin")
    write_ensemble(["mini_xception", "twin"], folder, model_id="pair", data=str(tiny_npz), flip=True)
    card_file = folder / "pair.card.json"
    card = json.loads(card_file.read_text())
    card["metrics"]["selected_on"] = "val"  # as when every member was selected on val (twin has no card)
    card_file.write_text(json.dumps(card))
    path = folder / "pair.ensemble.json"
    faces = list(np.random.default_rng(1).integers(0, 255, (16, 48, 48), dtype=np.uint8))
    before = EnsembleClassifier.from_path(path, CPU).predict_crops(faces)

    block = calibrate(path, tiny_npz)
    temperature = block["temperature"]
    assert read_ensemble_config(path)["temperature"] == temperature and temperature != pytest.approx(1.0, abs=1e-3)
    served = EnsembleClassifier.from_path(path, CPU)
    after = served.predict_crops(faces)
    np.testing.assert_allclose(after, rescale(before, temperature), atol=1e-5)  # applied once, after averaging
    assert (after.argmax(1) == before.argmax(1)).all()
    assert block["after"]["val"]["nll"] <= block["before"]["val"]["nll"] + 1e-9
    written = json.loads(card_file.read_text())
    assert written["calibration"]["temperature"] == temperature and written["version"] == served.version
    assert served.version.endswith(f"-t{temperature:.3f}") and served.metadata["mien.temperature"]
    # the members' files are untouched: their own temperature stays 1
    assert temperature_of(onnx.load(folder / "twin.onnx")) == 1.0
    again = calibrate(path, tiny_npz)  # refitted on the untempered average
    assert again["temperature"] == pytest.approx(temperature, rel=1e-4)

    config = json.loads(path.read_text())
    for bad in (0, -1.5, "2", True):
        path.write_text(json.dumps(config | {"temperature": bad}))
        with pytest.raises(EnsembleError, match="temperature"):
            read_ensemble_config(path)
