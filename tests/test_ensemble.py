"""The ensemble model id: averaging, its file and card, serving it, and refusing broken definitions."""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import numpy as np
import onnx
import pytest

from mien.card import Card
from mien.ensemble import EnsembleClassifier, EnsembleError, load_classifier, read_ensemble_config
from mien.export.ensemble import members_selected_on, write_ensemble
from mien.export.ensemble_search import (
    accuracy,
    cross_fitted,
    fit_weights,
    greedy_members,
    member_probabilities,
    mixture,
    nll,
    not_held_out,
    top_k,
)
from mien.export.evaluate import evaluate_path
from mien.runtime import MODEL_ID_KEY, OnnxClassifier
from tests.conftest import CPU, make_client


def relabel(src: Path, dst: Path, model_id: str, **metadata: str) -> None:
    """Copy an exported model under another model id (and optionally other metadata values)."""
    proto = onnx.load(str(src))
    values = {p.key: p.value for p in proto.metadata_props} | {MODEL_ID_KEY: model_id} | metadata
    del proto.metadata_props[:]
    for key, value in values.items():
        entry = proto.metadata_props.add()
        entry.key, entry.value = key, value
    onnx.save(proto, str(dst))


@pytest.fixture(scope="module")
def two_models(model_dir, tmp_path_factory) -> Path:
    """mini_xception (+ card) and a copy of it served as a second model id, `twin` (no card)."""
    folder = tmp_path_factory.mktemp("ensemble_models")
    for name in ("mini_xception.onnx", "mini_xception.card.json"):
        shutil.copy(model_dir / name, folder / name)
    relabel(model_dir / "mini_xception.onnx", folder / "twin.onnx", "twin")
    return folder


def faces(n: int = 6, seed: int = 0) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 256, size=(60, 50), dtype=np.uint8) for _ in range(n)]


def test_ensemble_is_the_mean_of_members_and_of_mirrors(two_models):
    a = OnnxClassifier.from_path(two_models / "mini_xception.onnx", providers=CPU)
    crops = faces()
    mirrored = [c[:, ::-1] for c in crops]
    plain = EnsembleClassifier("e", [a, a], flip=False).predict_crops(crops)
    np.testing.assert_allclose(plain, a.predict_crops(crops), atol=1e-6)
    flipped = EnsembleClassifier("e", [a, a], flip=True).predict_crops(crops)
    np.testing.assert_allclose(flipped, 0.5 * (a.predict_crops(crops) + a.predict_crops(mirrored)), atol=1e-6)
    np.testing.assert_allclose(flipped.sum(1), 1.0, atol=1e-5)
    assert not np.allclose(flipped, plain, atol=1e-4)  # the mirror views did change something
    assert EnsembleClassifier("e", [a, a]).predict_crops([]).shape == (0, 7)


def test_write_ensemble_card_matches_mien_eval_and_is_served(two_models, tiny_npz, astronaut_jpeg, tmp_path):
    card = write_ensemble(["mini_xception", "twin"], two_models, flip=True, data=str(tiny_npz))
    assert read_ensemble_config(two_models / "ensemble.ensemble.json") == {
        "model_id": "ensemble", "members": ["mini_xception", "twin"], "flip": True, "weights": None,
        "temperature": None, "entropy_slope": 0.0, "entropy_curve": 0.0,
    }  # fmt: skip
    saved = json.loads((two_models / "ensemble.card.json").read_text())
    assert saved == card
    assert [m["model_id"] for m in card["members"]] == ["mini_xception", "twin"]
    assert card["members"][0]["accuracy"] is not None and card["members"][1]["accuracy"] is None  # twin has no card
    member_card = json.loads((two_models / "mini_xception.card.json").read_text())
    assert card["macs"] == 2 * member_card["macs"]  # twin has no card: its MACs are unknown (0)
    assert card["metrics"]["selected_on"] is None  # twin's card cannot say what selected it
    report = evaluate_path(str(two_models / "ensemble.ensemble.json"), str(tiny_npz), "public_test", str(tmp_path))
    assert report["accuracy"] == pytest.approx(card["metrics"]["accuracy"])
    assert 0.2 < report["accuracy"] <= 1.0

    with make_client(two_models) as c:
        models = {m["id"]: m for m in c.get("/models").json()["models"]}
        assert set(models) == {"mini_xception", "twin", "ensemble"}
        assert models["ensemble"]["accuracy"] == pytest.approx(card["metrics"]["accuracy"])
        assert models["ensemble"]["labels"] == models["mini_xception"]["labels"]
        response = c.post("/predict?model=ensemble", files={"file": ("a.jpg", astronaut_jpeg, "image/jpeg")})
        assert response.status_code == 200, response.text
        body = response.json()
        assert body["model"] == "ensemble" and len(body["faces"]) == 1
        assert sum(body["faces"][0]["probabilities"].values()) == pytest.approx(1.0, abs=1e-3)
        assert c.get("/ready").json()["refused"] == {}


