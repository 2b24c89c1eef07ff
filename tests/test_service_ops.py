"""Operating the service: /models, /health, /ready, /metrics, model loading and refusal, start-up wiring."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import cv2
import onnx
import pytest
from fastapi.testclient import TestClient
from prometheus_client.parser import text_string_to_metric_families
from skimage import data

from mien.service.config import Settings
from mien.service.main import create_app
from mien.spec import METADATA_KEY, PreprocessSpec
from tests.conftest import make_client


def astronaut_bytes() -> bytes:
    return cv2.imencode(".jpg", cv2.cvtColor(data.astronaut(), cv2.COLOR_RGB2BGR))[1].tobytes()


def copy_model(model_dir: Path, dest: Path, name: str = "mini_xception", card: bool = True) -> Path:
    dest.mkdir(parents=True, exist_ok=True)
    target = dest / f"{name}.onnx"
    shutil.copy(model_dir / "mini_xception.onnx", target)
    if card:
        shutil.copy(model_dir / "mini_xception.card.json", dest / f"{name}.card.json")
    return target


def write_without_spec(model_dir: Path, dest: Path) -> Path:
    """The fixture model with its metadata cleared: what a plain torch.onnx.export would give."""
    model = onnx.load(str(model_dir / "mini_xception.onnx"))
    del model.metadata_props[:]
    target = dest / "nospec.onnx"
    onnx.save(model, str(target))
    return target


def sample(metrics_text: str, name: str, **labels: str) -> float:
    for family in text_string_to_metric_families(metrics_text):
        for s in family.samples:
            if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()):
                return s.value
    return 0.0


# --- /models, /health, /ready -------------------------------------------------------------------


def test_models_reports_spec_card_accuracy_provider_and_default(client, model_dir):
    body = client.get("/models").json()
    card = json.loads((model_dir / "mini_xception.card.json").read_text())
    assert body["default"] == "mini_xception"
    (info,) = body["models"]
    assert info["id"] == "mini_xception"
    assert info["version"] == str(card["version"])
    assert info["labels"] == list(PreprocessSpec.from_dict(info["input"]).labels)
    assert len(info["labels"]) == 7
    assert info["accuracy"] == pytest.approx(card["metrics"]["accuracy"])
    assert info["accuracy_split"] == card["metrics"]["split"]
    assert info["provider"] == "CPUExecutionProvider"
    assert info["default"] is True


def test_health_and_ready(client):
    assert client.get("/health").json() == {"status": "ok"}
    ready = client.get("/ready")
    assert ready.status_code == 200
    assert ready.json()["models"] == ["mini_xception"]
    assert ready.json()["providers"] == {"mini_xception": "CPUExecutionProvider"}  # CPU: what the client asked for
    assert ready.json()["refused"] == {}


def test_empty_model_dir_is_alive_but_not_ready(tmp_path):
    with make_client(tmp_path) as c:
        assert c.get("/health").status_code == 200
        response = c.get("/ready")
        assert response.status_code == 503
        assert response.json()["error"]["code"] == "not_ready"
        assert str(tmp_path) in response.json()["error"]["message"]
        predict = c.post("/predict", files={"file": ("a.jpg", astronaut_bytes(), "image/jpeg")})
        assert predict.status_code == 503
        assert c.get("/models").json()["models"] == []


def test_missing_model_dir_is_not_ready(tmp_path):
    with make_client(tmp_path / "does-not-exist") as c:
        assert c.get("/health").status_code == 200
        assert c.get("/ready").status_code == 503


def test_default_model_not_loaded_is_not_ready(model_dir):
    with make_client(model_dir, default_model="stn_cnn") as c:
        response = c.get("/ready")
        assert response.status_code == 503
        assert "stn_cnn" in response.json()["error"]["message"]
        assert "mini_xception" in response.json()["error"]["message"]
        # Models that did load still serve requests that name them.
        named = c.post("/predict?model=mini_xception", files={"file": ("a.jpg", astronaut_bytes(), "image/jpeg")})
        assert named.status_code == 200
        unnamed = c.post("/predict", files={"file": ("a.jpg", astronaut_bytes(), "image/jpeg")})
        assert unnamed.status_code == 404


# --- model loading ------------------------------------------------------------------------------


def test_model_without_spec_is_refused_and_the_others_served(model_dir, tmp_path, caplog):
    copy_model(model_dir, tmp_path)
    write_without_spec(model_dir, tmp_path)
    with caplog.at_level("ERROR", logger="mien.service.registry"), make_client(tmp_path) as c:
        assert [m["id"] for m in c.get("/models").json()["models"]] == ["mini_xception"]
        ready = c.get("/ready").json()
        assert METADATA_KEY in ready["refused"]["nospec.onnx"]
    assert any("nospec.onnx" in r.getMessage() and METADATA_KEY in r.getMessage() for r in caplog.records)


def test_only_a_model_without_spec_means_not_ready(model_dir, tmp_path):
    write_without_spec(model_dir, tmp_path)
    with make_client(tmp_path) as c:
        response = c.get("/ready")
        assert response.status_code == 503
        assert "nospec.onnx" in response.json()["error"]["message"]


def test_file_that_is_not_onnx_is_refused(tmp_path):
    (tmp_path / "broken.onnx").write_bytes(b"not a model")
    with make_client(tmp_path) as c:
        assert c.get("/ready").status_code == 503
        assert c.get("/health").status_code == 200


def test_every_model_in_the_folder_is_served_and_card_is_optional(model_dir, tmp_path):
    copy_model(model_dir, tmp_path)
    # Same file under another name: export metadata says mini_xception, so the id is a duplicate.
    copy_model(model_dir, tmp_path, name="copy", card=False)
    with make_client(tmp_path) as c:
        assert "duplicate" in c.get("/ready").json()["refused"]["copy.onnx"]
    # A model whose metadata names no id is served under its file name; without a card accuracy is null.
    model = onnx.load(str(model_dir / "mini_xception.onnx"))
    kept = [(p.key, p.value) for p in model.metadata_props if p.key == METADATA_KEY]
    del model.metadata_props[:]
    for key, value in kept:
        model.metadata_props.add(key=key, value=value)
    onnx.save(model, str(tmp_path / "plain.onnx"))
    with make_client(tmp_path) as c:
        models = {m["id"]: m for m in c.get("/models").json()["models"]}
        assert set(models) == {"mini_xception", "plain"}
        assert models["plain"]["accuracy"] is None and models["plain"]["accuracy_split"] is None
        assert models["plain"]["default"] is False
        response = c.post("/predict?model=plain", files={"file": ("a.jpg", astronaut_bytes(), "image/jpeg")})
        assert response.status_code == 200 and response.json()["model"] == "plain"


@pytest.mark.parametrize("text", ["{not json", "[1, 2]", '{"metrics": {"accuracy": "high"}}'])
def test_an_invalid_card_is_ignored_with_a_warning_and_the_model_served(model_dir, tmp_path, caplog, text):
    copy_model(model_dir, tmp_path, card=False)
    (tmp_path / "mini_xception.card.json").write_text(text)
    with caplog.at_level("WARNING", logger="mien.service.registry"), make_client(tmp_path) as c:
        (info,) = c.get("/models").json()["models"]
        assert info["id"] == "mini_xception" and info["accuracy"] is None
    assert "ignoring model card" in caplog.text


def test_default_providers_fall_back_and_report_what_runs(model_dir):
    """CUDA is asked for first; on a machine without a usable GPU the session runs on CPU and says so."""
    import onnxruntime as ort

    with make_client(model_dir, providers=Settings().providers) as c:
        provider = c.get("/models").json()["models"][0]["provider"]
        session = c.app.state.models.get("mini_xception").classifier.session
        assert provider == session.get_providers()[0]
        assert provider in ("CUDAExecutionProvider", "CPUExecutionProvider")
        assert provider in ort.get_available_providers()


# --- /metrics -----------------------------------------------------------------------------------


def test_metrics_names_and_counts_increase(client):
    before = client.get("/metrics")
    assert before.headers["content-type"].startswith("text/plain")
    for name in ("mien_predict_requests_total", "mien_predict_duration_seconds", "mien_faces_per_image",
                 "mien_batch_size", "mien_model_info", "mien_stage_duration_seconds"):  # fmt: skip
        assert name in before.text
    info = sample(before.text, "mien_model_info", model="mini_xception", provider="CPUExecutionProvider")
    assert info == 1.0

    ok_before = sample(before.text, "mien_predict_requests_total", model="mini_xception", status="200")
    faces_before = sample(before.text, "mien_faces_per_image_sum", model="mini_xception")
    assert client.post("/predict", files={"file": ("a.jpg", astronaut_bytes(), "image/jpeg")}).status_code == 200
    assert client.post("/predict?model=nope", files={"file": ("a.jpg", b"x", "image/jpeg")}).status_code == 404
    after = client.get("/metrics").text
    assert sample(after, "mien_predict_requests_total", model="mini_xception", status="200") == ok_before + 1
    assert sample(after, "mien_predict_requests_total", model="unknown", status="404") >= 1
    assert sample(after, "mien_faces_per_image_sum", model="mini_xception") == faces_before + 1
    assert sample(after, "mien_predict_duration_seconds_count", model="mini_xception") >= ok_before + 1


def test_apps_do_not_share_metrics(model_dir):
    with make_client(model_dir) as a, make_client(model_dir) as b:
        a.post("/predict", files={"file": ("a.jpg", astronaut_bytes(), "image/jpeg")})
        assert sample(a.get("/metrics").text, "mien_predict_requests_total", model="mini_xception", status="200") == 1
        assert sample(b.get("/metrics").text, "mien_predict_requests_total", model="mini_xception", status="200") == 0


# --- wiring -------------------------------------------------------------------------------------


def test_create_app_without_arguments_reads_the_environment(model_dir, monkeypatch):
    monkeypatch.setenv("MIEN_MODEL_DIR", str(model_dir))
    monkeypatch.setenv("MIEN_PROVIDERS", "cpu")
    monkeypatch.setenv("MIEN_MAX_FACES", "3")
    with TestClient(create_app()) as c:
        assert c.app.state.settings.max_faces == 3
        assert c.get("/ready").status_code == 200


def test_mien_serve_builds_the_app_from_flags(model_dir, monkeypatch):
    import uvicorn

    from mien.cli import main

    calls = {}
    monkeypatch.setattr(uvicorn, "run", lambda app, **kwargs: calls.update(app=app, **kwargs))
    monkeypatch.setenv("MIEN_PROVIDERS", "cpu")
    assert main(["serve", "--model-dir", str(model_dir), "--port", "8123"]) == 0
    assert calls["host"] == "127.0.0.1" and calls["port"] == 8123
    with TestClient(calls["app"]) as c:
        assert c.get("/ready").json()["models"] == ["mini_xception"]


def test_service_never_imports_torch_or_training(model_dir):
    code = (
        "import sys\n"
        "from fastapi.testclient import TestClient\n"
        "from mien.service.config import Settings\n"
        "from mien.service.main import create_app\n"
        f"with TestClient(create_app(Settings(model_dir={str(model_dir)!r}, providers='cpu'))) as c:\n"
        "    assert c.get('/ready').status_code == 200\n"
        "parts = ('mien.training', 'mien.export')\n"
        "bad = sorted(m for m in sys.modules if m.split('.')[0] == 'torch' or '.'.join(m.split('.')[:2]) in parts)\n"
        "assert not bad, bad\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]


def test_openapi_documents_the_error_shape(client):
    schema = client.get("/openapi.json").json()
    predict = schema["paths"]["/predict"]["post"]
    for status in ("400", "404", "413", "415", "503"):
        assert predict["responses"][status]["content"]["application/json"]["schema"]["$ref"].endswith("ErrorResponse")
    assert {"/models", "/health", "/ready", "/metrics"} <= set(schema["paths"])
