"""Uploaded photos and face crops are never written to disk and never logged; an uploaded video is written to one
temporary file only (the video decoder reads files), which is gone when the answer is, whatever the answer.

Three independent witnesses watch one request for a photo over Starlette's 1 MB spooling threshold: a
Python audit hook that records every file opened for writing (``open`` events, temporary files included,
even unnamed ``O_TMPFILE`` ones that no directory listing would show), fresh temporary and working
directories that must stay empty, and every log record at DEBUG level.
"""

from __future__ import annotations

import base64
import logging
import os
import re
import sys
import tempfile
import threading
from pathlib import Path

import cv2
import numpy as np
import pytest
from skimage import data
from starlette.formparsers import MultiPartParser

from tests.conftest import make_client

_WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_APPEND | os.O_TRUNC
_lock = threading.Lock()
_recording: list[str] | None = None  # set while a test watches; the hook cannot be removed once added


def _audit(event: str, args: tuple) -> None:
    if _recording is None:
        return
    if event == "open":
        path, mode, flags = args
        writes = (isinstance(mode, str) and any(c in mode for c in "wax+")) or (
            isinstance(flags, int) and flags & _WRITE_FLAGS
        )
        if writes:
            with _lock:
                _recording.append(f"open {path!r} mode={mode!r} flags={flags!r}")
    elif event in ("tempfile.mkstemp", "tempfile.mkdtemp", "os.rename", "os.link", "os.symlink", "shutil.copyfile"):
        with _lock:
            _recording.append(f"{event} {args!r}")


sys.addaudithook(_audit)


class DiskWatch:
    def __enter__(self) -> list[str]:
        global _recording
        _recording = []
        return _recording

    def __exit__(self, *exc) -> None:
        global _recording
        _recording = None


@pytest.fixture(scope="module")
def big_photo() -> bytes:
    """The astronaut in a noisy 1536×1024 PNG (about 5 MB): a default Starlette would spool it to disk."""
    canvas = np.random.default_rng(0).integers(0, 256, (1024, 1536, 3), dtype=np.uint8)
    canvas[500:1012, 700:1212] = cv2.cvtColor(data.astronaut(), cv2.COLOR_RGB2BGR)
    photo = cv2.imencode(".png", canvas)[1].tobytes()
    assert len(photo) > 2 * 1024 * 1024
    return photo


