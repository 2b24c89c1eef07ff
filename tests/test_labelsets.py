"""Other label sets: a subset or remapping of FER2013's labels, CK+ in the CK+48 folder layout, and the
label list travelling from the data into the spec and the model's output size."""

from __future__ import annotations

import cv2
import numpy as np
import pytest
import torch

from mien.cli import build_parser
from mien.spec import FER2013_LABELS
from mien.training.checkpoint import load_model
from mien.training.data import CKPLUS_FOLDERS, CKPLUS_LABELS, DataError, load_dataset, select_labels
from mien.training.train import TrainConfig, train
from tests.conftest import write_npz

FIVE = ("angry", "sad", "happy", "fear", "neutral")  # the DCNN paper's 5-class setup, in its order


@pytest.fixture(scope="module")
def small_npz(tmp_path_factory):
    return write_npz(tmp_path_factory.mktemp("labels") / "small.npz", train_per_class=6, test_per_class=2)


def _write_ckplus(root, per_class: int = 5, names=CKPLUS_FOLDERS, subjects: bool = False):
    for c, name in enumerate(names):
        folder = root / name
        folder.mkdir(parents=True)
        for i in range(per_class):
            stem = f"S{100 + i:03d}_00{c}_0000001{i}" if subjects else f"face{i}"
            cv2.imwrite(str(folder / f"{stem}.png"), np.full((48, 48), 20 * c + i, np.uint8))
    return root


def test_subset_drops_other_classes_and_remaps_in_the_given_order(small_npz):
    data = load_dataset(small_npz)
    five = select_labels(data, FIVE)
    assert five.label_names == FIVE
    assert len(five) == 5 * 8 and np.bincount(five.labels).tolist() == [8] * 5
    # every kept face keeps its own image: "sad" (FER index 4) is now index 1
    sad_images = data.images[data.labels == FER2013_LABELS.index("sad")]
    np.testing.assert_array_equal(five.images[five.labels == 1], sad_images)


def test_label_map_merges_classes(small_npz):
    data = select_labels(load_dataset(small_npz), label_map={"surprise": "happy", "disgust": "angry"})
    assert data.label_names == ("angry", "fear", "happy", "sad", "neutral")
    assert np.bincount(data.labels).tolist() == [16, 8, 16, 8, 8]


@pytest.mark.parametrize(
    "labels, label_map, message",
    [
        (("angry", "bored"), None, r"label\(s\) \['bored'\] not in this data set; its labels are \['angry'"),
        (("angry", "surprise"), {"surprise": "happy"}, r"\['surprise'\] not in this data set; its labels after"),
        (None, {"contempt": "angry"}, r"label map names \['contempt'\], not labels of this data set"),
        (("angry", "angry"), None, "at least two distinct names"),
    ],
)
def test_label_errors_say_what_is_wrong(small_npz, labels, label_map, message):
    with pytest.raises(DataError, match=message):
        select_labels(load_dataset(small_npz), labels, label_map)


def test_five_class_training_gives_a_five_label_spec_and_model(tmp_path, small_npz):
    train(TrainConfig(data=str(small_npz), out=str(tmp_path), epochs=1, batch_size=10, threads=1, labels=FIVE))
    model, spec, ckpt = load_model(tmp_path / "best.pt")
    assert spec.labels == FIVE and ckpt["model_kwargs"]["num_classes"] == 5
    with torch.no_grad():
        assert model(torch.zeros(2, 1, 48, 48)).shape == (2, 5)
    # Evaluation scores it on the faces of its five classes only, in its own label order.
    from mien.export.evaluate import evaluate_path

    report = evaluate_path(str(tmp_path / "best.pt"), str(small_npz), "public_test", str(tmp_path / "eval"))
    _, val_y = select_labels(load_dataset(small_npz), FIVE).subset("public_test")
    assert report["labels"] == list(FIVE) and report["num_images"] == len(val_y)


