"""onnxruntime session options (mien.runtime.SessionConfig), the IO-binding path, warm-up at start-up, and the
bound on ONNX face detections running at once."""

from __future__ import annotations

import os
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest

from mien import runtime
from mien.runtime import OnnxClassifier, SessionConfig, make_session, run_io_bound
from mien.service.config import Settings
from mien.service.detectors.mtcnn import MtcnnDetector
from mien.service.registry import ModelRegistry
from tests.conftest import make_client

CPU = ("CPUExecutionProvider",)
MINI = Path(__file__).resolve().parents[1] / "models" / "mini_xception.onnx"
BUNDLED_DETECTOR = MINI.parent / "detector"


def test_session_options_are_the_ones_asked_for():
    config = SessionConfig(intra_op_threads=2, inter_op_threads=1, optimization="extended", spinning=False)
    options = make_session(MINI, CPU, config).get_session_options()
    assert options.intra_op_num_threads == 2 and options.inter_op_num_threads == 1
    assert options.graph_optimization_level == ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
    assert options.execution_mode == ort.ExecutionMode.ORT_SEQUENTIAL
    assert options.enable_mem_pattern and options.enable_cpu_mem_arena
    assert options.get_session_config_entry("session.intra_op.allow_spinning") == "0"


def test_a_provider_that_does_not_load_is_tried_once_per_process(monkeypatch, caplog):
    """onnxruntime-gpu offers CUDA where its libraries are missing, falls back to CPU and prints its loading
    errors on every try: the first session tries and warns, later ones ask for CPU directly."""
    asked = []

    class FallingBack:  # an InferenceSession that cannot load CUDA, as on this CPU-only machine
        def __init__(self, path, sess_options=None, providers=()):
            asked.append(list(providers))

        def get_providers(self):
            return ["CPUExecutionProvider"]

    monkeypatch.setattr(runtime, "_UNLOADABLE", set())
    monkeypatch.setattr(ort, "get_available_providers", lambda: ["CUDAExecutionProvider", "CPUExecutionProvider"])
    monkeypatch.setattr(ort, "InferenceSession", FallingBack)
    with caplog.at_level("WARNING", logger="mien.runtime"):
        for _ in range(3):
            assert make_session(MINI).get_providers() == ["CPUExecutionProvider"]
    assert asked == [["CUDAExecutionProvider", "CPUExecutionProvider"], *[["CPUExecutionProvider"]] * 2]
    (warning,) = [r.getMessage() for r in caplog.records if "could not load" in r.getMessage()]
    assert "CUDAExecutionProvider" in warning and "every later session" in warning


def test_a_provider_that_loads_is_asked_for_every_time(monkeypatch):
    asked = []

    class Loading:
        def __init__(self, path, sess_options=None, providers=()):
            asked.append(list(providers))

        def get_providers(self):
            return asked[-1]

    monkeypatch.setattr(runtime, "_UNLOADABLE", set())
    monkeypatch.setattr(ort, "get_available_providers", lambda: ["CUDAExecutionProvider", "CPUExecutionProvider"])
    monkeypatch.setattr(ort, "InferenceSession", Loading)
    for _ in range(2):
        make_session(MINI)
    assert asked == [["CUDAExecutionProvider", "CPUExecutionProvider"]] * 2 and not runtime._UNLOADABLE


def test_a_thread_count_alone_still_works_and_means_intra_op_threads():
    options = make_session(MINI, CPU, 1).get_session_options()
    assert options.intra_op_num_threads == 1
    assert options.graph_optimization_level == ort.GraphOptimizationLevel.ORT_ENABLE_ALL


def test_unknown_optimisation_level_is_refused():
    with pytest.raises(ValueError, match="optimization must be one of"):
        SessionConfig(optimization="turbo")


def test_settings_reach_every_session(model_dir):
    settings = Settings(threads=1, inter_op_threads=2, graph_optimization="basic", ort_spinning=True)
    assert settings.session_config() == SessionConfig(1, 2, "basic", True)
    with make_client(model_dir, threads=1, graph_optimization="basic", ort_spinning=True) as client:
        session = client.app.state.models.get("mini_xception").classifier.session
        detectors = client.app.state.detectors
        every = (session, detectors["yunet"].session, detectors["mtcnn"].pnet, detectors["mtcnn"].onet)
        for options in (one.get_session_options() for one in every):
            assert options.intra_op_num_threads == 1
            assert options.graph_optimization_level == ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
            assert options.get_session_config_entry("session.intra_op.allow_spinning") == "1"


# --- IO binding: the CUDA path, exercised on the CPU provider ---------------------------------------