def fragments(content: bytes) -> list[str]:
    """Ways a piece of the image could appear in a log line: hex, base64, and bytes' repr."""
    pieces = [content[i : i + 24] for i in (100, len(content) // 3, len(content) // 2, len(content) - 200)]
    found = []
    for piece in pieces:
        found += [piece.hex(), base64.b64encode(piece).decode()[:24], repr(piece)[2:26]]
    return found


def test_a_request_leaves_nothing_on_disk_and_nothing_of_the_image_in_the_logs(
    model_dir, big_photo, tmp_path, monkeypatch, caplog
):
    written_by_opencv = []
    monkeypatch.setattr(cv2, "imwrite", lambda *args, **kwargs: written_by_opencv.append(args[0]) or True)
    fresh_tmp, fresh_cwd = tmp_path / "tmp", tmp_path / "cwd"
    fresh_tmp.mkdir()
    fresh_cwd.mkdir()
    with make_client(model_dir) as client:
        upload = {"file": ("holiday.png", big_photo, "image/png")}
        assert client.post("/predict", files=upload).status_code == 200  # first: imports and caches are warm
        monkeypatch.setattr(tempfile, "tempdir", str(fresh_tmp))
        monkeypatch.setenv("TMPDIR", str(fresh_tmp))
        monkeypatch.chdir(fresh_cwd)
        caplog.set_level(logging.DEBUG)
        caplog.clear()
        with DiskWatch() as opened_for_writing:
            response = client.post("/predict", files=upload)
            refused = client.post("/predict", files={"file": ("x.png", big_photo[: len(big_photo) // 2], "image/png")})
    assert response.status_code == 200, response.text
    assert len(response.json()["faces"]) == 1
    assert refused.status_code == 400  # a refused image is not kept either

    assert opened_for_writing == []
    assert written_by_opencv == []
    assert list(fresh_tmp.iterdir()) == [] and list(fresh_cwd.iterdir()) == []

    assert any("predict model=" in r.getMessage() for r in caplog.records), "the request's own log line is missing"
    for record in caplog.records:
        text = record.getMessage() + (record.exc_text or "")
        for fragment in fragments(big_photo):
            assert fragment not in text, f"image bytes in a log record: {record.name}: {text[:200]}"
        arguments = record.args if isinstance(record.args, tuple) else (record.args,)
        assert not any(isinstance(a, bytes | bytearray | memoryview | np.ndarray) for a in arguments), record


@pytest.fixture(scope="module")
def video(tmp_path_factory) -> bytes:
    """The astronaut's head moving over 320×240 noise for 20 frames, mp4v."""
    path = tmp_path_factory.mktemp("video") / "holiday.mp4"
    face = cv2.resize(cv2.cvtColor(data.astronaut(), cv2.COLOR_RGB2BGR)[20:220, 125:325], (100, 100))
    noise = np.random.default_rng(1).integers(0, 256, (240, 320, 3), dtype=np.uint8)
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"mp4v"), 10.0, (320, 240))
    for i in range(20):
        frame = noise.copy()
        frame[60:160, 20 + 5 * i : 120 + 5 * i] = face
        writer.write(frame)
    writer.release()
    return path.read_bytes()


def test_a_video_is_kept_in_one_temporary_file_that_is_gone_after_every_answer(
    model_dir, video, tmp_path, monkeypatch, caplog
):
    fresh_tmp, fresh_cwd = tmp_path / "tmp", tmp_path / "cwd"
    fresh_tmp.mkdir()
    fresh_cwd.mkdir()
    upload = {"file": ("holiday.mp4", video, "video/mp4")}
    with make_client(model_dir) as client:
        assert client.post("/analyze/video", files=upload).status_code == 200  # imports and caches are warm
        monkeypatch.setattr(tempfile, "tempdir", str(fresh_tmp))
        monkeypatch.setenv("TMPDIR", str(fresh_tmp))
        monkeypatch.chdir(fresh_cwd)
        caplog.set_level(logging.DEBUG)
        caplog.clear()
        answers = []
        with DiskWatch() as opened_for_writing:
            answers.append(client.post("/analyze/video", files=upload))
            for params, content in (({}, video[: len(video) // 2]), ({"max_missed": "1"}, video),
                                    ({"fps": "1000"}, video)):  # fmt: skip
                answers.append(client.post("/analyze/video", params=params,
                                           files={"file": ("holiday.mp4", content, "video/mp4")}))  # fmt: skip
    assert [a.status_code for a in answers] == [200, 400, 200, 400], [a.text for a in answers]
    assert len(answers[0].json()["tracks"]) == 1

    # Three received uploads (the 4th was refused from its query, before its body was read): one file each,
    # made by mkstemp in the temporary folder, opened for writing there and nowhere else.
    # made by mkstemp in the temporary folder (its open by name there, the writer's open of its descriptor), and
    # nothing else opened for writing anywhere.
    made = [entry for entry in opened_for_writing if entry.startswith("tempfile.mkstemp")]
    by_name = [entry for entry in opened_for_writing if entry.startswith(f"open '{fresh_tmp}/mien-video-")]
    by_descriptor = [entry for entry in opened_for_writing if re.match(r"open \d+ mode='w", entry)]
    assert len(made) == len(by_name) == len(by_descriptor) == 3, opened_for_writing
    assert len(opened_for_writing) == 9, opened_for_writing
    assert list(fresh_tmp.iterdir()) == [] and list(fresh_cwd.iterdir()) == []

    assert any("analyze video model=" in r.getMessage() for r in caplog.records), "the request's own log line"
    for record in caplog.records:
        text = record.getMessage() + (record.exc_text or "")
        assert "mien-video-" not in text and str(fresh_tmp) not in text, text  # nor where it was kept
        for fragment in fragments(video):
            assert fragment not in text, f"video bytes in a log record: {record.name}: {text[:200]}"
    for answer in answers:
        assert "mien-video-" not in answer.text and str(fresh_tmp) not in answer.text


def test_the_witness_sees_a_spooled_upload(model_dir, big_photo, monkeypatch):
    """The audit hook catches the temporary file Starlette would write with its default 1 MB spool."""
    with make_client(model_dir) as client:
        monkeypatch.setattr(MultiPartParser, "spool_max_size", 1024 * 1024)  # as Starlette ships
        with DiskWatch() as opened_for_writing:
            response = client.post("/predict", files={"file": ("holiday.png", big_photo, "image/png")})
    assert response.status_code == 200
    assert any("open" in entry for entry in opened_for_writing), opened_for_writing


def test_creating_the_app_keeps_uploads_in_memory(model_dir, monkeypatch):
    monkeypatch.setattr(MultiPartParser, "spool_max_size", 1024 * 1024)
    make_client(model_dir)
    assert MultiPartParser.spool_max_size == sys.maxsize


def test_the_readme_says_so():
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text(encoding="utf-8")
    section = readme.split("## Privacy", 1)[1].split("\n## ", 1)[0]
    assert "never written to disk" in section and "never logged" in section
