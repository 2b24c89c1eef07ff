"""The Open Inference Protocol (KServe v2) routes against the protocol's documented shapes: server and model
metadata, health, model readiness, inference on preprocessed faces, and every way a request can be wrong."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import onnx
import pytest

from mien import __version__
from mien.preprocess import to_model_input
from mien.runtime import MODEL_ID_KEY, OnnxClassifier
from tests.conftest import CPU, make_client, make_faces

MODEL = "mini_xception"


def error_of(response, status: int) -> dict:
    """The service's one error shape, with the expected 4xx status."""
    assert response.status_code == status, response.text
    body = response.json()
    assert set(body) == {"error"} and set(body["error"]) == {"code", "message"}, body
    assert isinstance(body["error"]["code"], str) and body["error"]["message"], body
    return body["error"]


@pytest.fixture(scope="module")
def onnx_model(model_dir: Path) -> onnx.ModelProto:
    return onnx.load(str(model_dir / f"{MODEL}.onnx"))


@pytest.fixture(scope="module")
def classifier(model_dir: Path) -> OnnxClassifier:
    return OnnxClassifier.from_path(model_dir / f"{MODEL}.onnx", providers=CPU)


@pytest.fixture(scope="module")
def faces(classifier: OnnxClassifier) -> np.ndarray:
    """Three preprocessed faces (N×C×H×W float32), made exactly as the service makes them."""
    images, _ = make_faces(1, np.random.default_rng(5))
    return to_model_input([images[0], images[3], images[6]], classifier.spec)


def infer_body(batch: np.ndarray, name: str = "input", nested: bool = False, **extra) -> dict:
    data = batch.tolist() if nested else batch.ravel().tolist()
    return {"inputs": [{"name": name, "shape": list(batch.shape), "datatype": "FP32", "data": data}], **extra}


@pytest.fixture(scope="module")
def ensemble_client(model_dir: Path, tmp_path_factory):
    """mini_xception, a copy served as `twin`, and the ensemble `pair` of the two."""
    folder = tmp_path_factory.mktemp("v2_ensemble")
    shutil.copy(model_dir / f"{MODEL}.onnx", folder / f"{MODEL}.onnx")
    proto = onnx.load(str(model_dir / f"{MODEL}.onnx"))
    for prop in proto.metadata_props:
        if prop.key == MODEL_ID_KEY:
            prop.value = "twin"
    onnx.save(proto, str(folder / "twin.onnx"))
    (folder / "pair.ensemble.json").write_text(json.dumps({"model_id": "pair", "members": [MODEL, "twin"]}))
    with make_client(folder) as c:
        yield c


# ---------------------------------------------------------------------------------------------------------
# Server metadata and health


def test_server_metadata(client):
    response = client.get("/v2")
    assert response.status_code == 200
    assert response.json() == {"name": "mien", "version": __version__, "extensions": []}


def test_live_and_ready(client):
    assert client.get("/v2/health/live").status_code == 200
    assert client.get("/v2/health/ready").status_code == 200


def test_not_ready_is_a_4xx_in_the_service_error_shape(model_dir: Path, tmp_path: Path):
    with make_client(model_dir, default_model="missing") as c:
        assert c.get("/v2/health/live").status_code == 200
        assert "missing" in error_of(c.get("/v2/health/ready"), 400)["message"]
        assert c.get(f"/v2/models/{MODEL}/ready").status_code == 200  # that model itself is loaded
    with make_client(tmp_path) as c:  # an empty model folder
        assert error_of(c.get("/v2/health/ready"), 400)["code"] == "not_ready"
        assert error_of(c.get(f"/v2/models/{MODEL}"), 404)["code"] == "unknown_model"


# ---------------------------------------------------------------------------------------------------------
# Model metadata


def test_model_metadata_matches_the_onnx_file(client, onnx_model, classifier):
    response = client.get(f"/v2/models/{MODEL}")
    assert response.status_code == 200
    meta = response.json()
    assert meta["name"] == MODEL
    assert meta["platform"] == "onnxruntime_onnx"
    versions = meta["versions"]
    assert versions == [client.get("/models").json()["models"][0]["version"]]

    graph_input, graph_output = onnx_model.graph.input[0], onnx_model.graph.output[0]
    assert graph_input.type.tensor_type.elem_type == onnx.TensorProto.FLOAT
    dims = [d.dim_value if d.HasField("dim_value") else -1 for d in graph_input.type.tensor_type.shape.dim]
    assert meta["inputs"] == [{"name": graph_input.name, "datatype": "FP32", "shape": dims}]
    assert dims[0] == -1 and dims[1:] == [classifier.spec.channels, *classifier.spec.input_size]
    num_out = graph_output.type.tensor_type.shape.dim[-1].dim_value
    assert meta["outputs"] == [{"name": "probabilities", "datatype": "FP32", "shape": [-1, num_out]}]

    assert meta["parameters"]["labels"] == list(classifier.spec.labels)
    assert meta["parameters"]["preprocessing"] == classifier.spec.to_dict()
    assert meta["parameters"]["provider"] == "CPUExecutionProvider"

    assert client.get(f"/v2/models/{MODEL}/versions/{versions[0]}").json() == meta