def test_io_binding_gives_the_plain_run_result_on_cpu(monkeypatch):
    session = make_session(MINI, CPU)
    bound = OnnxClassifier(session, io_binding=True)
    plain = OnnxClassifier(session, io_binding=False)
    runs = []
    original = session.run_with_iobinding
    monkeypatch.setattr(
        session, "run_with_iobinding", lambda binding, *a: runs.append(binding) or original(binding, *a)
    )
    batch = np.random.default_rng(0).normal(size=(5, 1, 48, 48)).astype(np.float32)
    assert np.array_equal(bound(batch), plain(batch))
    assert len(runs) == 1  # the bound classifier really went through IO binding, the plain one did not
    assert bound.io_device == "cpu"
    raw = run_io_bound(session, bound.input_name, bound.output_name, batch, "cpu")
    assert np.array_equal(raw, session.run(None, {bound.input_name: batch})[0])


def test_io_binding_is_chosen_for_cuda_sessions_only(monkeypatch):
    session = make_session(MINI, CPU)
    assert OnnxClassifier(session).io_binding is False  # CPU: plain run
    monkeypatch.setattr(session, "get_providers", lambda: ["CUDAExecutionProvider", "CPUExecutionProvider"])
    monkeypatch.setattr(session, "get_provider_options", lambda: {"CUDAExecutionProvider": {"device_id": "1"}})
    cuda = OnnxClassifier(session)
    assert cuda.io_binding is True and (cuda.io_device, cuda.io_device_id) == ("cuda", 1)


# --- warm-up --------------------------------------------------------------------------------------


def test_start_up_warms_every_model_and_the_detector_before_any_request(model_dir, monkeypatch):
    batches: list[tuple[str, int]] = []
    original_call = OnnxClassifier.__call__

    def spy(self, batch):
        batches.append((self.model_id, len(batch)))
        return original_call(self, batch)

    detector_warmups = []
    original_warm = MtcnnDetector.warm_up
    monkeypatch.setattr(OnnxClassifier, "__call__", spy)
    monkeypatch.setattr(MtcnnDetector, "warm_up", lambda self: detector_warmups.append(self) or original_warm(self))
    with make_client(model_dir, batch_max_size=8) as client:
        # Nothing has been posted: this run is the warm-up's, one face.
        assert batches == [("mini_xception", 1)]
        assert len(detector_warmups) == 1
        models = client.app.state.models
        assert models.warm and set(models.warmup_ms) == {"mini_xception"}
        assert client.get("/ready").status_code == 200


def test_ready_waits_for_the_warm_up(model_dir, monkeypatch):
    monkeypatch.setattr(ModelRegistry, "warm_up", lambda self, sizes=(1,): {})  # a warm-up that never finishes
    with make_client(model_dir) as client:
        response = client.get("/ready")
        assert response.status_code == 503
        assert "warming up" in response.json()["error"]["message"]


def test_registry_is_ready_only_once_warm(model_dir):
    registry = ModelRegistry.load(model_dir, "mini_xception", CPU)
    assert not registry.ready and "warming up" in registry.not_ready_reason()
    assert set(registry.warm_up()) == {"mini_xception"}
    assert registry.ready


# --- detections at once ---------------------------------------------------------------------------


class GatedSession:
    """Wraps P-Net's session: counts the runs in progress and holds them until ``release`` is set."""

    def __init__(self, session: ort.InferenceSession) -> None:
        self.session = session
        self.lock = threading.Lock()
        self.release = threading.Event()
        self.active = 0
        self.most = 0

    def run(self, *args, **kwargs):
        with self.lock:
            self.active += 1
            self.most = max(self.most, self.active)
        try:
            self.release.wait()
            return self.session.run(*args, **kwargs)
        finally:
            with self.lock:
                self.active -= 1


def test_onnx_detections_at_once_are_bounded():
    detector = MtcnnDetector.from_dir(BUNDLED_DETECTOR, CPU, 1, max_concurrent=2)
    gate = GatedSession(detector.pnet)
    detector.pnet = gate
    image = np.full((96, 96, 3), 128, np.uint8)
    with ThreadPoolExecutor(6) as pool:
        futures = [pool.submit(detector.detect, image) for _ in range(6)]
        for _ in range(6000):  # wait (a guard against hanging, not a timing assertion) for two runs to be in
            if gate.active == 2:
                break
            threading.Event().wait(0.01)
        gate.release.set()
        assert all(len(f.result()) == 0 for f in futures)  # a flat grey square has no face
    assert gate.most == 2  # two ran together, never more


def test_detect_concurrency_setting_reaches_the_detector(model_dir):
    assert Settings(detect_concurrency=0).detect_slots() == (os.cpu_count() or 1)
    with make_client(model_dir, detect_concurrency=3) as client:
        assert (
            client.app.state.detectors["yunet"].max_concurrent
            == client.app.state.detectors["mtcnn"].max_concurrent
            == 3
        )