def test_ensemble_with_a_missing_member_is_refused_not_written(two_models):
    with pytest.raises(EnsembleError, match="ghost"):
        write_ensemble(["mini_xception", "ghost"], two_models, model_id="broken", data="unused")
    assert not (two_models / "broken.ensemble.json").exists()


@pytest.mark.parametrize(
    ("content", "reason"),
    [
        ('{"members": ["mini_xception"]}', "at least two"),
        ('{"members": ["mini_xception", "mini_xception"]}', "listed twice"),
        ('{"members": ["mini_xception", "nobody"]}', "nobody"),
        ('{"members": ["mini_xception", "twin"], "flip": "yes"}', "flip"),
        ("not json", "unreadable"),
    ],
)
def test_broken_ensemble_files_are_refused_and_the_models_still_served(two_models, tmp_path, content, reason):
    for path in two_models.glob("*.onnx"):
        shutil.copy(path, tmp_path / path.name)
    (tmp_path / "bad.ensemble.json").write_text(content)
    with make_client(tmp_path) as c:
        ready = c.get("/ready").json()
        assert reason in ready["refused"]["bad.ensemble.json"]
        assert {m["id"] for m in c.get("/models").json()["models"]} == {"mini_xception", "twin"}


def test_members_must_share_labels(two_models, tmp_path):
    a = OnnxClassifier.from_path(two_models / "mini_xception.onnx", providers=CPU)
    spec = json.loads(a.metadata["mien.preprocess_spec"])
    spec["labels"] = ["a", "b", "c", "d", "e", "f", "happy"]  # one name in common: not an ensemble
    relabel(
        two_models / "mini_xception.onnx",
        tmp_path / "other.onnx",
        "other",
        **{"mien.preprocess_spec": json.dumps(spec)},
    )
    b = OnnxClassifier.from_path(tmp_path / "other.onnx", providers=CPU)
    with pytest.raises(EnsembleError, match="share fewer than two labels"):
        EnsembleClassifier("e", [a, b])


def with_contempt(src: Path, dst: Path, model_id: str) -> None:
    """``src`` (7 FER2013 logits) as an 8-label FER+-style model: a contempt logit, a copy of angry's, appended."""
    proto = onnx.load(str(src))
    graph = proto.graph
    out = graph.output[0]
    logits = out.name + "_7"
    for node in graph.node:  # the old output becomes an inner tensor
        node.output[:] = [logits if o == out.name else o for o in node.output]
    graph.initializer.extend([onnx.numpy_helper.from_array(np.array(v, np.int64), n)
                              for n, v in (("c_start", [0]), ("c_end", [1]), ("c_axis", [1]))])  # fmt: skip
    graph.node.extend([
        onnx.helper.make_node("Slice", [logits, "c_start", "c_end", "c_axis"], ["contempt"]),
        onnx.helper.make_node("Concat", [logits, "contempt"], [out.name], axis=1),
    ])  # fmt: skip
    out.type.tensor_type.shape.dim[1].Clear()  # 8 now, left symbolic
    spec = json.loads({p.key: p.value for p in proto.metadata_props}["mien.preprocess_spec"])
    spec["labels"] = [*spec["labels"], "contempt"]
    onnx.save(proto, str(dst))
    relabel(dst, dst, model_id, **{"mien.preprocess_spec": json.dumps(spec)})


