"""The Open Inference Protocol (KServe v2, as spoken by Triton and KServe) beside /predict.

Routes (REST only, JSON tensors only; no protocol extension is implemented, so ``/v2`` lists none):

- ``GET /v2``: server metadata ``{"name", "version", "extensions"}``.
- ``GET /v2/health/live`` and ``GET /v2/health/ready``: 200 when true. Ready means what ``GET /ready`` means:
  the default model is loaded.
- ``GET /v2/models/{id}[/versions/{version}]``: model metadata ``{"name", "versions", "platform", "inputs",
  "outputs", "parameters"}``. ``inputs`` is the ONNX input as the spec in the model's metadata describes it
  (FP32, ``[-1, C, H, W]``); ``outputs`` is one tensor ``probabilities`` (FP32, ``[-1, labels]``): mien applies
  the softmax when the graph ends in logits. ``parameters`` carries what a client needs to build the input
  tensor: the label names, the preprocessing spec (``pixel = (raw * scale - mean) / std`` on the face crop
  resized to ``input_size``) and the execution provider that really runs.
- ``GET /v2/models/{id}[/versions/{version}]/ready``: 200 when the model can run ``/infer``.
- ``POST /v2/models/{id}[/versions/{version}]/infer``: one input tensor of already-preprocessed faces,
  ``{"id"?, "inputs": [{"name", "shape": [N, C, H, W], "datatype": "FP32", "data": [...]}], "outputs"?}`` with
  ``data`` flat in row-major order or nested to match ``shape``; the answer is ``{"model_name",
  "model_version", "id"?, "outputs": [{"name": "probabilities", "shape": [N, labels], "datatype": "FP32",
  "data": [...], "parameters": {"labels": [...]}}]}`` with ``data`` flat in row-major order.

Ensembles (``models/<id>.ensemble.json``) have metadata here but no tensor input: each member cuts and
normalises the raw face crop its own way, so no single preprocessed tensor is correct for all of them. Their
``inputs`` list is empty, ``/ready`` answers 400 and ``/infer`` answers 400 (use ``POST /predict``).

Errors: the protocol's documents give ``{"error": "<message>"}``; mien answers every error, these routes
included, in its one shape ``{"error": {"code": "<stable code>", "message": "<message>"}}`` with a 4xx status.
One shape keeps the errors that happen before a route runs (the request body limit's 413, unknown routes,
wrong methods) identical to the routes' own, and clients of both APIs read the same ``error`` key. Unknown
model or version: 404. Invalid JSON, a wrong input name, shape, datatype, element count or a non-finite
value: 400. A false health or readiness answer: 400, as the protocol asks for a 4xx. Request bodies are
bounded by the service's body-size limit (``MIEN_MAX_UPLOAD_BYTES`` plus a little), like every request.
"""

from __future__ import annotations

import json
import math
from typing import Any

import numpy as np
from fastapi import APIRouter, Request
from starlette.concurrency import run_in_threadpool

from mien import __version__
from mien.runtime import OnnxClassifier
from mien.schemas import error_responses
from mien.service.deps import OptionalModelsDep, PathModelDep, PathModelVersionDep
from mien.service.exceptions import BadInferRequest, ProtocolNotReady, UnsupportedModel
from mien.service.registry import LoadedModel
from mien.service.security import ApiKey

router = APIRouter(prefix="/v2", tags=["open inference protocol (v2)"])

SERVER_NAME = "mien"
PLATFORM = "onnxruntime_onnx"
ENSEMBLE_PLATFORM = "ensemble"
DATATYPE = "FP32"
OUTPUT_NAME = "probabilities"
# ONNX element types a classifier input may have, as the protocol names them (mien exports float32).
_ONNX_DATATYPES = {"tensor(float)": "FP32", "tensor(float16)": "FP16", "tensor(double)": "FP64"}


def _is_tensor_model(loaded: LoadedModel) -> bool:
    return isinstance(loaded.classifier, OnnxClassifier)


def _input_datatype(classifier: OnnxClassifier) -> str:
    onnx_type = classifier.session.get_inputs()[0].type
    return _ONNX_DATATYPES.get(onnx_type, onnx_type)


def _metadata(loaded: LoadedModel) -> dict[str, Any]:
    spec = loaded.classifier.spec
    height, width = spec.input_size
    inputs: list[dict[str, Any]] = []
    if _is_tensor_model(loaded):
        classifier: OnnxClassifier = loaded.classifier  # type: ignore[assignment]
        inputs = [
            {
                "name": classifier.input_name,
                "datatype": _input_datatype(classifier),
                "shape": [-1, spec.channels, height, width],
            }
        ]
    parameters: dict[str, Any] = {
        "labels": list(spec.labels),
        "preprocessing": spec.to_dict(),
        "provider": loaded.provider,
    }
    if not _is_tensor_model(loaded):
        parameters["members"] = list(getattr(loaded.classifier, "member_ids", []))
    return {
        "name": loaded.model_id,
        "versions": [loaded.version],
        "platform": PLATFORM if _is_tensor_model(loaded) else ENSEMBLE_PLATFORM,
        "inputs": inputs,
        "outputs": [{"name": OUTPUT_NAME, "datatype": DATATYPE, "shape": [-1, spec.num_classes]}],
        "parameters": parameters,
    }


