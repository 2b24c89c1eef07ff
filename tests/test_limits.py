"""Load limits (service/limits.py): a saturated service answers 503 with Retry-After instead of queueing without
bound, a slow request gets 504, and probes still answer. Inference is held on an event, never timed."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path

import pytest

from mien.service.config import Settings
from mien.service.limits import LoadLimiter
from tests.conftest import WAIT, Gate, make_client, wait_until
from tests.conftest import post_photo as post


@contextmanager
def held_client(model_dir: Path, **settings) -> Iterator[tuple]:
    gate = Gate()
    with make_client(model_dir, **settings) as client, ThreadPoolExecutor(4) as pool:
        gate.hold(client.app)
        try:
            yield client, gate, pool
        finally:
            gate.release.set()


def assert_error(response, status: int, code: str) -> str:
    assert response.status_code == status, response.text
    body = response.json()
    assert set(body) == {"error"} and body["error"]["code"] == code, body
    return body["error"]["message"]


def test_saturated_service_answers_503_with_retry_after_and_probes_still_answer(model_dir, astronaut_jpeg):
    with held_client(model_dir, max_concurrency=1, max_queue=0, retry_after=7) as (client, gate, pool):
        first = pool.submit(post, client, astronaut_jpeg)
        gate.wait_entered()
        busy = post(client, astronaut_jpeg)
        message = assert_error(busy, 503, "busy")
        assert busy.headers["retry-after"] == "7"
        assert "MIEN_MAX_CONCURRENCY=1" in message and "retry in 7 s" in message
        # Probes and metrics are never queued behind inference.
        assert client.get("/health").status_code == 200
        assert client.get("/ready").status_code == 200
        assert 'mien_predict_requests_total{model="mini_xception",status="503"} 1.0' in client.get("/metrics").text
        gate.release.set()
        assert first.result(WAIT).status_code == 200
        assert client.app.state.load_limiter.running == 0
        assert post(client, astronaut_jpeg).status_code == 200


def test_requests_wait_in_the_queue_up_to_its_length(model_dir, astronaut_jpeg):
    with held_client(model_dir, max_concurrency=1, max_queue=2) as (client, gate, pool):
        limiter: LoadLimiter = client.app.state.load_limiter
        running = pool.submit(post, client, astronaut_jpeg)
        gate.wait_entered()
        queued = [pool.submit(post, client, astronaut_jpeg) for _ in range(2)]
        wait_until(lambda: limiter.waiting == 2)
        assert limiter.running == 1
        assert_error(post(client, astronaut_jpeg), 503, "busy")  # one running + two waiting: full
        gate.release.set()
        assert [f.result(WAIT).status_code for f in (running, *queued)] == [200, 200, 200]
        assert (limiter.running, limiter.waiting) == (0, 0)


def test_a_request_over_the_timeout_gets_504_and_its_work_keeps_its_slot(model_dir, astronaut_jpeg):
    with held_client(model_dir, max_concurrency=1, max_queue=1, request_timeout=0.2) as (client, gate, pool):
        limiter: LoadLimiter = client.app.state.load_limiter
        slow = pool.submit(post, client, astronaut_jpeg)
        gate.wait_entered()
        message = assert_error(slow.result(WAIT), 504, "timeout")
        assert "MIEN_REQUEST_TIMEOUT" in message and "0.2 s" in message and "worked on" in message
        # The timed-out work still runs in its worker thread: it keeps the only slot, so the next request waits
        # in the queue and times out there, and is dropped from the queue.
        message = assert_error(post(client, astronaut_jpeg), 504, "timeout")
        assert "waiting for a free slot" in message
        assert (limiter.running, limiter.waiting) == (1, 0)
        gate.release.set()
        wait_until(lambda: limiter.running == 0)
    with make_client(model_dir, request_timeout=60) as client:
        assert post(client, astronaut_jpeg).status_code == 200


def test_limits_come_from_the_environment(monkeypatch):
    for name, value in {"MAX_CONCURRENCY": "3", "MAX_QUEUE": "0", "REQUEST_TIMEOUT": "2.5", "RETRY_AFTER": "4",
                        "MAX_QUERY_BYTES": "1024", "MAX_FACES": "5", "MAX_PIXELS": "1000000",
                        "MAX_UPLOAD_BYTES": "2000000"}.items():  # fmt: skip
        monkeypatch.setenv(f"MIEN_{name}", value)
    settings = Settings()
    assert (settings.max_concurrency, settings.max_queue, settings.request_timeout, settings.retry_after) == (
        3, 0, 2.5, 4)  # fmt: skip
    assert (settings.max_query_bytes, settings.max_faces, settings.max_pixels, settings.max_upload_bytes) == (
        1024, 5, 1_000_000, 2_000_000)  # fmt: skip


@pytest.mark.parametrize("name,value", [("MAX_CONCURRENCY", "0"), ("MAX_QUEUE", "-1"), ("REQUEST_TIMEOUT", "0"),
                                        ("RETRY_AFTER", "0"), ("MAX_QUERY_BYTES", "10")])  # fmt: skip
def test_unsafe_limits_are_refused_at_start_up(monkeypatch, name, value):
    from pydantic import ValidationError

    monkeypatch.setenv(f"MIEN_{name}", value)
    with pytest.raises(ValidationError, match=name.lower()):
        Settings()


def test_limiter_admits_in_order_and_forgets_cancelled_waiters():
    async def scenario() -> list[str]:
        limiter = LoadLimiter(max_concurrency=1, max_queue=3)
        order: list[str] = []
        await limiter.acquire()  # the one slot is taken

        async def waiter(name: str) -> None:
            await limiter.acquire()
            order.append(name)
            limiter.release()

        tasks = {name: asyncio.ensure_future(waiter(name)) for name in ("a", "b", "c")}
        await asyncio.sleep(0)
        assert limiter.waiting == 3 and limiter.full
        tasks["b"].cancel()  # a client that gave up while waiting
        await asyncio.sleep(0)
        assert limiter.waiting == 2 and not limiter.full
        limiter.release()
        await asyncio.gather(tasks["a"], tasks["c"])
        assert (limiter.running, limiter.waiting) == (0, 0)
        return order

    assert asyncio.run(scenario()) == ["a", "c"]
