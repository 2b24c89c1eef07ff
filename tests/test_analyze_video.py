"""POST /analyze/video with the bundled mini_xception and YuNet on short generated videos (scikit-image's
astronaut moving over a grey canvas): the answer is the offline ``mien analyze`` engine's, every limit is refused
before a frame is analysed, and the uploaded video's temporary file is gone after every request. Behaviour
only, never wall-clock time."""

from __future__ import annotations

import tempfile
from pathlib import Path

import cv2
import numpy as np
import pytest

from mien.schemas import VideoAnalysisResponse
from mien.service.analysis import AnalyzeOptions, Analyzer, summarize
from mien.service.config import Settings
from mien.service.exceptions import TooManyFrames, VideoTooLong
from mien.service.frames import Frame, probe
from mien.service.limits import RequestLimitsMiddleware
from mien.service.routes import analyze as route
from tests.conftest import CPU, make_client

ROOT = Path(__file__).resolve().parents[1]
URL = "/analyze/video"
FPS, COUNT = 10.0, 40  # the test video: 4 s


def head(side: int = 100) -> np.ndarray:
    from skimage import data

    image = cv2.cvtColor(data.astronaut(), cv2.COLOR_RGB2BGR)[20:220, 125:325]
    return cv2.resize(image, (side, side), interpolation=cv2.INTER_AREA)


def write_video(path: Path, frames: list[np.ndarray], fps: float = FPS, fourcc: str = "mp4v") -> Path:
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*fourcc), fps, (frames[0].shape[1], frames[0].shape[0]))
    assert writer.isOpened()
    for frame in frames:
        writer.write(frame)
    writer.release()
    return path


def moving_face(path: Path, count: int = COUNT, fps: float = FPS, fourcc: str = "mp4v") -> Path:
    """One head moving right by 4 pixels a frame over a 320×240 grey canvas."""
    face = head()
    frames = []
    for i in range(count):
        frame = np.full((240, 320, 3), 110, np.uint8)
        frame[60:160, 10 + 4 * i : 110 + 4 * i] = face
        frames.append(frame)
    return write_video(path, frames, fps, fourcc)


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> Path:
    """The bundled mini_xception (and its card) and detectors, alone in a folder: the service loads only them."""
    folder = tmp_path_factory.mktemp("models")
    for name in ("mini_xception.onnx", "mini_xception.card.json"):
        (folder / name).symlink_to(ROOT / "models" / name)
    (folder / "detector").symlink_to(ROOT / "models" / "detector", target_is_directory=True)
    return folder


@pytest.fixture(scope="module")
def videos(tmp_path_factory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("videos")
    blank = [np.full((120, 160, 3), 110, np.uint8) for _ in range(20)]
    return {
        "face": moving_face(folder / "face.mp4"),
        "blank": write_video(folder / "blank.mp4", blank),
        # 10 frames at 0.01 fps: a 90 KB file that declares 1000 s.
        "slow": moving_face(folder / "slow.avi", count=10, fps=0.01, fourcc="MJPG"),
    }


@pytest.fixture(scope="module")
def client(models):
    with make_client(models) as c:
        yield c


@pytest.fixture()
def watched_tmp(tmp_path, monkeypatch) -> tuple[Path, list[str]]:
    """A fresh temporary folder for the request's files, and the name of every one made there."""
    folder = tmp_path / "tmp"
    folder.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(folder))
    made: list[str] = []
    real = tempfile.mkstemp

    def mkstemp(*args, **kwargs):
        handle, name = real(*args, **kwargs)
        made.append(name)
        return handle, name

    monkeypatch.setattr(tempfile, "mkstemp", mkstemp)
    return folder, made


def upload(path: Path, media_type: str = "video/mp4") -> dict:
    return {"files": {"file": (path.name, path.read_bytes(), media_type)}}


