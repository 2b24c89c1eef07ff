"""mien.client against the real app: the sync client through Starlette's TestClient (an httpx.Client), the async
one through httpx.ASGITransport; retries on 503 busy forced on the real admission limiter; errors, API keys,
image arrays; analyze_video with short generated videos, sync and async."""

from __future__ import annotations

import asyncio
from pathlib import Path

import cv2
import httpx
import numpy as np
import pytest
from skimage import data

from mien.client import API_KEY_HEADER, AsyncMienClient, MienClient, MienError, error_of, retry_after_seconds
from mien.schemas import (
    BatchResponse,
    HealthResponse,
    ModelsResponse,
    PredictResponse,
    ReadyResponse,
    VideoAnalysisResponse,
)
from mien.service.config import Settings
from mien.service.main import create_app
from mien.service.security import API_KEY_HEADER as SERVICE_KEY_HEADER
from tests.conftest import CPU, make_client

KEY = "client-test-key-0123456789"
GARBAGE = np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8).tobytes()


def astronaut_bgr() -> np.ndarray:
    return cv2.cvtColor(data.astronaut(), cv2.COLOR_RGB2BGR)


def astronaut_jpeg() -> bytes:
    return cv2.imencode(".jpg", astronaut_bgr())[1].tobytes()


@pytest.fixture(scope="module")
def app_client(model_dir):
    with make_client(model_dir) as tc:
        yield tc


@pytest.fixture()
def mien(app_client):
    with MienClient(client=app_client) as c:
        yield c


def without_timings(result: PredictResponse) -> dict:
    return result.model_dump(exclude={"timings_ms"})


# --- the sync client on the real app -------------------------------------------------------------


def test_predict_takes_a_path_a_str_bytes_or_an_array_and_answers_the_services_schema(mien, tmp_path):
    photo = tmp_path / "astronaut.jpg"
    photo.write_bytes(astronaut_jpeg())
    answers = [mien.predict(photo), mien.predict(str(photo)), mien.predict(astronaut_jpeg())]
    for result in answers:
        assert isinstance(result, PredictResponse) and result.model == "mini_xception"
        assert len(result.faces) == 1
    assert without_timings(answers[0]) == without_timings(answers[1]) == without_timings(answers[2])
    from_array = mien.predict(astronaut_bgr())  # sent as a lossless PNG, so not the JPEG's pixels
    assert len(from_array.faces) == 1 and from_array.image.width == 512
    assert abs(from_array.faces[0].box.x - answers[0].faces[0].box.x) < 10
    grey = mien.predict(cv2.cvtColor(astronaut_bgr(), cv2.COLOR_BGR2GRAY))
    assert len(grey.faces) == 1


def test_an_array_must_be_an_image(mien):
    with pytest.raises(ValueError, match="uint8"):
        mien.predict(np.zeros((8, 8, 3), np.float32))
    with pytest.raises(TypeError, match="path, bytes or a BGR uint8"):
        mien.predict(42)


def test_query_keywords_and_the_model_reach_the_service(mien):
    result = mien.predict(astronaut_jpeg(), model="mini_xception", detect=False, min_confidence=1.0, align=None)
    assert result.detector is None and len(result.faces) == 1
    [face] = result.faces
    assert face.uncertain is True and face.label is None and face.score < 1.0


def test_predict_batch_answers_each_image_in_order(mien):
    result = mien.predict_batch([astronaut_jpeg(), GARBAGE, astronaut_bgr()], max_faces=1)
    assert isinstance(result, BatchResponse)
    assert [item.status for item in result.results] == [200, 400, 200]
    assert result.results[1].error.code == "bad_image" and result.results[1].prediction is None
    assert [item.filename for item in result.results] == ["image0", "image1", "image2.png"]
    with pytest.raises(TypeError, match="sequence"):
        mien.predict_batch(astronaut_jpeg())


def test_models_ready_and_health_are_typed(mien):
    models = mien.models()
    assert isinstance(models, ModelsResponse) and models.default == "mini_xception"
    ready = mien.ready()
    assert isinstance(ready, ReadyResponse) and ready.models == ["mini_xception"]
    assert mien.health() == HealthResponse(status="ok")


def test_errors_raise_with_the_services_code_and_message(mien):
    with pytest.raises(MienError) as caught:
        mien.predict(astronaut_jpeg(), model="resnet9000")
    assert (caught.value.status, caught.value.code) == (404, "unknown_model")
    assert "resnet9000" in caught.value.message and "mini_xception" in caught.value.message
    with pytest.raises(MienError) as caught:
        mien.predict(GARBAGE)
    assert (caught.value.status, caught.value.code) == (400, "bad_image")
    with pytest.raises(MienError) as caught:
        mien.predict(astronaut_jpeg(), min_confidence=0)
    assert (caught.value.status, caught.value.code) == (400, "invalid_request")
    assert str(caught.value).startswith("400 invalid_request: ")


