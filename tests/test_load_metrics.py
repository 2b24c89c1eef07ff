"""The per-pod load gauges an autoscaler reads (service/metrics.py): ``mien_inflight_requests`` and
``mien_queued_requests`` follow the admission limiter through the real app's GET /metrics, and come back to 0
after a success, a client error, a server error, a 503 (busy) and a 504 (timeout, running or queued).

Requests are held inside the /predict route on an event (never timed), served by the bundled mini_xception.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path

import cv2
import pytest
from fastapi.testclient import TestClient
from prometheus_client.parser import text_string_to_metric_families
from skimage import data

from mien.service.config import Settings
from mien.service.deps import get_detectors
from mien.service.main import create_app
from mien.service.metrics import INFLIGHT_METRIC, QUEUED_METRIC

REPO = Path(__file__).resolve().parents[1]
BUNDLED = REPO / "models"
WAIT = 60  # seconds a test waits for a condition before it fails (never reached when the code is right)


def bundled_model_dir(folder: Path, model_id: str = "mini_xception") -> Path:
    """A model folder holding one bundled model (links to models/<id>.onnx and its card): the default model the
    image serves, without loading every bundled model for a test."""
    folder.mkdir(parents=True, exist_ok=True)
    for suffix in (".onnx", ".card.json"):
        (folder / f"{model_id}{suffix}").symlink_to(BUNDLED / f"{model_id}{suffix}")
    return folder


def bundled_client(folder: Path, **overrides) -> TestClient:
    settings = Settings(model_dir=bundled_model_dir(folder), detector_dir=BUNDLED / "detector",
                        providers=("CPUExecutionProvider",), threads=1, **overrides)  # fmt: skip
    return TestClient(create_app(settings), raise_server_exceptions=False)


@pytest.fixture(scope="module")
def photo() -> bytes:
    return cv2.imencode(".jpg", cv2.cvtColor(data.astronaut(), cv2.COLOR_RGB2BGR))[1].tobytes()


class Gate:
    """Holds every /predict inside the route's dependencies until ``open()``; can make the next one fail."""

    def __init__(self) -> None:
        self.release = threading.Event()
        self.entered = threading.Semaphore(0)
        self.fail = False

    def hold(self, app) -> None:
        def held_detectors():
            self.entered.release()
            assert self.release.wait(WAIT), "the test never opened the gate"
            if self.fail:
                raise RuntimeError("a failure inside the route")
            return app.state.detectors

        app.dependency_overrides[get_detectors] = held_detectors

    def wait_entered(self, count: int = 1) -> None:
        for _ in range(count):
            assert self.entered.acquire(timeout=WAIT), "a request never reached the route"


@contextmanager
def held(tmp_path: Path, **settings) -> Iterator[tuple[TestClient, Gate, ThreadPoolExecutor]]:
    gate = Gate()
    with bundled_client(tmp_path / "models", **settings) as client, ThreadPoolExecutor(6) as pool:
        gate.hold(client.app)
        try:
            yield client, gate, pool
        finally:
            gate.release.set()


def load(client: TestClient) -> tuple[float, float]:
    """(in flight, queued) as GET /metrics reports them."""
    response = client.get("/metrics")
    assert response.status_code == 200
    values = {sample.name: sample.value for family in text_string_to_metric_families(response.text)
              for sample in family.samples}  # fmt: skip
    return values[INFLIGHT_METRIC], values[QUEUED_METRIC]


def wait_until(condition) -> None:
    pause = threading.Event()
    for _ in range(WAIT * 100):
        if condition():
            return
        pause.wait(0.01)
    raise AssertionError("condition never became true")


def post(client: TestClient, photo: bytes):
    return client.post("/predict", files={"file": ("a.jpg", photo, "image/jpeg")})


def test_gauges_are_exported_at_zero_by_an_idle_app(tmp_path):
    with bundled_client(tmp_path / "models") as client:
        text = client.get("/metrics").text
        assert f"# TYPE {INFLIGHT_METRIC} gauge" in text and f"# TYPE {QUEUED_METRIC} gauge" in text
        assert load(client) == (0, 0)


def test_gauges_follow_running_and_waiting_requests_and_return_to_zero(tmp_path, photo):
    with held(tmp_path, max_concurrency=2, max_queue=2) as (client, gate, pool):
        limiter = client.app.state.load_limiter
        running = [pool.submit(post, client, photo) for _ in range(2)]
        gate.wait_entered(2)
        assert load(client) == (2, 0)
        queued = [pool.submit(post, client, photo) for _ in range(2)]
        wait_until(lambda: limiter.waiting == 2)
        assert load(client) == (2, 2)
        busy = post(client, photo)  # 2 running + 2 waiting: full
        assert busy.status_code == 503, busy.text
        assert load(client) == (2, 2)  # a refused request never counts
        gate.release.set()
        assert [f.result(WAIT).status_code for f in (*running, *queued)] == [200] * 4
        assert load(client) == (0, 0)


def test_gauges_return_to_zero_after_client_and_server_errors(tmp_path, photo):
    with held(tmp_path, max_concurrency=4, max_queue=0) as (client, gate, pool):
        gate.release.set()
        bad = client.post("/predict", files={"file": ("a.jpg", b"not an image", "image/jpeg")})
        assert bad.status_code == 415, bad.text  # refused by the route, after admission
        assert load(client) == (0, 0)
        gate.release.clear()
        gate.fail = True
        failing = pool.submit(post, client, photo)
        gate.wait_entered()
        assert load(client) == (1, 0)
        gate.release.set()
        assert failing.result(WAIT).status_code == 500
        assert load(client) == (0, 0)


def test_gauges_after_timeouts_count_the_work_still_running_and_drop_the_abandoned_wait(tmp_path, photo):
    with held(tmp_path, max_concurrency=1, max_queue=1, request_timeout=0.2) as (client, gate, pool):
        limiter = client.app.state.load_limiter
        slow = pool.submit(post, client, photo)
        gate.wait_entered()
        assert slow.result(WAIT).status_code == 504
        # Its work cannot be interrupted: it still holds the slot, and the gauge says so.
        assert load(client) == (1, 0)
        # The next one waits, times out in the queue and is dropped from it.
        assert post(client, photo).status_code == 504
        assert load(client) == (1, 0)
        gate.release.set()
        wait_until(lambda: limiter.running == 0)
        assert load(client) == (0, 0)
