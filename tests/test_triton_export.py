"""`mien export triton`: every config.pbtxt parses with Triton's own model_config protobuf and agrees with
the ONNX file it describes (names, dims without the batch axis, data types, batching, GPU instances)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import onnx
import pytest
from google.protobuf import text_format
from onnx import TensorProto, helper

from mien.cli import main
from mien.export.triton import LABELS_FILE, export_triton
from mien.runtime import MODEL_ID_KEY
from mien.spec import PreprocessSpec

model_config_pb2 = pytest.importorskip("tritonclient.grpc.model_config_pb2")

# ONNX element types -> Triton's DataType enum names.
ONNX_TO_TRITON = {TensorProto.FLOAT: "TYPE_FP32", TensorProto.FLOAT16: "TYPE_FP16", TensorProto.INT64: "TYPE_INT64"}


def read_config(path: Path):
    return text_format.Parse(path.read_text(encoding="utf-8"), model_config_pb2.ModelConfig())


def dims_of(value_info) -> list[int]:
    """The ONNX tensor's dims, -1 for a symbolic or unknown one."""
    return [d.dim_value if d.HasField("dim_value") else -1 for d in value_info.type.tensor_type.shape.dim]


def check_against_onnx(config, onnx_path: Path) -> None:
    """The config describes the ONNX file: names, data types, dims without the batch axis, batching."""
    graph = onnx.load(str(onnx_path)).graph
    batched = all(dims_of(v)[0] == -1 for v in (*graph.input, *graph.output))
    assert (config.max_batch_size > 0) == batched
    for tensors, values in ((config.input, graph.input), (config.output, graph.output)):
        assert [t.name for t in tensors] == [v.name for v in values]
        for tensor, value in zip(tensors, values, strict=True):
            assert model_config_pb2.DataType.Name(tensor.data_type) == ONNX_TO_TRITON[value.type.tensor_type.elem_type]
            assert list(tensor.dims) == (dims_of(value)[1:] if batched else dims_of(value))


@pytest.fixture(scope="module")
def source_dir(model_dir: Path, tmp_path_factory) -> Path:
    """The exported model plus what must stay out of a Triton repository: an ensemble and a detector folder."""
    folder = tmp_path_factory.mktemp("triton_models")
    for name in ("mini_xception.onnx", "mini_xception.card.json"):
        shutil.copy(model_dir / name, folder / name)
    (folder / "pair.ensemble.json").write_text(json.dumps({"members": ["mini_xception", "mini_xception"]}))
    (folder / "detector").mkdir()
    shutil.copy(model_dir / "mini_xception.onnx", folder / "detector" / "mtcnn_pnet.onnx")
    return folder


def test_every_config_parses_with_tritons_protobuf_and_matches_the_onnx_file(source_dir: Path, tmp_path: Path):
    result = export_triton(tmp_path / "repo", source_dir, max_batch_size=32)
    assert list(result.exported) == ["mini_xception"] and not result.refused
    assert sorted(p.name for p in (tmp_path / "repo").iterdir()) == ["mini_xception"]  # no ensemble, no detector

    folder = tmp_path / "repo" / "mini_xception"
    model_file = folder / "1" / "model.onnx"
    assert model_file.read_bytes() == (source_dir / "mini_xception.onnx").read_bytes()
    config = read_config(folder / "config.pbtxt")
    assert config.name == "mini_xception" and config.platform == "onnxruntime_onnx"
    assert config.max_batch_size == 32
    assert list(config.dynamic_batching.preferred_batch_size) == [4, 8, 16, 32]
    assert config.dynamic_batching.max_queue_delay_microseconds > 0
    assert [(g.count, g.kind) for g in config.instance_group] == [(1, model_config_pb2.ModelInstanceGroup.KIND_GPU)]
    check_against_onnx(config, model_file)

    # the dims Triton will check requests against are the spec's face tensor
    meta = {p.key: p.value for p in onnx.load(str(model_file)).metadata_props}
    spec = PreprocessSpec.from_metadata(meta)
    assert list(config.input[0].dims) == [spec.channels, *spec.input_size]
    assert list(config.output[0].dims) == [spec.num_classes]
    assert config.output[0].label_filename == LABELS_FILE
    assert (folder / LABELS_FILE).read_text().splitlines() == list(spec.labels)


def test_cli_writes_the_repository(source_dir: Path, tmp_path: Path):
    out = tmp_path / "triton_repo"
    assert main(["export", "triton", "--out", str(out), "--model-dir", str(source_dir), "--max-batch-size", "8"]) == 0
    config = read_config(out / "mini_xception" / "config.pbtxt")
    assert config.max_batch_size == 8
    assert list(config.dynamic_batching.preferred_batch_size) == [4, 8]
    check_against_onnx(config, out / "mini_xception" / "1" / "model.onnx")


def fixed_batch_model(path: Path, model_id: str) -> None:
    """A tiny valid mien classifier whose graph has a fixed batch of 1 (Identity over 7 scores)."""
    x = helper.make_tensor_value_info("scores", TensorProto.FLOAT, [1, 7])
    y = helper.make_tensor_value_info("probs", TensorProto.FLOAT, [1, 7])
    graph = helper.make_graph([helper.make_node("Identity", ["scores"], ["probs"])], "fixed", [x], [y])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    spec = PreprocessSpec(output="probabilities")
    helper.set_model_props(model, {**spec.to_metadata(), MODEL_ID_KEY: model_id})
    onnx.save(model, str(path))


def test_a_graph_without_a_batch_axis_gets_max_batch_size_0(tmp_path: Path):
    src = tmp_path / "models"
    src.mkdir()
    fixed_batch_model(src / "fixed.onnx", "fixed")
    result = export_triton(tmp_path / "repo", src)
    assert list(result.exported) == ["fixed"], result.refused
    config = read_config(tmp_path / "repo" / "fixed" / "config.pbtxt")
    assert config.max_batch_size == 0 and not config.HasField("dynamic_batching")
    assert [list(t.dims) for t in (*config.input, *config.output)] == [[1, 7], [1, 7]]
    check_against_onnx(config, tmp_path / "repo" / "fixed" / "1" / "model.onnx")


def test_unservable_files_are_left_out_and_the_cli_fails(source_dir: Path, tmp_path: Path):
    src = tmp_path / "models"
    shutil.copytree(source_dir, src)
    (src / "broken.onnx").write_bytes(b"not an onnx file")
    result = export_triton(tmp_path / "repo", src)
    assert list(result.exported) == ["mini_xception"] and list(result.refused) == ["broken.onnx"]
    assert main(["export", "triton", "--out", str(tmp_path / "repo2"), "--model-dir", str(src)]) == 1
    with pytest.raises(ValueError, match="max_batch_size"):
        export_triton(tmp_path / "repo3", src, max_batch_size=0)
    with pytest.raises(FileNotFoundError, match="--model-dir"):
        export_triton(tmp_path / "repo4", tmp_path / "missing")