def test_model_ready(client):
    assert client.get(f"/v2/models/{MODEL}/ready").status_code == 200
    version = client.get(f"/v2/models/{MODEL}").json()["versions"][0]
    assert client.get(f"/v2/models/{MODEL}/versions/{version}/ready").status_code == 200


@pytest.mark.parametrize(
    "path",
    [
        "/v2/models/nope",
        "/v2/models/nope/ready",
        f"/v2/models/{MODEL}/versions/0",
        f"/v2/models/{MODEL}/versions/0/ready",
    ],
)
def test_unknown_model_or_version_is_404(client, path):
    error = error_of(client.get(path), 404)
    assert error["code"] in ("unknown_model", "unknown_model_version")


def test_openapi_documents_the_v2_routes(client):
    paths = client.get("/openapi.json").json()["paths"]
    assert {"/v2", "/v2/health/live", "/v2/health/ready", "/v2/models/{model_id}/infer"} <= set(paths)


# ---------------------------------------------------------------------------------------------------------
# Inference


def test_infer_batch_of_three_equals_the_classifier(client, classifier, faces):
    expected = classifier(faces)
    response = client.post(
        f"/v2/models/{MODEL}/infer", json=infer_body(faces, id="req-1", outputs=[{"name": "probabilities"}])
    )
    assert response.status_code == 200, response.text
    body = response.json()
    assert set(body) == {"model_name", "model_version", "id", "outputs"}
    assert body["model_name"] == MODEL and body["id"] == "req-1"
    assert body["model_version"] == client.get(f"/v2/models/{MODEL}").json()["versions"][0]
    [output] = body["outputs"]
    assert output["name"] == "probabilities" and output["datatype"] == "FP32"
    assert output["shape"] == [3, len(classifier.spec.labels)]
    assert output["parameters"]["labels"] == list(classifier.spec.labels)
    got = np.asarray(output["data"], dtype=np.float32).reshape(output["shape"])
    np.testing.assert_allclose(got, expected, rtol=0, atol=1e-6)
    np.testing.assert_allclose(got.sum(axis=1), 1.0, atol=1e-5)


def test_infer_accepts_nested_data_and_the_versioned_route(client, classifier, faces):
    version = client.get(f"/v2/models/{MODEL}").json()["versions"][0]
    response = client.post(f"/v2/models/{MODEL}/versions/{version}/infer", json=infer_body(faces, nested=True))
    assert response.status_code == 200, response.text
    body = response.json()
    assert "id" not in body
    got = np.asarray(body["outputs"][0]["data"], dtype=np.float32).reshape(3, -1)
    np.testing.assert_allclose(got, classifier(faces), rtol=0, atol=1e-6)


def test_infer_unknown_model_or_version_is_404(client, faces):
    assert error_of(client.post("/v2/models/nope/infer", json=infer_body(faces)), 404)["code"] == "unknown_model"
    error = error_of(client.post(f"/v2/models/{MODEL}/versions/0/infer", json=infer_body(faces)), 404)
    assert error["code"] == "unknown_model_version"


def _one(data, shape=(1, 1, 48, 48), **fields) -> dict:
    return {"inputs": [{"name": "input", "shape": list(shape), "datatype": "FP32", "data": data, **fields}]}


ZEROS = [0.0] * (48 * 48)


