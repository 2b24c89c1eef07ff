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
from mien.ensemble import calibration_suffix
from mien.export.calibrate import (
    CalibrationError,
    calibrate,
    calibration_of,
    temperature_of,
    with_temperature,
    without_calibration,
)
from mien.export.calibration import METHODS, fit_calibration, rescale, top_label_log_loss
from mien.runtime import OnnxClassifier
from mien.spec import PreprocessSpec

CPU = ("CPUExecutionProvider",)


def identity_model(classes: int | str = 3) -> onnx.ModelProto:
    """x (N×3) → logits: the smallest graph whose output is its input (``classes``: the output's last dimension as
    the graph declares it, a number or a symbolic name)."""
    graph = helper.make_graph(
        [helper.make_node("Identity", ["x"], ["logits"])],
        "identity",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 3])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["n", classes])],
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


def test_the_entropy_temperature_in_the_graph_is_the_runtimes_and_is_replaced_or_removed_whole():
    x = np.random.default_rng(0).normal(0, 3, (64, 3)).astype(np.float32)
    x[0] = [5.0, 5.0, 5.0]  # a uniform face (h = 1) and a certain one (h ≈ 0)
    x[1] = [40.0, -40.0, -40.0]
    base = identity_model()
    graph = with_temperature(base, 0.7, 0.4)
    assert calibration_of(graph) == pytest.approx((0.7, 0.4, 0.0))
    assert {p.key: p.value for p in graph.metadata_props}["mien.entropy_slope"] == "0.4"
    softmax = np.exp(run(graph, x).astype(np.float64))
    softmax /= softmax.sum(axis=1, keepdims=True)
    raw = np.exp(x.astype(np.float64)) / np.exp(x.astype(np.float64)).sum(axis=1, keepdims=True)
    np.testing.assert_allclose(softmax, rescale(raw, 0.7, 0.4), atol=1e-5)  # the graph is the runtime's function
    assert (softmax.argmax(1) == x.argmax(1)).all()
    h = np.array([1.0, 0.0])  # per-face temperatures 0.7·e^0.4 and 0.7: the logits of those faces divided by them
    np.testing.assert_allclose(run(graph, x[:2]), x[:2] / (0.7 * np.exp(0.4 * h))[:, None], rtol=1e-4, atol=1e-4)
    plain = with_temperature(graph, 2.0)  # a plain temperature replaces the whole entropy calibration
    np.testing.assert_allclose(run(plain, x), x / 2.0, rtol=1e-6)
    assert calibration_of(plain) == (2.0, 0.0, 0.0)
    assert "mien.entropy_slope" not in {p.key for p in plain.metadata_props}
    assert len(plain.graph.node) == 2 and len(plain.graph.initializer) == 1
    bare = without_calibration(graph)
    assert [n.op_type for n in bare.graph.node] == ["Identity"] and not bare.graph.initializer
    assert calibration_of(bare) == (1.0, 0.0, 0.0) and not bare.metadata_props
    np.testing.assert_allclose(run(bare, x), x)


def test_the_entropy_curve_in_the_graph_is_the_runtimes_and_goes_with_the_rest():
    x = np.random.default_rng(1).normal(0, 3, (64, 3)).astype(np.float32)
    x[0] = [5.0, 5.0, 5.0]  # h = 1: temperature 0.7 · e^(0.4 − 0.9)
    base = identity_model()
    graph = with_temperature(base, 0.7, 0.4, -0.9)
    assert calibration_of(graph) == pytest.approx((0.7, 0.4, -0.9))
    assert {p.key: p.value for p in graph.metadata_props}["mien.entropy_curve"] == "-0.9"
    raw = np.exp(x.astype(np.float64)) / np.exp(x.astype(np.float64)).sum(axis=1, keepdims=True)
    calibrated = np.exp(run(graph, x).astype(np.float64))
    calibrated /= calibrated.sum(axis=1, keepdims=True)
    np.testing.assert_allclose(calibrated, rescale(raw, 0.7, 0.4, -0.9), atol=1e-5)
    assert not np.allclose(calibrated, rescale(raw, 0.7, 0.4), atol=1e-3)  # the curve changes the numbers
    assert (calibrated.argmax(1) == x.argmax(1)).all()
    np.testing.assert_allclose(run(graph, x[:1]), x[:1] / (0.7 * np.exp(0.4 - 0.9)), rtol=1e-4)
    slope_only = with_temperature(graph, 0.7, 0.4)
    assert calibration_of(slope_only) == pytest.approx((0.7, 0.4, 0.0))
    assert "mien.entropy_curve" not in {p.key for p in slope_only.metadata_props}
    bare = without_calibration(graph)
    assert [n.op_type for n in bare.graph.node] == ["Identity"] and not bare.graph.initializer