def test_ckplus_folders_are_read_with_a_stratified_seeded_split(tmp_path):
    root = _write_ckplus(tmp_path / "ck", per_class=5)
    data = load_dataset(root)
    assert data.label_names == CKPLUS_LABELS and len(data) == 35
    assert data.splits == ["train", "val"]
    _, val_y = data.subset("val")
    assert np.bincount(val_y, minlength=7).tolist() == [1] * 7  # 20% of each class
    assert np.array_equal(load_dataset(root).split, data.split)  # same seed, same split
    assert not np.array_equal(load_dataset(root, split_seed=1).split, data.split)
    sad = data.images[data.labels == CKPLUS_LABELS.index("sad")]
    assert sorted(sad[:, 0, 0].tolist()) == [100, 101, 102, 103, 104]  # the sadness folder, as "sad"


def test_ckplus_split_keeps_each_subject_on_one_side(tmp_path):
    data = load_dataset(_write_ckplus(tmp_path / "ck", per_class=5, subjects=True))
    # subject S10i owns the i-th face of every class; a subject's faces all land in one split
    subject = np.tile(np.arange(5), 7)
    for s in range(5):
        assert len(set(data.split[subject == s].tolist())) == 1
    assert (data.split == "val").sum() == 7  # one subject of five


def test_ckplus_subset_trains_with_fer_names(tmp_path):
    root = _write_ckplus(tmp_path / "ck", per_class=5)
    data = select_labels(load_dataset(root), ("angry", "happy", "surprise"))
    assert data.label_names == ("angry", "happy", "surprise") and len(data) == 15


@pytest.mark.parametrize(
    "make, message",
    [
        (lambda r: _write_ckplus(r, names=("anger",)) and (r / "bored").mkdir(), r"bored: unknown CK\+ emotion folder"),
        (lambda r: _write_ckplus(r, names=("anger",)) and (r / "happy").mkdir(), "happy: no .png/.jpg images"),
        (
            lambda r: (
                _write_ckplus(r, names=("anger",))
                and cv2.imwrite(str(r / "anger" / "zz.png"), np.zeros((64, 64), np.uint8))
            ),
            r"zz.png: size \(64, 64\) differs",
        ),
        (
            lambda r: _write_ckplus(r, names=("anger",)) and (r / "anger" / "x.png").write_bytes(b"no"),
            "x.png: cannot be decoded",
        ),
        (lambda r: _write_ckplus(r, per_class=1, names=("anger", "happy")), "too few to split"),
    ],
)
def test_ckplus_errors_say_what_is_wrong(tmp_path, make, message):
    root = tmp_path / "ck"
    make(root)
    with pytest.raises(DataError, match=message):
        load_dataset(root)


def test_fer_folder_layout_still_dispatches_to_fer(tmp_path):
    folder = tmp_path / "fer" / "train" / "happy"
    folder.mkdir(parents=True)
    cv2.imwrite(str(folder / "a.png"), np.zeros((48, 48), np.uint8))
    data = load_dataset(tmp_path / "fer")
    assert data.label_names == FER2013_LABELS and data.splits == ["train"]


def test_cli_maps_label_and_model_options():
    args = build_parser().parse_args(
        ["train", "--labels", "angry,sad,happy,fear,neutral", "--label-map", "surprise=happy",
         "--model-kwargs", '{"sr_kwargs": {"num_blocks": 16, "features": 128}}', "--freeze-sr"]
    )  # fmt: skip
    assert args.labels == FIVE and args.label_map == {"surprise": "happy"} and args.freeze_sr
    assert args.model_kwargs == {"sr_kwargs": {"num_blocks": 16, "features": 128}}
    for bad in (["--model-kwargs", "{nope"], ["--model-kwargs", "[1]"], ["--label-map", "surprise"]):
        with pytest.raises(SystemExit):
            build_parser().parse_args(["train", *bad])