def offline(models: Path, video: Path, **options) -> tuple[list, list]:
    """The rows and the summary ``mien analyze`` gives for the same file and options."""
    analyzer = Analyzer.load(models, AnalyzeOptions(**options), providers=CPU)
    rows = list(analyzer.analyze(video))
    return rows, summarize(rows, analyzer.labels, 1.0 / probe(video, options.get("fps")).fps)


# --- the answer ------------------------------------------------------------------------------------------


def test_one_face_gives_one_track_that_lasts_the_whole_video(client, videos, watched_tmp):
    response = client.post(URL, **upload(videos["face"]))
    assert response.status_code == 200, response.text
    answer = VideoAnalysisResponse.model_validate_json(response.content)
    assert answer.model == "mini_xception" and answer.detector == "yunet" and answer.aligned
    assert answer.video.model_dump() == {"width": 320, "height": 240, "fps": FPS, "duration_seconds": 4.0,
                                         "frames": COUNT, "frames_sampled": 20, "sample_fps": 5.0}  # fmt: skip
    [track] = answer.tracks
    assert track.track == 1 and track.frames == 20 and track.dominant == "happy"  # the astronaut smiles
    assert sum(track.shares.values()) == pytest.approx(1.0)
    assert track.seconds == pytest.approx(answer.video.duration_seconds)
    assert (track.first_seen, track.last_seen) == (0.0, pytest.approx(3.8))
    assert [f.frame for f in answer.timeline] == list(range(0, COUNT, 2))  # 5 of the video's 10 frames a second
    assert [f.timestamp for f in answer.timeline] == pytest.approx([i / FPS for i in range(0, COUNT, 2)])
    for frame in answer.timeline:
        [face] = frame.faces
        assert face.track == 1 and face.label == "happy" and not face.uncertain
        assert sum(face.probabilities.values()) == pytest.approx(1.0, abs=1e-5)
        assert abs(face.box.x + face.box.width / 2 - (60 + 4 * frame.frame)) < 12  # where the head was pasted
    assert not answer.smoothed
    assert answer.timings_ms.total >= answer.timings_ms.detect > 0


@pytest.mark.parametrize(
    "query", [{}, {"fps": "10", "smooth": "0.3", "max_missed": "1"}, {"fps": "2.5", "min_face": "40", "align": "false"}]
)
def test_the_answer_is_the_offline_engines(client, models, videos, query):
    response = client.post(URL, params=query, **upload(videos["face"]))
    assert response.status_code == 200, response.text
    answer = VideoAnalysisResponse.model_validate_json(response.content)
    options = {"fps": float(query.get("fps", 5.0)), "smooth": float(query["smooth"]) if "smooth" in query else None,
               "max_missed": int(query.get("max_missed", 5)), "min_face": int(query.get("min_face", 20)),
               "align": query.get("align") != "false"}  # fmt: skip
    rows, summaries = offline(models, videos["face"], **options)
    assert answer.smoothed == (options["smooth"] is not None)
    assert len(answer.tracks) == len(summaries) >= 1
    for got, want in zip(answer.tracks, summaries, strict=True):
        assert (got.track, got.frames, got.dominant) == (want.track, want.frames, want.dominant)
        assert (got.first_seen, got.last_seen, got.seconds) == pytest.approx((want.first, want.last, want.seconds))
        assert got.shares == pytest.approx(want.shares, abs=1e-9)
        assert got.mean_probabilities == pytest.approx(want.mean_probabilities, abs=1e-5)
    faces = [(frame, face) for frame in answer.timeline for face in frame.faces]
    assert len(faces) == len(rows)
    for (frame, face), row in zip(faces, rows, strict=True):
        assert (frame.frame, frame.timestamp, face.track, face.label) == (
            row.frame,
            row.timestamp,
            row.track,
            row.label,
        )
        assert (face.box.x, face.box.y, face.box.width, face.box.height) == row.box
        assert face.probabilities == pytest.approx(row.probabilities, abs=1e-5)


def test_a_video_without_a_face_answers_200_with_no_track(client, videos, watched_tmp):
    response = client.post(URL, **upload(videos["blank"]))
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["tracks"] == [] and body["timeline"] == []
    assert body["video"]["frames_sampled"] == 10 and body["video"]["duration_seconds"] == 2.0
    assert list(watched_tmp[0].iterdir()) == []