def test_the_api_key_is_sent_in_the_services_header(model_dir):
    assert API_KEY_HEADER == SERVICE_KEY_HEADER
    with make_client(model_dir, api_key=KEY) as tc:
        with pytest.raises(MienError) as caught:
            MienClient(client=tc).predict(astronaut_jpeg())
        assert (caught.value.status, caught.value.code) == (401, "unauthorized")
        with pytest.raises(MienError, match="401 unauthorized"):
            MienClient(client=tc, api_key="not-the-key-at-all").predict(astronaut_jpeg())
        assert len(MienClient(client=tc, api_key=KEY).predict(astronaut_jpeg()).faces) == 1
        assert MienClient(client=tc).health().status == "ok"  # open routes need no key


# --- retries on 503 busy -------------------------------------------------------------------------


def test_busy_is_retried_after_the_services_retry_after(model_dir):
    """The real limiter holds its only slot; the client's first try gets the real 503 busy, it waits, retries."""
    with make_client(model_dir, max_concurrency=1, max_queue=0, retry_after=4) as tc:
        limiter = tc.app.state.load_limiter
        waits = []

        def sleep(seconds: float) -> None:
            waits.append(seconds)
            if len(waits) == 2:
                limiter.running = 0  # the request in flight ends during the second wait

        limiter.running = 1  # a request in flight: the next one is refused, never queued (max_queue=0)
        result = MienClient(client=tc, sleep=sleep, backoff=0.5).predict(astronaut_jpeg())
        assert len(result.faces) == 1
        assert waits == [4.0, 4.0]  # Retry-After: 4 is longer than the backoff (0.5, then 1.0)


def test_busy_gives_up_after_max_retries_with_exponential_backoff():
    calls = []

    def busy(request: httpx.Request) -> httpx.Response:
        calls.append(request)
        return httpx.Response(503, json={"error": {"code": "busy", "message": "the service is busy"}})

    waits = []
    client = MienClient("http://mien.test", transport=httpx.MockTransport(busy), max_retries=3, backoff=0.5,
                        max_backoff=1.5, sleep=waits.append)  # fmt: skip
    with pytest.raises(MienError) as caught:
        client.health()
    assert (caught.value.status, caught.value.code) == (503, "busy")
    assert waits == [0.5, 1.0, 1.5] and len(calls) == 4  # 0.5 × 2^attempt, at most max_backoff


def test_other_503s_and_errors_are_not_retried():
    def not_ready(request: httpx.Request) -> httpx.Response:
        return httpx.Response(503, json={"error": {"code": "not_ready", "message": "models are loading"}},
                              headers={"Retry-After": "1"})  # fmt: skip

    waits = []
    with pytest.raises(MienError, match="not_ready") as caught:
        MienClient("http://mien.test", transport=httpx.MockTransport(not_ready), sleep=waits.append).ready()
    assert waits == [] and caught.value.retry_after == 1.0

    def busy(request: httpx.Request) -> httpx.Response:
        return httpx.Response(503, json={"error": {"code": "busy", "message": "the service is busy"}})

    with pytest.raises(MienError, match="busy"):  # max_retries=0: busy is answered at once
        MienClient("http://mien.test", transport=httpx.MockTransport(busy), max_retries=0, sleep=waits.append).ready()
    assert waits == []


def test_an_answer_without_mien_error_body_is_http_error():
    def proxy(request: httpx.Request) -> httpx.Response:
        return httpx.Response(502, text="<html>Bad Gateway</html>")

    with pytest.raises(MienError) as caught:
        MienClient("http://mien.test", transport=httpx.MockTransport(proxy)).models()
    assert (caught.value.status, caught.value.code) == (502, "http_error") and "Bad Gateway" in caught.value.message


def test_retry_after_may_be_an_http_date():
    later = httpx.Response(503, headers={"Retry-After": "Wed, 21 Oct 2099 07:28:00 GMT"})
    assert retry_after_seconds(later) > 1e8
    assert retry_after_seconds(httpx.Response(503, headers={"Retry-After": "soon"})) is None
    assert error_of(httpx.Response(503, headers={"Retry-After": "2"}, text="")).retry_after == 2.0


# --- base URL, context manager, analyze_video ----------------------------------------------------