def test_a_graph_that_leaves_its_classes_symbolic_takes_them_from_its_spec():
    # a ten-crop file (dcnn) averages its views with a ReduceMean the exporter leaves unsized: the entropy
    # calibration normalises by log(classes), which then comes from the spec's labels
    x = np.random.default_rng(2).normal(0, 3, (32, 3)).astype(np.float32)
    sized = with_temperature(identity_model(), 0.7, 0.4, -0.9)
    symbolic = identity_model("classes")
    with pytest.raises(ValueError, match="no fixed number of classes"):
        with_temperature(symbolic, 0.7, 0.4)
    helper.set_model_props(symbolic, PreprocessSpec(labels=("a", "b", "c")).to_metadata())
    np.testing.assert_allclose(run(with_temperature(symbolic, 0.7, 0.4, -0.9), x), run(sized, x), rtol=1e-6)
    helper.set_model_props(symbolic, PreprocessSpec(labels=("a", "b", "c", "d")).to_metadata())
    assert not np.allclose(run(with_temperature(symbolic, 0.7, 0.4, -0.9), x), run(sized, x), rtol=1e-3)


def test_the_entropy_fit_recovers_a_known_slope_and_temperature_scaling_has_none():
    rng = np.random.default_rng(3)
    z = rng.normal(0, 2.0, (30_000, 7))
    probs = np.exp(z) / np.exp(z).sum(axis=1, keepdims=True)
    true = rescale(probs, 0.8, 0.6)  # the truth is drawn from these: the calibrated probabilities
    truth = (true.cumsum(axis=1) > rng.random((len(true), 1))).argmax(axis=1)
    temperature, slope, curve = fit_calibration(probs, truth, method="entropy")
    assert temperature == pytest.approx(0.8, rel=0.1) and slope == pytest.approx(0.6, abs=0.15) and curve == 0.0
    assert fit_calibration(probs, truth, method="temperature")[1:] == (0.0, 0.0)
    with pytest.raises(ValueError, match="method"):
        fit_calibration(probs, truth, method="isotonic")


def test_the_top_label_log_loss_by_hand():
    probs = np.array([[0.8, 0.2], [0.6, 0.4], [0.3, 0.7]])
    truth = np.array([0, 1, 1])  # right at 0.8, wrong at 0.6, right at 0.7
    expected = -(np.log(0.8) + np.log(0.4) + np.log(0.7)) / 3
    assert top_label_log_loss(probs, truth) == pytest.approx(expected)