# ---------------------------------------------------------------------------------------------------------
# Parsing an inference request: every check names what is wrong and what was expected.


def _shape(value: Any, expected: list[int]) -> list[int]:
    if not isinstance(value, list) or not all(isinstance(d, int) and not isinstance(d, bool) for d in value):
        raise BadInferRequest(f"input 'shape' must be a list of integers, got {value!r}")
    if len(value) != 4 or value[0] < 1 or value[1:] != expected[1:]:
        raise BadInferRequest(
            f"input shape must be [N, {', '.join(map(str, expected[1:]))}] with N >= 1 (a batch of preprocessed "
            f"faces, NCHW), got {value}"
        )
    return value


def _check_numbers(data: Any, depth: int, max_depth: int) -> None:
    """Every leaf a JSON number (not a bool, string or null), nested no deeper than the shape."""
    if not isinstance(data, list):
        raise BadInferRequest(f"input 'data' must be a (possibly nested) list of numbers, got {type(data).__name__}")
    for item in data:
        if isinstance(item, list):
            if depth + 1 >= max_depth:
                raise BadInferRequest(f"input 'data' is nested deeper than its shape ({max_depth} dimensions)")
            _check_numbers(item, depth + 1, max_depth)
        elif isinstance(item, bool) or not isinstance(item, int | float):
            raise BadInferRequest(f"input 'data' must hold only numbers for datatype {DATATYPE}, found {item!r}")


def _tensor(data: Any, shape: list[int]) -> np.ndarray:
    _check_numbers(data, 0, len(shape))
    try:
        with np.errstate(over="ignore"):  # beyond float32's range becomes inf, refused below
            array = np.asarray(data, dtype=np.float32)
    except (ValueError, OverflowError) as exc:  # ragged nesting; an integer beyond any float
        raise BadInferRequest(f"input 'data' is not a regular array of numbers: {exc}") from None
    expected = math.prod(shape)
    if array.ndim == 1:  # flat, row-major
        if array.size != expected:
            raise BadInferRequest(f"input 'data' has {array.size} values but shape {shape} needs {expected}")
        array = array.reshape(shape)
    elif list(array.shape) != shape:
        raise BadInferRequest(f"nested input 'data' has shape {list(array.shape)} but the declared shape is {shape}")
    if not np.isfinite(array).all():
        raise BadInferRequest("input 'data' holds a non-finite value (NaN or infinity, or beyond float32's range)")
    return np.ascontiguousarray(array)


def _parameters(tensor: dict[str, Any], what: str) -> dict[str, Any]:
    parameters = tensor.get("parameters")
    if parameters is None:
        return {}
    if not isinstance(parameters, dict):
        raise BadInferRequest(f"the {what}'s 'parameters' must be a JSON object, got {parameters!r}")
    return parameters


def _parse_infer(body: bytes, classifier: OnnxClassifier) -> tuple[np.ndarray, str | None]:
    try:
        payload = json.loads(body)
    except (ValueError, RecursionError) as exc:  # UnicodeDecodeError is a ValueError
        raise BadInferRequest(
            f"the request body is not valid JSON: {exc}; v2 inference takes preprocessed face tensors as JSON "
            "(GET /v2/models/<id> describes them); send photos to POST /predict"
        ) from None
    if not isinstance(payload, dict):
        raise BadInferRequest("the request body must be a JSON object with an 'inputs' list")
    request_id = payload.get("id")
    if request_id is not None and not isinstance(request_id, str):
        raise BadInferRequest(f"'id' must be a string, got {request_id!r}")
    inputs = payload.get("inputs")
    if not isinstance(inputs, list) or len(inputs) != 1 or not isinstance(inputs[0], dict):
        raise BadInferRequest(
            f"'inputs' must be a list of exactly one tensor object (the model's input {classifier.input_name!r})"
        )
    tensor = inputs[0]
    missing = [key for key in ("name", "shape", "datatype", "data") if key not in tensor]
    if missing:
        raise BadInferRequest(f"the input tensor lacks {', '.join(missing)} (needs name, shape, datatype, data)")
    if tensor["name"] != classifier.input_name:
        raise BadInferRequest(f"unknown input {tensor['name']!r}; this model's input is {classifier.input_name!r}")
    datatype = _input_datatype(classifier)
    if tensor["datatype"] != datatype:
        raise BadInferRequest(f"input datatype must be {datatype!r}, got {tensor['datatype']!r}")
    if _parameters(tensor, "input").get("binary_data_size") is not None:
        raise BadInferRequest("binary tensor data is not supported here; send 'data' as JSON numbers")
    height, width = classifier.spec.input_size
    shape = _shape(tensor["shape"], [-1, classifier.spec.channels, height, width])
    outputs = payload.get("outputs")
    if outputs is not None:
        if not isinstance(outputs, list) or not all(isinstance(o, dict) for o in outputs):
            raise BadInferRequest('\'outputs\' must be a list of objects such as {"name": "probabilities"}')
        for output in outputs:
            if output.get("name") != OUTPUT_NAME:
                raise BadInferRequest(f"unknown output {output.get('name')!r}; this model's output is {OUTPUT_NAME!r}")
            if _parameters(output, "output").get("binary_data"):
                raise BadInferRequest("binary tensor data is not supported here; outputs are JSON numbers")
    return _tensor(tensor["data"], shape), request_id


