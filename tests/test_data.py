import numpy as np
import pytest

from mien.spec import FER2013_LABELS
from mien.training.data import DataError, load_fer2013
from tests.conftest import SHARED_DATA


def _csv(path, rows, header="emotion,pixels,Usage"):
    path.write_text(header + "\n" + "\n".join(rows) + "\n")
    return path


def _pixels(value=7, n=48 * 48):
    return " ".join([str(value)] * n)


def test_reads_kaggle_csv(tmp_path):
    path = _csv(tmp_path / "fer2013.csv", [f"3,{_pixels(1)},Training", f"0,{_pixels(2)},PublicTest",
                                          f"6,{_pixels(3)},PrivateTest"])  # fmt: skip
    data = load_fer2013(path)
    assert data.images.shape == (3, 48, 48) and data.images.dtype == np.uint8
    assert data.labels.tolist() == [3, 0, 6]
    assert data.split.tolist() == ["train", "public_test", "private_test"]
    images, labels = data.subset("public_test")
    assert labels.tolist() == [0] and images[0, 0, 0] == 2
    assert data.label_names == FER2013_LABELS


@pytest.mark.parametrize(
    "rows, header, message",
    [
        ([f"3,{_pixels()},Training"], "emotion,pixels", r"missing column\(s\) \['Usage'\]"),
        ([f"3,{_pixels()},Training", f"3,{_pixels(n=100)},Training"], None, "line 3: 100 pixel values"),
        ([f"3,{_pixels()},Training", "3,1 2 x,Training"], None, "line 3: pixels must be space-separated integers"),
        ([f"9,{_pixels()},Training"], None, "line 2: emotion 9 is outside 0..6"),
        ([f"x,{_pixels()},Training"], None, "line 2: emotion 'x' is not an integer"),
        ([f"1,{_pixels(300)},Training"], None, "line 2: pixel values must lie in 0..255"),
        ([f"1,{_pixels()},Holdout"], None, "line 2: Usage 'Holdout'"),
        ([], None, "no rows"),
    ],
)
def test_bad_csv_names_what_and_where(tmp_path, rows, header, message):
    path = _csv(tmp_path / "bad.csv", rows, header or "emotion,pixels,Usage")
    with pytest.raises(DataError, match=message):
        load_fer2013(path)


def test_reads_image_folders(tmp_path):
    import cv2

    for split, emotion, value in [("train", "happy", 10), ("train", "angry", 20), ("test", "neutral", 30)]:
        folder = tmp_path / split / emotion
        folder.mkdir(parents=True)
        cv2.imwrite(str(folder / "a.png"), np.full((48, 48), value, np.uint8))
    data = load_fer2013(tmp_path)
    pairs = sorted(zip(data.split.tolist(), data.labels.tolist(), strict=True))
    assert pairs == [("test", 6), ("train", 0), ("train", 3)]
    assert data.splits == ["test", "train"]
    with pytest.raises(
        DataError, match=r"no images in split 'public_test'; this data set has splits \['test', 'train'\]"
    ):
        data.subset("public_test")


def test_unknown_emotion_folder(tmp_path):
    (tmp_path / "train" / "bored").mkdir(parents=True)
    with pytest.raises(DataError, match="unknown emotion folder 'bored'"):
        load_fer2013(tmp_path)


def test_missing_path_says_what_formats_work(tmp_path):
    with pytest.raises(DataError, match="no such file or folder.*fer2013.csv"):
        load_fer2013(tmp_path / "nowhere.csv")


def test_npz_missing_array(tmp_path):
    np.savez(tmp_path / "x.npz", images=np.zeros((1, 48, 48), np.uint8))
    with pytest.raises(DataError, match=r"missing array\(s\) \['labels', 'split'\]"):
        load_fer2013(tmp_path / "x.npz")


def test_tiny_npz_round_trip(tiny_npz):
    data = load_fer2013(tiny_npz)
    assert data.splits == ["public_test", "train"]
    assert len(data.subset("train")[0]) == 7 * 150


@pytest.mark.skipif(not SHARED_DATA.exists(), reason="../shared/data is not beside this checkout")
def test_shared_fer2013_npz_counts():
    data = load_fer2013(SHARED_DATA)
    _, train_y = data.subset("train")
    _, val_y = data.subset("public_test")
    assert np.bincount(train_y).tolist() == [3995, 436, 4097, 7215, 4830, 3171, 4965]
    assert np.bincount(val_y).tolist() == [467, 56, 496, 895, 653, 415, 607]
