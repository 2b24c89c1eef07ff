"""The probability cache of `mien results`: the same file on the same faces is answered from disk, anything
changed is computed again, and the results it gives are the ones computed without it."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

import mien.export.ensemble_search as ensemble_search
import mien.export.results as results_module
from mien.export.ensemble_search import member_probabilities
from mien.export.prob_cache import CachedClassifier, cached, fingerprint
from mien.export.results import ResultsConfig, write_results


class Counting:
    """A classifier whose probabilities depend on the crops, counting its calls."""

    spec = "its spec"

    def __init__(self) -> None:
        self.calls = 0

    def predict_crops(self, crops: list[np.ndarray], batch_size: int = 256) -> np.ndarray:
        self.calls += 1
        means = np.array([c.mean() for c in crops], dtype=np.float32)
        return np.stack([means, 255 - means], axis=1) / 255


def faces(seed: int, n: int = 5) -> list[np.ndarray]:
    return list(np.random.default_rng(seed).integers(0, 256, (n, 48, 48), dtype=np.uint8))


def test_the_same_crops_are_answered_from_the_folder_and_others_are_computed(tmp_path):
    inner = Counting()
    model = CachedClassifier(inner, "model-a", tmp_path)
    first = model.predict_crops(faces(0))
    again = model.predict_crops(faces(0))
    np.testing.assert_array_equal(first, again)
    assert (inner.calls, model.hits, model.misses) == (1, 1, 1)
    other = model.predict_crops(faces(1))  # other faces
    assert inner.calls == 2 and not np.array_equal(other, first)
    mirrored = [np.ascontiguousarray(f[:, ::-1]) for f in faces(0)]
    model.predict_crops(mirrored)  # the same pixels in another order are other faces
    assert inner.calls == 3
    CachedClassifier(inner, "model-b", tmp_path).predict_crops(faces(0))  # another model, the same faces
    assert inner.calls == 4
    assert model.spec == "its spec"  # every other attribute is the classifier's
    assert len(list(tmp_path.glob("*.npy"))) == 4 and not list(tmp_path.glob("*partial*"))


def test_a_broken_file_in_the_folder_is_computed_again_and_replaced(tmp_path):
    inner = Counting()
    model = CachedClassifier(inner, "model-a", tmp_path)
    expected = model.predict_crops(faces(0))
    (stored,) = tmp_path.glob("*.npy")
    stored.write_bytes(b"not an array")
    np.testing.assert_array_equal(model.predict_crops(faces(0)), expected)
    np.save(stored, np.zeros((2, 2), dtype=np.float32))  # an array, but not one row a face
    np.testing.assert_array_equal(model.predict_crops(faces(0)), expected)
    assert inner.calls == 3
    np.testing.assert_array_equal(np.load(stored), expected)


def test_the_fingerprint_follows_the_bytes_of_the_file_and_of_an_ensembles_members(tmp_path):
    for name in ("a", "b"):
        (tmp_path / f"{name}.onnx").write_bytes(f"graph {name}".encode())
    ensemble = tmp_path / "pair.ensemble.json"
    ensemble.write_text(json.dumps({"model_id": "pair", "members": ["a", "b"], "flip": True}))
    before = fingerprint(ensemble), fingerprint(tmp_path / "a.onnx")
    copy = tmp_path / "elsewhere"
    copy.mkdir()
    for name in ("a.onnx", "b.onnx", "pair.ensemble.json"):
        shutil.copy(tmp_path / name, copy / name)
    assert (fingerprint(copy / "pair.ensemble.json"), fingerprint(copy / "a.onnx")) == before  # content, not place
    (tmp_path / "b.onnx").write_bytes(b"graph b, retrained")
    assert fingerprint(ensemble) != before[0]  # a member changed: the ensemble's answers may have
    assert fingerprint(tmp_path / "a.onnx") == before[1]
    ensemble.write_text(json.dumps({"model_id": "pair", "members": ["a", "b"], "flip": True, "weights": [2, 1]}))
    assert len({before[0], fingerprint(ensemble)}) == 2
    inner = Counting()
    assert cached(inner, tmp_path / "a.onnx", None) is inner  # no folder, no cache


@pytest.fixture()
def spied(monkeypatch) -> list:
    """The cached classifiers `mien results` makes, kept for their counts."""
    made = []

    def spy(classifier, path, folder):
        made.append(cached(classifier, path, folder))
        return made[-1]

    monkeypatch.setattr(results_module, "cached", spy)
    return made


def test_results_from_the_cache_equal_the_results_computed_without_it(model_dir, tiny_npz, tmp_path, spied):
    folder = tmp_path / "models"
    folder.mkdir()
    for name in ("mini_xception.onnx", "mini_xception.card.json"):
        shutil.copy(model_dir / name, folder / name)

    def run(name: str, cache: Path | None) -> list[dict]:
        cfg = ResultsConfig(model_dir=str(folder), data=str(tiny_npz), out=str(tmp_path / name / "results.md"),
                            figures=str(tmp_path / name / "figures"), repeats=2, reference="",
                            cache=cache and str(cache))  # fmt: skip
        return write_results(cfg)

    plain = run("plain", None)
    assert len(spied) == 1 and not isinstance(spied[0], CachedClassifier)  # no folder: nothing cached
    spied.clear()
    filled = run("filled", tmp_path / "cache")
    assert [(c.hits, c.misses) for c in spied] == [(0, 2)]  # clean and occluded faces, computed and kept
    spied.clear()
    reused = run("reused", tmp_path / "cache")
    assert [(c.hits, c.misses) for c in spied] == [(2, 0)]
    timing = ("ms_per_face_b1", "ms_per_face_b32", "correct")
    for rows in (filled, reused):
        for key, value in plain[0].items():
            if key not in timing:
                assert rows[0][key] == value, key
        np.testing.assert_array_equal(rows[0]["correct"], plain[0]["correct"])
        assert rows[0]["ms_per_face_b1"] > 0  # measured each time, never read from the cache


def test_the_ensemble_search_reads_the_same_probabilities_from_the_cache(model_dir, tiny_npz, tmp_path, monkeypatch):
    plain, truth = member_probabilities(model_dir, ["mini_xception"], str(tiny_npz), "val", flip=True)
    made = []
    monkeypatch.setattr(ensemble_search, "cached", lambda *a: made.append(cached(*a)) or made[-1])
    for expected in ((0, 2), (2, 0)):  # the faces and their mirrors: computed, then read
        probs, again = member_probabilities(model_dir, ["mini_xception"], str(tiny_npz), "val", flip=True,
                                            cache=tmp_path)  # fmt: skip
        assert (made[-1].hits, made[-1].misses) == expected
        np.testing.assert_array_equal(probs["mini_xception"], plain["mini_xception"])
        np.testing.assert_array_equal(again, truth)