def _infer(body: bytes, loaded: LoadedModel) -> dict[str, Any]:
    classifier: OnnxClassifier = loaded.classifier  # type: ignore[assignment]
    batch, request_id = _parse_infer(body, classifier)
    probabilities = np.asarray(classifier(batch), dtype=np.float32)
    response: dict[str, Any] = {"model_name": loaded.model_id, "model_version": loaded.version}
    if request_id is not None:
        response["id"] = request_id
    response["outputs"] = [
        {
            "name": OUTPUT_NAME,
            "shape": list(probabilities.shape),
            "datatype": DATATYPE,
            "data": probabilities.ravel().tolist(),
            "parameters": {"labels": list(classifier.spec.labels)},
        }
    ]
    return response


# ---------------------------------------------------------------------------------------------------------
# Routes


@router.get("", summary="Server metadata")
def server_metadata() -> dict[str, Any]:
    return {"name": SERVER_NAME, "version": __version__, "extensions": []}


@router.get("/health/live", summary="Server live")
def live() -> dict[str, bool]:
    return {"live": True}


@router.get("/health/ready", summary="Server ready (the default model is loaded)", responses=error_responses(400))
def ready(models: OptionalModelsDep) -> dict[str, bool]:
    if models is None:
        raise ProtocolNotReady("models are not loaded yet; retry in a moment")
    if not models.ready:
        raise ProtocolNotReady(models.not_ready_reason())
    return {"ready": True}


@router.get("/models/{model_id}", summary="Model metadata", responses=error_responses(404))
def model_metadata(loaded: PathModelDep) -> dict[str, Any]:
    return _metadata(loaded)


@router.get("/models/{model_id}/versions/{version}", summary="Model metadata", responses=error_responses(404))
def model_version_metadata(loaded: PathModelVersionDep) -> dict[str, Any]:
    return _metadata(loaded)


def _tensor_model(loaded: LoadedModel) -> LoadedModel:
    """The model itself when it takes tensors; UnsupportedModel for an ensemble."""
    if not _is_tensor_model(loaded):
        raise UnsupportedModel(loaded.model_id)
    return loaded


@router.get("/models/{model_id}/ready", summary="Model ready", responses=error_responses(400, 404))
def model_ready(loaded: PathModelDep) -> dict[str, Any]:
    return {"name": _tensor_model(loaded).model_id, "ready": True}


@router.get("/models/{model_id}/versions/{version}/ready", summary="Model ready", responses=error_responses(400, 404))
def model_version_ready(loaded: PathModelVersionDep) -> dict[str, Any]:
    return {"name": _tensor_model(loaded).model_id, "ready": True}


async def _infer_route(request: Request, loaded: LoadedModel) -> dict[str, Any]:
    _tensor_model(loaded)
    body = await request.body()  # bounded by the app's body-size limit middleware
    # JSON decoding and inference are CPU work: off the event loop.
    return await run_in_threadpool(_infer, body, loaded)


_INFER_DOC = {
    "summary": "Inference on a batch of preprocessed face tensors",
    "responses": error_responses(400, 401, 404, 413, 414, 503, 504),
    "dependencies": [ApiKey],
    "openapi_extra": {
        "requestBody": {
            "required": True,
            "content": {
                "application/json": {
                    "example": {
                        "id": "42",
                        "inputs": [{"name": "input", "shape": [1, 1, 48, 48], "datatype": "FP32", "data": [0.0]}],
                        "outputs": [{"name": OUTPUT_NAME}],
                    }
                }
            },
        }
    },
}


@router.post("/models/{model_id}/infer", **_INFER_DOC)
async def infer(request: Request, loaded: PathModelDep) -> dict[str, Any]:
    return await _infer_route(request, loaded)


@router.post("/models/{model_id}/versions/{version}/infer", **_INFER_DOC)
async def infer_version(request: Request, loaded: PathModelVersionDep) -> dict[str, Any]:
    return await _infer_route(request, loaded)