def test_a_member_with_more_labels_joins_on_the_shared_ones(two_models, tiny_npz, astronaut_jpeg, tmp_path, caplog):
    """A FER+-style member (contempt too) in a FER2013 ensemble contributes its seven labels, renormalised."""
    a = OnnxClassifier.from_path(two_models / "mini_xception.onnx", providers=CPU)
    with_contempt(two_models / "mini_xception.onnx", tmp_path / "plus.onnx", "plus")
    plus = OnnxClassifier.from_path(tmp_path / "plus.onnx", providers=CPU)
    crops = faces()
    p7, p8 = a.predict_crops(crops), plus.predict_crops(crops)
    assert plus.spec.labels == (*a.spec.labels, "contempt") and p8.shape == (len(crops), 8)
    np.testing.assert_allclose(p8[:, 7], p8[:, 0], atol=1e-6)  # contempt really takes a share
    assert (p8[:, :7].sum(1) < 0.99).all()

    for members in ([a, plus], [plus, a]):  # in either order the ensemble serves the seven shared labels
        with caplog.at_level(logging.INFO, logger="mien.ensemble"):
            ensemble = EnsembleClassifier("e", members, weights=[0.3, 0.7])
        assert "member plus's ['contempt'] left out" in caplog.text
        assert ensemble.spec.labels == a.spec.labels and ensemble.spec.num_classes == 7
        out = ensemble.predict_crops(crops)
        # plus's seven renormalised probabilities are a's own, so the weighted mean is a's
        np.testing.assert_allclose(out, p7, atol=1e-5)
    # the search that chooses members scores such a member the way the ensemble serves it
    (tmp_path / "mini_xception.onnx").symlink_to(two_models / "mini_xception.onnx")
    probs, truth = member_probabilities(tmp_path, ["mini_xception", "plus"], str(tiny_npz), "public_test")
    assert probs["plus"].shape == probs["mini_xception"].shape == (len(truth), 7)
    np.testing.assert_allclose(probs["plus"], probs["mini_xception"], atol=1e-5)
    # and the service lists and serves it with the shared labels
    (tmp_path / "mixed.ensemble.json").write_text('{"members": ["plus", "mini_xception"]}')
    with make_client(tmp_path) as c:
        assert c.get("/ready").json()["refused"] == {}
        models = {m["id"]: m for m in c.get("/models").json()["models"]}
        assert models["plus"]["labels"][-1] == "contempt" and models["mixed"]["labels"] == list(a.spec.labels)
        response = c.post("/predict?model=mixed", files={"file": ("a.jpg", astronaut_jpeg, "image/jpeg")})
        assert response.status_code == 200, response.text
        assert set(response.json()["faces"][0]["probabilities"]) == set(a.spec.labels)


def test_load_classifier_picks_by_suffix(two_models):
    (two_models / "pair.ensemble.json").write_text('{"members": ["mini_xception", "twin"]}')
    try:
        ensemble = load_classifier(two_models / "pair.ensemble.json", providers=CPU)
        assert isinstance(ensemble, EnsembleClassifier) and ensemble.model_id == "pair"
        assert ensemble.member_ids == ["mini_xception", "twin"] and ensemble.flip is False
        assert isinstance(load_classifier(two_models / "twin.onnx", providers=CPU), OnnxClassifier)
    finally:
        (two_models / "pair.ensemble.json").unlink()


def test_an_ensemble_was_selected_where_all_its_members_were():
    def card(selected_on):
        metrics = {"split": "public_test", "accuracy": 0.6, "selected_on": selected_on}
        return Card(model_id="m", version="v", file="m.onnx", labels=["a", "b"], metrics=metrics)

    assert members_selected_on([card("val"), card("val")]) == "val"
    assert members_selected_on([card("val"), card("public_test")]) is None
    assert members_selected_on([card("val"), None]) is None


def test_ensemble_search_greedy_and_top_k():
    truth = np.array([0, 0, 1, 1])
    # a is right on two faces, b on three, c on two; averaged, a and b are right on all four
    probs = {
        "a": np.array([[0.9, 0.1], [0.8, 0.2], [0.6, 0.4], [0.6, 0.4]]),
        "b": np.array([[0.3, 0.7], [0.9, 0.1], [0.1, 0.9], [0.2, 0.8]]),
        "c": np.array([[0.4, 0.6], [0.4, 0.6], [0.4, 0.6], [0.4, 0.6]]),
    }
    assert accuracy(probs, ["a"], truth) == 0.5 and accuracy(probs, ["b"], truth) == 0.75
    assert greedy_members(probs, truth) == [("b", 0.75), ("a", 1.0)]
    ranked, top = top_k(probs, truth)
    assert ranked == ["b", "a", "c"] and top == {2: 1.0, 3: 1.0}


def test_cross_fitted_weights_score_every_face_with_a_fit_on_the_other_half():
    rng = np.random.default_rng(0)
    truth = np.repeat(np.arange(3), 40)
    good = np.full((120, 3), 0.1)
    good[np.arange(120), truth] = 0.8
    good[::5] = good[::5][:, [1, 2, 0]]  # wrong on one face in five
    noise = rng.dirichlet(np.ones(3), 120)
    # two copies of one member: whatever the weights, every face's mixture is that member's answer, so the
    # cross-fitted figures equal the in-sample ones only if every face is scored in every repeat
    same = cross_fitted({"a": good, "b": good.copy()}, ["a", "b"], truth, repeats=3)
    assert same["fitted_accuracy"] == same["equal_accuracy"] == 0.8
    assert same["cross_fitted_accuracy"] == pytest.approx(0.8)
    assert same["cross_fitted_nll"] == pytest.approx(same["equal_nll"])
    # a member that knows nothing gets (almost) no weight, in-sample and on the halves it was not fitted on
    mixed = cross_fitted({"good": good, "noise": noise}, ["good", "noise"], truth)
    assert mixed["fitted_weights"][0] > 0.9
    assert mixed["cross_fitted_nll"] < mixed["equal_nll"]
    assert mixed["cross_fitted_accuracy"] == pytest.approx(0.8, abs=0.02)


