import json

import numpy as np
import pytest

from mien.preprocess import expand_box, to_model_input
from mien.spec import FER2013_LABELS, METADATA_KEY, PreprocessSpec, SpecError


def test_round_trip_through_metadata_is_identical():
    spec = PreprocessSpec(input_size=(64, 64), channels=3, mean=(0.5, 0.4, 0.3), std=(0.2, 0.2, 0.2))
    meta = spec.to_metadata()
    assert set(meta) == {METADATA_KEY}
    assert PreprocessSpec.from_metadata(meta) == spec


def test_missing_metadata_says_how_to_fix():
    with pytest.raises(SpecError, match="mien export"):
        PreprocessSpec.from_metadata({"other": "x"})


@pytest.mark.parametrize(
    "change, message",
    [
        ({"channels": 2}, "channels"),
        ({"mean": [0.5, 0.5]}, "mean and std"),
        ({"std": [0.0]}, "std"),
        ({"labels": ["a", "a"]}, "distinct"),
        ({"output": "softmaxish"}, "output"),
        ({"input_size": [48]}, "input_size"),
        ({"crop_margin": 3}, "crop_margin"),
        ({"colour": "blue"}, "unknown spec fields"),
    ],
)
def test_invalid_specs_are_refused_naming_the_field(change, message):
    data = {**PreprocessSpec().to_dict(), **change}
    with pytest.raises(SpecError, match=message):
        PreprocessSpec.from_json(json.dumps(data))


def test_not_json_is_refused():
    with pytest.raises(SpecError, match="not valid JSON"):
        PreprocessSpec.from_metadata({METADATA_KEY: "{nope"})


def test_default_labels_are_fer2013_order():
    assert PreprocessSpec().labels == FER2013_LABELS == (
        "angry", "disgust", "fear", "happy", "sad", "surprise", "neutral"
    )  # fmt: skip


def test_to_model_input_resizes_converts_and_normalises():
    spec = PreprocessSpec(input_size=(48, 48), channels=1, mean=(0.5,), std=(0.5,))
    white_bgr = np.full((100, 80, 3), 255, np.uint8)
    black_gray = np.zeros((48, 48), np.uint8)
    batch = to_model_input([white_bgr, black_gray], spec)
    assert batch.shape == (2, 1, 48, 48) and batch.dtype == np.float32
    np.testing.assert_allclose(batch[0], 1.0, atol=1e-6)
    np.testing.assert_allclose(batch[1], -1.0, atol=1e-6)


def test_to_model_input_rgb_order():
    spec = PreprocessSpec(input_size=(8, 8), channels=3, mean=(0, 0, 0), std=(1, 1, 1), scale=1.0)
    bgr = np.zeros((8, 8, 3), np.uint8)
    bgr[..., 0] = 10  # blue
    bgr[..., 2] = 200  # red
    batch = to_model_input([bgr], spec)
    assert batch[0, 0, 0, 0] == 200 and batch[0, 2, 0, 0] == 10


def test_expand_box_grows_and_clips():
    assert expand_box((10, 10, 20, 20), 0.25, (100, 100)) == (5, 5, 30, 30)
    assert expand_box((0, 0, 20, 20), 0.5, (25, 25)) == (0, 0, 25, 25)