def test_the_top_label_fit_recovers_the_confidence_of_a_known_curve():
    rng = np.random.default_rng(4)
    z = rng.normal(0, 2.0, (40_000, 7))
    probs = np.exp(z) / np.exp(z).sum(axis=1, keepdims=True)
    true = rescale(probs, 0.7, 1.5, -1.2)  # a bent per-face temperature, which a slope alone cannot follow
    truth = (true.cumsum(axis=1) > rng.random((len(true), 1))).argmax(axis=1)
    fitted = {method: rescale(probs, *fit_calibration(probs, truth, method=method)) for method in METHODS}
    error = {method: np.abs(p.max(1) - true.max(1)).mean() for method, p in fitted.items()}
    assert error["top-label"] < 0.01  # the top label's confidence, face by face, is the true one
    assert error["top-label"] < error["entropy"] < error["temperature"]
    assert top_label_log_loss(fitted["top-label"], truth) <= top_label_log_loss(fitted["entropy"], truth)
    assert all((p.argmax(1) == probs.argmax(1)).all() for p in fitted.values())


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

    block = calibrate(model_copy, tiny_npz)  # the default method: top-label
    shape = block["temperature"], block["entropy_slope"], block["entropy_curve"]
    assert block["method"] == "top-label"
    assert calibration_of(onnx.load(model_copy)) == pytest.approx(shape, rel=1e-6)
    after = OnnxClassifier.from_path(model_copy, CPU).predict_crops(faces)
    np.testing.assert_allclose(after, rescale(before, *shape), atol=1e-5)  # the runtime applies nothing more
    assert (after.argmax(1) == before.argmax(1)).all()
    assert set(block["before"]) == set(block["after"]) == {"val", "public_test"}

    written = json.loads(model_copy.with_name("mini_xception.card.json").read_text())
    assert written["calibration"]["temperature"] == shape[0] and written["calibration"]["fitted_on"] == "val"
    assert (written["calibration"]["entropy_slope"], written["calibration"]["entropy_curve"]) == shape[1:]
    assert written["calibration"]["method"] == "top-label"
    assert written["version"].endswith(calibration_suffix(*shape))
    assert OnnxClassifier.from_path(model_copy, CPU).version == written["version"]

    again = calibrate(model_copy, tiny_npz)  # refitted on the uncalibrated logits: the same calibration
    refit = again["temperature"], again["entropy_slope"], again["entropy_curve"]
    assert refit == pytest.approx(shape, rel=1e-3, abs=1e-4)
    assert again["previous_temperature"] == pytest.approx(shape[0], rel=1e-6)
    entropy = calibrate(model_copy, tiny_npz, method="entropy")
    assert entropy["entropy_curve"] == 0.0 and calibration_of(onnx.load(model_copy))[2] == 0.0
    assert entropy["after"]["val"]["nll"] <= entropy["before"]["val"]["nll"] + 1e-9  # the NLL fits minimise val NLL
    plain = calibrate(model_copy, tiny_npz, method="temperature")  # one temperature, fitted on the same logits
    assert plain["entropy_slope"] == 0.0 and calibration_of(onnx.load(model_copy))[1:] == (0.0, 0.0)
    from tests.conftest import make_client

    with make_client(model_copy.parent) as client:  # GET /models says how the served probabilities were calibrated
        info = {m["id"]: m for m in client.get("/models").json()["models"]}["mini_xception"]["calibration"]
    assert info == {"method": "temperature", "fitted_on": "val", "tested_on": "public_test",
                    "ece_before": plain["before"]["public_test"]["ece"],
                    "ece_after": plain["after"]["public_test"]["ece"]}  # fmt: skip
    np.testing.assert_allclose(OnnxClassifier.from_path(model_copy, CPU).predict_crops(faces),
                               rescale(before, plain["temperature"]), atol=1e-5)  # fmt: skip


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
    shape = temperature, slope, curve = block["temperature"], block["entropy_slope"], block["entropy_curve"]
    assert read_ensemble_config(path)["temperature"] == temperature and temperature != pytest.approx(1.0, abs=1e-3)
    assert (read_ensemble_config(path)["entropy_slope"], read_ensemble_config(path)["entropy_curve"]) == (slope, curve)
    served = EnsembleClassifier.from_path(path, CPU)
    after = served.predict_crops(faces)
    np.testing.assert_allclose(after, rescale(before, *shape), atol=1e-5)  # once, after averaging
    assert (after.argmax(1) == before.argmax(1)).all()
    written = json.loads(card_file.read_text())
    assert written["calibration"]["temperature"] == temperature and written["version"] == served.version
    assert served.version.endswith(calibration_suffix(*shape)) and served.metadata["mien.temperature"]
    entropy = calibrate(path, tiny_npz, method="entropy")
    assert entropy["after"]["val"]["nll"] <= entropy["before"]["val"]["nll"] + 1e-9
    assert "entropy_curve" not in json.loads(path.read_text())
    calibrate(path, tiny_npz)
    # the members' files are untouched: their own temperature stays 1
    assert temperature_of(onnx.load(folder / "twin.onnx")) == 1.0
    again = calibrate(path, tiny_npz)  # refitted on the untempered average
    assert again["temperature"] == pytest.approx(temperature, rel=1e-4)

    config = json.loads(path.read_text())
    for bad in (0, -1.5, "2", True):
        path.write_text(json.dumps(config | {"temperature": bad}))
        with pytest.raises(EnsembleError, match="temperature"):
            read_ensemble_config(path)
    for key in ("entropy_slope", "entropy_curve"):
        for bad in ("0.3", True, None):
            path.write_text(json.dumps(config | {key: bad}))
            with pytest.raises(EnsembleError, match=key):
                read_ensemble_config(path)
        path.write_text(json.dumps({k: v for k, v in config.items() if k != "temperature"} | {key: 0.2}))
        with pytest.raises(EnsembleError, match="needs a 'temperature'"):
            read_ensemble_config(path)


def test_calibration_cv_scores_an_ensemble_without_its_own_calibration(model_copy, tiny_npz):
    from mien.ensemble import EnsembleClassifier
    from mien.export.calibrate import ensemble_probabilities
    from mien.export.ensemble import write_ensemble
    from tests.test_ensemble import relabel
    from tests.test_stats import _benchmark

    folder = model_copy.parent
    relabel(model_copy, folder / "twin.onnx", "twin")
    write_ensemble(["mini_xception", "twin"], folder, model_id="pair", data=str(tiny_npz))
    path = folder / "pair.ensemble.json"
    raw, truth = ensemble_probabilities(EnsembleClassifier.from_path(path, CPU), tiny_npz, "val")
    card_file = folder / "pair.card.json"
    card = json.loads(card_file.read_text())
    card["metrics"]["selected_on"] = "val"  # as when every member was selected on val (twin has no card)
    card_file.write_text(json.dumps(card))
    calibrate(path, tiny_npz)
    served, _ = ensemble_probabilities(EnsembleClassifier.from_path(path, CPU), tiny_npz, "val")
    assert not np.allclose(served, raw, atol=1e-4)  # the file now applies its temperature

    module = _benchmark("calibration_cv")
    assert module.model_ids(folder) == ["mini_xception", "pair", "twin"]
    probs, cv_truth = module.uncalibrated(folder, "pair", str(tiny_npz), "val")
    np.testing.assert_allclose(probs, raw, atol=1e-6)  # the ensemble's own calibration taken out, members' kept
    np.testing.assert_array_equal(cv_truth, truth)
    single, _ = module.uncalibrated(folder, "mini_xception", str(tiny_npz), "val")
    assert single.shape == raw.shape


def test_the_cli_offers_every_calibration_method():
    from mien.export.cli import CALIBRATION_METHODS

    assert set(CALIBRATION_METHODS) == set(METHODS) and CALIBRATION_METHODS[0] == "top-label"