class FixedMember:
    """A stand-in member answering fixed probabilities for every crop (EnsembleClassifier duck-types members)."""

    def __init__(self, model_id: str, row: list[float], spec) -> None:
        self.model_id, self.version, self.spec, self.provider = model_id, model_id, spec, "CPUExecutionProvider"
        self.row = np.asarray(row, np.float32)

    def predict_crops(self, crops, batch_size=256):
        return np.tile(self.row, (len(crops), 1))


def test_weighted_ensemble_is_the_weighted_mean_and_weights_are_validated(two_models, tmp_path):
    spec = OnnxClassifier.from_path(two_models / "mini_xception.onnx", providers=CPU).spec
    a = FixedMember("a", [1, 0, 0, 0, 0, 0, 0], spec)
    b = FixedMember("b", [0, 1, 0, 0, 0, 0, 0], spec)
    crops = [np.zeros((48, 48), np.uint8)] * 3
    weighted = EnsembleClassifier("e", [a, b], weights=[3, 1])
    np.testing.assert_allclose(weighted.predict_crops(crops)[0, :2], [0.75, 0.25], atol=1e-6)
    np.testing.assert_allclose(EnsembleClassifier("e", [a, b]).predict_crops(crops)[0, :2], [0.5, 0.5], atol=1e-6)
    assert weighted.weights == [0.75, 0.25] and weighted.metadata["mien.ensemble.weights"] == "0.75,0.25"
    assert weighted.version != EnsembleClassifier("e", [a, b]).version
    for weights, reason in (([1.0], "one number per member"), ([1, -1], "non-negative"), ([0, 0], "all be zero")):
        path = tmp_path / "w.ensemble.json"
        path.write_text(json.dumps({"members": ["a", "b"], "weights": weights}))
        with pytest.raises(EnsembleError, match=reason):
            read_ensemble_config(path)


def test_fitted_weights_favour_the_member_that_knows_and_lower_the_nll():
    rng = np.random.default_rng(0)
    truth = rng.integers(0, 7, 500)
    knows = np.full((500, 7), 0.3 / 6)
    knows[np.arange(500), truth] = 0.7
    guesses = rng.dirichlet(np.ones(7), 500)
    probs = {"knows": knows, "guesses": guesses}
    weights = fit_weights(probs, ["knows", "guesses"], truth)
    assert sum(weights) == pytest.approx(1.0) and weights[0] > 0.9
    assert nll(mixture(probs, ["knows", "guesses"], weights), truth) < nll(mixture(probs, ["knows", "guesses"]), truth)


def test_weights_are_fitted_only_on_faces_held_out_from_every_member(two_models, tiny_npz, tmp_path):
    # twin has no card, so nothing says the validation faces were kept out of its training
    assert not_held_out(two_models, ["mini_xception", "twin"], "val") == {"twin": "no card"}
    with pytest.raises(ValueError, match="not held out from every member.*twin: no card"):
        write_ensemble(["mini_xception", "twin"], two_models, model_id="refused", data=str(tiny_npz), weights="fit")
    assert not (two_models / "refused.ensemble.json").exists()
    # a member selected on public_test trained on all of Training, the val faces included
    folder = tmp_path / "old"
    shutil.copytree(two_models, folder)
    card = json.loads((folder / "mini_xception.card.json").read_text())
    card["metrics"]["selected_on"] = "public_test"
    (folder / "mini_xception.card.json").write_text(json.dumps(card))
    assert not_held_out(folder, ["mini_xception"], "val") == {
        "mini_xception": "selected on 'public_test', trained on the val faces"
    }
    assert not_held_out(two_models, ["mini_xception"], "val") == {}
    # equal weights need no fitting, so any bundled members may still be averaged
    write_ensemble(["mini_xception", "twin"], folder, model_id="equal", data=str(tiny_npz))


def test_write_ensemble_fits_weights_on_validation_and_says_so(two_models, tiny_npz):
    # twin is a cardless copy of a held-out model: force says we know
    card = write_ensemble(["mini_xception", "twin"], two_models, model_id="fitted", data=str(tiny_npz),
                          weights="fit", force=True)  # fmt: skip
    config = read_ensemble_config(two_models / "fitted.ensemble.json")
    assert config["weights"] == pytest.approx(card["weights"]) and sum(card["weights"]) == pytest.approx(1.0)
    assert card["weights_fitted_on"] == "val" and card["metrics"]["split"] == "public_test"
    assert "--weights fit --fit-split val --force" in card["export"]["command"]
    with pytest.raises(ValueError, match="another split"):
        write_ensemble(["mini_xception", "twin"], two_models, model_id="x", data=str(tiny_npz), weights="fit",
                       fit_split="public_test")  # fmt: skip
