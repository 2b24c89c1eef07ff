"""Ten-crop test-time averaging exported around a network whose input is the crop itself (dcnn: 42×42 views of the
48×48 face, the seed paper's test protocol): the file takes the 48×48 face and averages the network's logits over
its ten views, scores what training's `val_acc_tencrop` measured, and can be rebuilt by `mien recover`."""

from __future__ import annotations

import json

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from mien.export.evaluate import eval_split, evaluate_path
from mien.export.onnx_export import ExportConfig, export_checkpoint, graph_spec
from mien.export.recover import recover
from mien.preprocess import to_model_input
from mien.spec import PreprocessSpec
from mien.training.checkpoint import load_model
from mien.training.config import TrainConfig
from mien.training.tencrop import ten_crop_logits
from mien.training.train import train


@pytest.fixture(scope="module")
def dcnn_files(tmp_path_factory, tiny_npz):
    run, models = tmp_path_factory.mktemp("dcnn_run"), tmp_path_factory.mktemp("dcnn_models")
    train(TrainConfig(data=str(tiny_npz), out=str(run), model="dcnn", epochs=2, batch_size=32, lr=0.05,
                      optimizer="sgd", warmup_epochs=1, ema=0.9, threads=1,
                      model_kwargs={"widths": [8, 16, 32], "hidden": 32}))  # fmt: skip
    path = models / "dcnn_tc.onnx"
    assert export_checkpoint(ExportConfig(checkpoint=str(run / "best.pt"), out=str(path), data=str(tiny_npz),
                                          parity_faces=256, ten_crop=42, model_id="dcnn_tc")).passed  # fmt: skip
    return run / "best.pt", path


def test_the_file_takes_the_whole_face_and_averages_the_ten_views(dcnn_files, tiny_npz):
    best, path = dcnn_files
    network, network_spec, _ = load_model(best)
    card = json.loads(path.with_suffix(".card.json").read_text())
    spec = PreprocessSpec.from_dict(card["spec"])
    assert network_spec.input_size == (42, 42) and spec.input_size == (48, 48)
    # framed like a FER2013 face: its central 42×42 is the network's own framing (margin 0.025 at 42 px)
    assert spec.crop_margin == pytest.approx(0.1) and (1 + 2 * spec.crop_margin) * 42 / 48 == pytest.approx(1.05)
    assert card["export"]["network_spec"] == network_spec.to_dict() and card["export"]["ten_crop"] == 42
    dims = onnx.load(path).graph.input[0].type.tensor_type.shape.dim
    assert [d.dim_value for d in dims[1:]] == [1, 48, 48]

    faces = eval_split(tiny_npz, "val", spec.labels)
    x = to_model_input(list(faces.images[:20]), spec)
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    got = session.run(None, {session.get_inputs()[0].name: x})[0]
    expected = ten_crop_logits(network.eval(), torch.from_numpy(x), 42).numpy()
    np.testing.assert_allclose(got, expected, atol=1e-4)
    one_view = network(torch.nn.functional.interpolate(torch.from_numpy(x), size=(42, 42), mode="bilinear"))
    assert not np.allclose(got, one_view.detach().numpy(), atol=1e-3)  # not the single view: ten of them


def test_the_file_scores_what_training_measured_with_ten_crops(dcnn_files, tiny_npz, tmp_path):
    best, path = dcnn_files
    metrics = load_model(best)[2]["metrics"]
    report = evaluate_path(str(path), str(tiny_npz), "val", str(tmp_path / "eval"))
    assert report["accuracy"] == pytest.approx(metrics["val_acc_tencrop"], abs=1.5 / report["num_images"])


def test_recover_rebuilds_the_crop_sized_network_from_the_ten_crop_file(dcnn_files, tiny_npz, tmp_path):
    best, path = dcnn_files
    out = tmp_path / "again" / "best.pt"
    parity = recover(path, out, tiny_npz)
    assert parity.passed and parity.argmax_agreement == 1.0
    rebuilt, rebuilt_spec, ckpt = load_model(out)
    original, spec, _ = load_model(best)
    assert rebuilt_spec == spec and ckpt["recovered_from"]["test_time_augmentation"] == "ten_crop_42"
    x = torch.from_numpy(np.random.default_rng(0).normal(size=(4, 1, 42, 42)).astype(np.float32))
    with torch.no_grad():
        torch.testing.assert_close(rebuilt.eval()(x), original.eval()(x), atol=1e-4, rtol=1e-4)


def test_graph_spec_keeps_a_larger_input_and_refuses_a_crop_that_does_not_fit():
    vgg = PreprocessSpec(input_size=(48, 48), channels=1, mean=(0.5,), std=(0.5,))
    assert graph_spec(vgg, 40) == vgg and graph_spec(vgg, 0) == vgg  # crops cut from the network's own input
    dcnn = PreprocessSpec(input_size=(42, 42), channels=1, mean=(0.5,), std=(0.5,), crop_margin=0.025)
    assert graph_spec(dcnn, 0) == dcnn and graph_spec(dcnn, 30) == dcnn
    assert graph_spec(dcnn, 42).input_size == (48, 48)
    with pytest.raises(ValueError, match="--ten-crop 44"):
        graph_spec(dcnn, 44)
    with pytest.raises(ValueError, match="--ten-crop 48"):
        graph_spec(vgg, 48)