def test_base_url_headers_and_closing():
    seen = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        return httpx.Response(200, json={"status": "ok"})

    with MienClient("http://mien.test:9000/api/", api_key=KEY, transport=httpx.MockTransport(handler)) as c:
        c.health()
    assert str(seen[0].url) == "http://mien.test:9000/api/health"
    assert seen[0].headers[API_KEY_HEADER] == KEY
    assert c._http.is_closed
    with pytest.raises(ValueError, match="negative"):
        MienClient(max_retries=-1)


def small_video(path: Path, count: int = 20, fps: float = 10.0) -> Path:
    """The astronaut's head moving over a 320×240 grey canvas, mp4v."""
    face = cv2.resize(astronaut_bgr()[20:220, 125:325], (100, 100), interpolation=cv2.INTER_AREA)
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"mp4v"), fps, (320, 240))
    for i in range(count):
        frame = np.full((240, 320, 3), 110, np.uint8)
        frame[60:160, 20 + 4 * i : 120 + 4 * i] = face
        writer.write(frame)
    writer.release()
    return path


def test_analyze_video_takes_a_path_or_bytes_and_answers_the_services_schema(mien, tmp_path):
    video = small_video(tmp_path / "clip.mp4")
    from_path = mien.analyze_video(video, fps=10, smooth=0.5)
    from_bytes = mien.analyze_video(video.read_bytes(), model="mini_xception", fps=10, smooth=0.5)
    for result in (from_path, from_bytes):
        assert isinstance(result, VideoAnalysisResponse) and result.model == "mini_xception" and result.smoothed
        assert result.video.frames_sampled == 20 and result.video.sample_fps == 10.0
        assert len(result.tracks) == 1 and result.tracks[0].frames == 20
    assert from_path.model_dump(exclude={"timings_ms"}) == from_bytes.model_dump(exclude={"timings_ms"})
    with pytest.raises(MienError) as caught:
        mien.analyze_video(GARBAGE)
    assert (caught.value.status, caught.value.code) == (400, "bad_video")
    with pytest.raises(MienError) as caught:
        mien.analyze_video(video, fps=0)
    assert (caught.value.status, caught.value.code) == (400, "invalid_request")


# --- the async client ----------------------------------------------------------------------------


def test_the_async_client_on_the_real_app_with_its_retries(model_dir):
    app = create_app(Settings(model_dir=model_dir, providers=CPU, max_concurrency=1, max_queue=0, api_key=KEY))
    waits = []

    async def run() -> None:
        async with app.router.lifespan_context(app):  # loads the models, as the server's start-up does
            limiter = app.state.load_limiter

            async def sleep(seconds: float) -> None:
                waits.append(seconds)
                limiter.running = 0

            transport = httpx.ASGITransport(app=app)
            async with AsyncMienClient("http://mien", api_key=KEY, transport=transport, sleep=sleep) as mien:
                assert (await mien.health()).status == "ok"
                assert (await mien.models()).default == "mini_xception"
                assert (await mien.ready()).models == ["mini_xception"]
                limiter.running = 1  # busy once
                result = await mien.predict(astronaut_bgr(), min_confidence=1.0)
                assert len(result.faces) == 1 and result.faces[0].uncertain
                batch = await mien.predict_batch([astronaut_jpeg(), GARBAGE])
                assert [item.status for item in batch.results] == [200, 400]
                with pytest.raises(MienError) as caught:
                    await mien.predict(astronaut_jpeg(), model="nope")
                assert caught.value.code == "unknown_model"
            async with AsyncMienClient("http://mien", transport=transport) as anonymous:
                with pytest.raises(MienError, match="401 unauthorized"):
                    await anonymous.predict(astronaut_jpeg())

    asyncio.run(run())
    assert waits == [1.0]  # Retry-After: 1 (MIEN_RETRY_AFTER's default) beats the first backoff, 0.5


def test_the_async_client_analyzes_a_video_as_the_sync_one_does(model_dir, app_client, tmp_path: Path):
    video = small_video(tmp_path / "clip.mp4")
    app = create_app(Settings(model_dir=model_dir, providers=CPU))

    async def run() -> VideoAnalysisResponse:
        async with app.router.lifespan_context(app):
            async with AsyncMienClient("http://mien", transport=httpx.ASGITransport(app=app)) as c:
                with pytest.raises(MienError, match="415 unsupported_media_type"):
                    await c.analyze_video(astronaut_jpeg())  # a still image: POST /predict
                return await c.analyze_video(video, max_missed=2)

    result = asyncio.run(run())
    with MienClient(client=app_client) as sync:
        expected = sync.analyze_video(str(video), max_missed=2)
    assert isinstance(result, VideoAnalysisResponse) and len(result.tracks) == 1
    assert result.model_dump(exclude={"timings_ms"}) == expected.model_dump(exclude={"timings_ms"})