@pytest.mark.parametrize(
    "body",
    [
        pytest.param({}, id="no-inputs"),
        pytest.param([1, 2], id="not-an-object"),
        pytest.param({"inputs": []}, id="empty-inputs"),
        pytest.param({"inputs": "x"}, id="inputs-not-a-list"),
        pytest.param({"inputs": [1]}, id="input-not-an-object"),
        pytest.param({"inputs": _one(ZEROS)["inputs"] * 2}, id="two-inputs"),
        pytest.param({"inputs": [{"name": "input", "shape": [1, 1, 48, 48], "datatype": "FP32"}]}, id="no-data"),
        pytest.param({"inputs": [{"name": "input", "datatype": "FP32", "data": ZEROS}]}, id="no-shape"),
        pytest.param({"inputs": [{**_one(ZEROS)["inputs"][0], "name": "pixels"}]}, id="wrong-name"),
        pytest.param({"inputs": [{**_one(ZEROS)["inputs"][0], "datatype": "FP64"}]}, id="datatype-fp64"),
        pytest.param({"inputs": [{**_one(ZEROS)["inputs"][0], "datatype": "fp32"}]}, id="datatype-lowercase"),
        pytest.param({"inputs": [{**_one(ZEROS)["inputs"][0], "datatype": "BYTES"}]}, id="datatype-bytes"),
        pytest.param(_one(ZEROS, shape=(1, 48, 48)), id="shape-rank-3"),
        pytest.param(_one(ZEROS, shape=(1, 3, 48, 48)), id="shape-wrong-channels"),
        pytest.param(_one(ZEROS, shape=(1, 1, 64, 36)), id="shape-wrong-size"),
        pytest.param(_one([], shape=(0, 1, 48, 48)), id="shape-empty-batch"),
        pytest.param(_one(ZEROS, shape=(-1, 1, 48, 48)), id="shape-negative"),
        pytest.param(_one(ZEROS, shape=(1.0, 1, 48, 48)), id="shape-float"),
        pytest.param(_one(ZEROS, shape=(True, 1, 48, 48)), id="shape-bool"),
        pytest.param({"inputs": [{**_one(ZEROS)["inputs"][0], "shape": "1,1,48,48"}]}, id="shape-string"),
        pytest.param(_one(ZEROS[:-1]), id="too-few-values"),
        pytest.param(_one(ZEROS + [0.0]), id="too-many-values"),
        pytest.param(_one(ZEROS, shape=(2, 1, 48, 48)), id="batch-larger-than-data"),
        pytest.param(_one(np.zeros((1, 48, 48, 1)).tolist()), id="nested-wrong-shape"),
        pytest.param(_one([[[ZEROS[:48]] * 47 + [ZEROS[:47]]]]), id="nested-ragged"),
        pytest.param(_one([[[[[0.0]]]]]), id="nested-too-deep"),
        pytest.param(_one(["0.5"] * (48 * 48)), id="strings"),
        pytest.param(_one([True] + ZEROS[1:]), id="bool-value"),
        pytest.param(_one([None] + ZEROS[1:]), id="null-value"),
        pytest.param(_one({"values": ZEROS}), id="data-an-object"),
        pytest.param(_one([1e39] + ZEROS[1:]), id="beyond-float32"),
        pytest.param({**_one(ZEROS), "id": 7}, id="id-not-a-string"),
        pytest.param({**_one(ZEROS), "outputs": [{"name": "logits"}]}, id="unknown-output"),
        pytest.param({**_one(ZEROS), "outputs": {"name": "probabilities"}}, id="outputs-not-a-list"),
        pytest.param(
            {**_one(ZEROS), "outputs": [{"name": "probabilities", "parameters": {"binary_data": True}}]},
            id="binary-output",
        ),
        pytest.param(_one(ZEROS, parameters={"binary_data_size": 9216}), id="binary-input"),
        pytest.param(_one(ZEROS, parameters=[1]), id="parameters-not-an-object"),
    ],
)
def test_bad_infer_requests_are_400(client, body):
    error = error_of(client.post(f"/v2/models/{MODEL}/infer", json=body), 400)
    assert error["code"] == "invalid_infer_request"


@pytest.mark.parametrize(
    "raw",
    [
        pytest.param(b"", id="empty-body"),
        pytest.param(b"{not json", id="invalid-json"),
        pytest.param(b"\xff\xfe\x00", id="not-utf8"),
        pytest.param(b"[" * 100_000 + b"]" * 100_000, id="nesting-beyond-recursion"),
        pytest.param(
            json.dumps(_one(ZEROS)).replace("0.0", "NaN", 1).encode(),
            id="nan",
        ),
        pytest.param(json.dumps(_one(ZEROS)).replace("0.0", "-Infinity", 1).encode(), id="infinity"),
        pytest.param(json.dumps(_one(ZEROS)).replace("0.0", "1" + "0" * 400, 1).encode(), id="huge-integer"),
    ],
)
def test_bad_infer_bodies_are_400(client, raw):
    response = client.post(f"/v2/models/{MODEL}/infer", content=raw, headers={"content-type": "application/json"})
    assert error_of(response, 400)["code"] == "invalid_infer_request"


def test_infer_respects_the_body_size_limit(model_dir: Path, faces):
    with make_client(model_dir, max_upload_bytes=1000) as c:
        small = c.post(f"/v2/models/{MODEL}/infer", json=infer_body(faces[:1]))
        assert small.status_code == 200, small.text  # ~50 kB: within the limit plus the envelope allowance
        big = np.zeros((64, 1, 48, 48), dtype=np.float32)
        assert error_of(c.post(f"/v2/models/{MODEL}/infer", json=infer_body(big)), 413)["code"] == "too_large"


# ---------------------------------------------------------------------------------------------------------
# Ensembles: metadata yes, tensor inference no


def test_ensemble_metadata_and_a_clear_400_for_infer(ensemble_client, faces):
    meta = ensemble_client.get("/v2/models/pair")
    assert meta.status_code == 200, meta.text
    body = meta.json()
    assert body["name"] == "pair" and body["platform"] == "ensemble" and body["inputs"] == []
    assert body["outputs"] == [{"name": "probabilities", "datatype": "FP32", "shape": [-1, 7]}]
    assert body["parameters"]["members"] == [MODEL, "twin"]
    assert error_of(ensemble_client.get("/v2/models/pair/ready"), 400)["code"] == "unsupported_model"
    error = error_of(ensemble_client.post("/v2/models/pair/infer", json=infer_body(faces)), 400)
    assert error["code"] == "unsupported_model" and "/predict" in error["message"]
    # its members still answer
    assert ensemble_client.post("/v2/models/twin/infer", json=infer_body(faces)).status_code == 200