def test_min_confidence_takes_the_label_away_but_not_the_summary(client, videos):
    body = client.post(URL, params={"min_confidence": "1.0"}, **upload(videos["face"])).json()
    faces = [face for frame in body["timeline"] for face in frame["faces"]]
    assert faces and all(face["label"] is None and face["uncertain"] for face in faces)
    assert body["tracks"][0]["dominant"] == "happy"


# --- limits, refused before a frame is analysed ---------------------------------------------------------


@pytest.fixture()
def no_analysis(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("a frame was analysed; the limit should have refused the video first")

    monkeypatch.setattr(route.Analyzer, "analyze_frames", refuse)


@pytest.mark.parametrize(
    ("video", "limits", "status", "code", "words"),
    [
        ("face", {"max_video_bytes": 20_000}, 413, "too_large", "MIEN_MAX_VIDEO_BYTES"),  # counted in the route
        ("face", {"max_video_bytes": 1000}, 413, "too_large", "MIEN_MAX_VIDEO_BYTES"),  # the body, by the middleware
        ("face", {"max_video_seconds": 3.5}, 413, "video_too_long", "4.0 s"),
        ("slow", {}, 413, "video_too_long", "1000.0 s"),
        ("face", {"max_video_frames": 19}, 413, "too_many_frames", "20 frames"),
        ("face", {"max_pixels": 320 * 240 - 1}, 413, "too_many_pixels", "320×240"),
    ],
)
def test_every_limit_is_refused_before_analysis_and_leaves_no_file(
    models, videos, watched_tmp, no_analysis, video, limits, status, code, words
):
    with make_client(models, **limits) as client:
        response = client.post(URL, **upload(videos[video]))
        assert response.status_code == status, response.text
        error = response.json()["error"]
        assert error["code"] == code and words in error["message"], error
        assert client.get("/health").status_code == 200
    folder, made = watched_tmp
    assert list(folder.iterdir()) == []
    if limits.get("max_video_bytes") != 1000:  # every other one was received, into a file now deleted
        assert len(made) == 1 and not Path(made[0]).exists()


def test_frames_beyond_the_limits_stop_the_reading_when_the_container_did_not_say():
    settings = Settings(max_video_seconds=1.0, max_video_frames=3)
    frames = (Frame("v", i, i / 10, np.zeros((2, 2, 3), np.uint8)) for i in range(10))
    with pytest.raises(TooManyFrames, match="more than 3"):
        list(route.guarded(frames, settings, Path("v")))
    frames = (Frame("v", i, i / 2, np.zeros((2, 2, 3), np.uint8)) for i in range(3))
    with pytest.raises(VideoTooLong, match="a frame at 1.0 s, over the limit of 0.9 s"):
        list(route.guarded(frames, Settings(max_video_seconds=0.9), Path("v")))


def test_frames_end_once_the_request_is_given_up():
    import threading

    stop = threading.Event()
    frames = (Frame("v", i, i / 10, np.zeros((2, 2, 3), np.uint8)) for i in range(10))
    kept = []
    for frame in route.guarded(frames, Settings(), Path("v"), stop):
        kept.append(frame.index)
        if frame.index == 3:
            stop.set()
    assert kept == [0, 1, 2, 3]


def test_a_timed_out_analysis_stops_and_gives_its_file_back(models, videos, watched_tmp, monkeypatch):
    import threading
    import time

    read, finished = [], threading.Event()
    real = route.video_frames

    def slow(path, fps):  # a long video: each frame takes a while to decode
        try:
            for frame in real(path, fps):
                for _ in range(100):
                    read.append(frame.index)
                    time.sleep(0.02)
                    yield frame
        finally:
            finished.set()

    monkeypatch.setattr(route, "video_frames", slow)
    with make_client(models, video_timeout=0.5, max_concurrency=1, max_queue=0) as c:
        answer = c.post(URL, **upload(videos["face"]))
        assert answer.status_code == 504 and answer.json()["error"]["code"] == "timeout"
        assert watched_tmp[1] and not any(Path(watched_tmp[0], name).exists() for name in watched_tmp[1])
        photo = cv2.imencode(".png", head())[1].tobytes()
        assert c.post("/predict", files={"file": ("f.png", photo, "image/png")}).status_code == 200  # slot freed
        assert finished.wait(10)  # the worker stopped at its next frame rather than reading the whole video
    assert 0 < len(read) < 100 * COUNT / 2


def test_query_parameters_are_checked(client, videos, watched_tmp):
    for query in ({"fps": "0"}, {"fps": "5e-324"}, {"fps": "61"}, {"fps": "nan"}, {"smooth": "0"}, {"smooth": "1.5"},
                  {"max_missed": "-1"}, {"detector": "yolo"}):  # fmt: skip
        response = client.post(URL, params=query, **upload(videos["face"]))
        assert (response.status_code, response.json()["error"]["code"]) == (400, "invalid_request"), query
    response = client.post(URL, params={"model": "nope"}, **upload(videos["face"]))
    assert (response.status_code, response.json()["error"]["code"]) == (404, "unknown_model")
    assert watched_tmp[1] == []  # refused before the body was read: no file was made


def test_the_temporary_file_exists_while_analysing_and_is_gone_after(client, videos, watched_tmp, monkeypatch):
    seen = []
    real = route.read_header

    def spy(path):
        seen.append((path, path.exists(), path.stat().st_size))
        return real(path)

    monkeypatch.setattr(route, "read_header", spy)
    assert client.post(URL, **upload(videos["face"])).status_code == 200
    [(path, existed, size)] = seen
    assert existed and size == videos["face"].stat().st_size and path.parent == watched_tmp[0]
    assert path.name.startswith("mien-video-") and not path.exists()


def test_the_video_route_has_its_own_timeout_and_counts_as_inference():
    from mien.service.limits import is_inference

    middleware = RequestLimitsMiddleware(None, Settings(request_timeout=5, video_timeout=300), None)  # type: ignore[arg-type]
    scope = {"type": "http", "method": "POST", "path": URL}
    assert is_inference(scope)
    assert middleware._timeout(scope) == 300 and middleware._timeout({**scope, "path": "/predict"}) == 5
    assert middleware._body_limit(scope) > Settings().max_video_bytes


def test_metrics_count_video_requests(client, videos):
    def count(status: str) -> float:
        for line in client.get("/metrics").text.splitlines():
            if line.startswith("mien_predict_requests_total") and f'status="{status}"' in line:
                return float(line.split()[-1])
        return 0.0

    before_ok, before_bad = count("200"), count("415")
    client.post(URL, **upload(videos["face"]))
    client.post(URL, files={"file": ("a.txt", b"hello", "text/plain")})
    assert (count("200"), count("415")) == (before_ok + 1, before_bad + 1)


def test_the_engines_errors_are_answered_400_not_500():
    from mien.service.analysis import AnalyzeError
    from mien.service.errors import mien_error_response
    from mien.service.frames import BadSource

    assert mien_error_response(AnalyzeError("smooth must be in (0, 1]")).status_code == 400
    assert b"invalid_analysis" in mien_error_response(AnalyzeError("x")).body
    assert b"bad_image" in mien_error_response(BadSource("x: cannot be read")).body


def test_openapi_documents_the_route():
    from mien.service.main import create_app

    operation = create_app(Settings()).openapi()["paths"][URL]["post"]
    body = operation["requestBody"]["content"]["multipart/form-data"]["schema"]
    assert body["required"] == ["file"] and body["properties"]["file"]["format"] == "binary"
    assert {"200", "400", "404", "413", "415", "503", "504"} <= set(operation["responses"])
    assert {p["name"] for p in operation["parameters"]} >= {"model", "fps", "smooth", "max_missed", "detector"}
