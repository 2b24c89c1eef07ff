"""The per-pod load gauges an autoscaler reads (service/metrics.py): ``mien_inflight_requests`` and
``mien_queued_requests`` follow the admission limiter through the real app's GET /metrics, and come back to 0
after a success, a client error, a server error, a 503 (busy) and a 504 (timeout, running or queued).

Requests are held inside the /predict route on an event (never timed), served by the bundled mini_xception.
"""

from __future__ import annotations

from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path

from fastapi.testclient import TestClient
from prometheus_client.parser import text_string_to_metric_families

from mien.service.config import Settings
from mien.service.main import create_app
from mien.service.metrics import INFLIGHT_METRIC, QUEUED_METRIC
from tests.conftest import WAIT, Gate, wait_until
from tests.conftest import post_photo as post

REPO = Path(__file__).resolve().parents[1]
BUNDLED = REPO / "models"


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


def test_gauges_are_exported_at_zero_by_an_idle_app(tmp_path):
    with bundled_client(tmp_path / "models") as client:
        text = client.get("/metrics").text
        assert f"# TYPE {INFLIGHT_METRIC} gauge" in text and f"# TYPE {QUEUED_METRIC} gauge" in text
        assert load(client) == (0, 0)


def test_gauges_follow_running_and_waiting_requests_and_return_to_zero(tmp_path, astronaut_jpeg):
    with held(tmp_path, max_concurrency=2, max_queue=2) as (client, gate, pool):
        limiter = client.app.state.load_limiter
        running = [pool.submit(post, client, astronaut_jpeg) for _ in range(2)]
        gate.wait_entered(2)
        assert load(client) == (2, 0)
        queued = [pool.submit(post, client, astronaut_jpeg) for _ in range(2)]
        wait_until(lambda: limiter.waiting == 2)
        assert load(client) == (2, 2)
        busy = post(client, astronaut_jpeg)  # 2 running + 2 waiting: full
        assert busy.status_code == 503, busy.text
        assert load(client) == (2, 2)  # a refused request never counts
        gate.release.set()
        assert [f.result(WAIT).status_code for f in (*running, *queued)] == [200] * 4
        assert load(client) == (0, 0)


def test_gauges_return_to_zero_after_client_and_server_errors(tmp_path, astronaut_jpeg):
    with held(tmp_path, max_concurrency=4, max_queue=0) as (client, gate, pool):
        gate.release.set()
        bad = client.post("/predict", files={"file": ("a.jpg", b"not an image", "image/jpeg")})
        assert bad.status_code == 415, bad.text  # refused by the route, after admission
        assert load(client) == (0, 0)
        gate.release.clear()
        gate.fail = True
        failing = pool.submit(post, client, astronaut_jpeg)
        gate.wait_entered()
        assert load(client) == (1, 0)
        gate.release.set()
        assert failing.result(WAIT).status_code == 500
        assert load(client) == (0, 0)


def test_gauges_after_timeouts_count_the_work_still_running_and_drop_the_abandoned_wait(tmp_path, astronaut_jpeg):
    with held(tmp_path, max_concurrency=1, max_queue=1, request_timeout=0.2) as (client, gate, pool):
        limiter = client.app.state.load_limiter
        slow = pool.submit(post, client, astronaut_jpeg)
        gate.wait_entered()
        assert slow.result(WAIT).status_code == 504
        # Its work cannot be interrupted: it still holds the slot, and the gauge says so.
        assert load(client) == (1, 0)
        # The next one waits, times out in the queue and is dropped from it.
        assert post(client, astronaut_jpeg).status_code == 504
        assert load(client) == (1, 0)
        gate.release.set()
        wait_until(lambda: limiter.running == 0)
        assert load(client) == (0, 0)
