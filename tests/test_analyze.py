"""``mien analyze`` (mien.service.analysis, frames, cli) with the bundled mini_xception and YuNet on generated
inputs: scikit-image's astronaut pasted onto frames, moving, crossing another, leaving and coming back,
written as mp4/avi videos, images and folders. Behaviour only, never wall-clock time."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pytest

from mien.cli import main
from mien.service.analysis import AnalyzeOptions, Analyzer, FaceRow
from mien.service.frames import BadSource, count_frames, open_frames, probe, source_kind
from mien.service.tracking import iou_matrix
from tests.video_helpers import SIDE, canvas, centre_x, head, read_back, write_video


@pytest.fixture(autouse=True)
def _cpu_only(monkeypatch):
    monkeypatch.setenv("MIEN_PROVIDERS", "cpu")  # the CLI reads the service's settings


# --- sources ----------------------------------------------------------------------------------------------


def test_a_video_gives_one_tracked_face_per_frame(analyzer, video):
    rows = list(analyzer.analyze(video))
    assert [row.frame for row in rows] == list(range(30))
    assert [row.timestamp for row in rows] == pytest.approx([i / 10 for i in range(30)])
    assert {row.track for row in rows} == {rows[0].track} and rows[0].track is not None
    assert {row.label for row in rows} == {"happy"}  # the astronaut smiles
    assert all(row.landmarks is not None and len(row.landmarks) == 5 for row in rows)
    assert sum(rows[0].probabilities.values()) == pytest.approx(1.0, abs=1e-5)
    assert not any(row.smoothed for row in rows)  # smoothing is off by default
    moved = [centre_x(row) - (10 + 5 * row.frame + SIDE / 2) for row in rows]
    assert max(map(abs, moved)) < 15  # each box is on the head where it was pasted


def test_fps_samples_the_video_by_timestamp(analyzer, video):
    assert count_frames(video) == 30
    assert count_frames(video, fps=2.5) == 8  # 10 fps video: frames 0, 4, ..., 28
    assert [frame.index for frame in open_frames(video, fps=2.5)] == list(range(0, 30, 4))
    # 3 per second over 3 s: the first frame at or after each third of a second
    assert [frame.index for frame in open_frames(video, fps=3)] == [0, 4, 7, 10, 14, 17, 20, 24, 27]
    assert count_frames(video, fps=3) == 9
    assert count_frames(video, fps=100) == 30  # faster than the video: every frame, no repeats
    info = probe(video, fps=2.5)
    assert (info.kind, info.fps, info.native_fps) == ("video", 2.5, pytest.approx(10.0))
    options = AnalyzeOptions(fps=2.5)
    fast = Analyzer(analyzer.classifier, analyzer.detector, options)
    assert [row.frame for row in fast.analyze(video)] == list(range(0, 30, 4))


@pytest.mark.parametrize("suffix, fourcc", [("mp4", "mp4v"), ("webm", "VP80"), ("mov", "mp4v"), ("avi", "MJPG")])
def test_each_container_is_read_with_its_frame_count_and_times(suffix, fourcc, tmp_path):
    path = tmp_path / f"grey.{suffix}"
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*fourcc), 8, (64, 48))
    for i in range(9):
        writer.write(np.full((48, 64, 3), 20 * i, np.uint8))
    writer.release()
    frames = list(open_frames(path))
    assert probe(path).frames == len(frames) == 9
    assert [frame.timestamp for frame in frames] == pytest.approx([i / 8 for i in range(9)])
    assert all(frame.image.shape == (48, 64, 3) and frame.image.dtype == np.uint8 for frame in frames)


def test_an_image_and_a_folder_are_not_tracked(analyzer, tmp_path):
    face = canvas(300, 260, [(100, 80, head())])
    (tmp_path / "b" / "c").mkdir(parents=True)
    (tmp_path / "a").mkdir()
    cv2.imwrite(str(tmp_path / "b" / "c" / "deep.png"), face)
    cv2.imwrite(str(tmp_path / "a" / "one.jpg"), face)
    cv2.imwrite(str(tmp_path / "a" / "two.jpg"), canvas(300, 260, [(10, 10, head()), (180, 120, head(80))]))
    (tmp_path / "a" / "notes.txt").write_text("not an image")
    (tmp_path / "a" / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 truncated")

    single = list(analyzer.analyze(tmp_path / "a" / "one.jpg"))
    assert len(single) == 1 and single[0].track is None and single[0].timestamp is None

    frames = list(open_frames(tmp_path))  # the broken file is skipped with a warning
    assert [Path(frame.source).relative_to(tmp_path).as_posix() for frame in frames] == [
        "a/one.jpg", "a/two.jpg", "b/c/deep.png"
    ]  # fmt: skip
    rows = list(analyzer.analyze(tmp_path))
    assert [Path(row.source).name for row in rows] == ["one.jpg", "two.jpg", "two.jpg", "deep.png"]
    assert all(row.track is None and row.timestamp is None and not row.smoothed for row in rows)
    assert probe(tmp_path).frames == 4  # what the progress bar counts: every image file found


def test_bad_sources_are_refused_with_a_reason(tmp_path):
    with pytest.raises(BadSource, match="no such file"):
        source_kind(tmp_path / "missing.mp4")
    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(BadSource, match="not an image"):
        source_kind(tmp_path / "notes.txt")
    (tmp_path / "fake.mp4").write_text("this is not a video")
    with pytest.raises(BadSource, match="cannot open|no frame"):
        list(open_frames(tmp_path / "fake.mp4"))
    zero = cv2.VideoWriter(str(tmp_path / "zero.avi"), cv2.VideoWriter_fourcc(*"MJPG"), 10, (64, 48))
    zero.release()  # a valid container with no frame
    with pytest.raises(BadSource, match="no frame"):
        probe(tmp_path / "zero.avi")
    with pytest.raises(BadSource, match="no frame"):
        list(open_frames(tmp_path / "zero.avi"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(BadSource, match="no image"):
        list(open_frames(tmp_path / "empty"))
    with pytest.raises(BadSource, match="fps"):
        open_frames(tmp_path / "fake.mp4", fps=0)
    assert source_kind(0) == source_kind("1") == "camera"


class FakeCamera:
    """Stands in for cv2.VideoCapture(index): the moving head for ``count`` frames, then nothing."""

    def __init__(self, index, count: int = 12) -> None:
        self.index, self.left = index, count
        self.face = head()

    def isOpened(self) -> bool:  # noqa: N802 (OpenCV's name)
        return self.index == 0

    def read(self):
        if self.left == 0:
            return False, None
        self.left -= 1
        return True, canvas(320, 240, [(10 + 5 * (12 - self.left), 60, self.face)])

    def release(self) -> None:
        pass


def test_a_camera_is_read_until_it_stops_and_its_faces_are_tracked(monkeypatch, tmp_path, capsys):
    import mien.service.frames as frames

    monkeypatch.setattr(frames.cv2, "VideoCapture", FakeCamera)
    got = list(open_frames("0"))
    assert [frame.index for frame in got] == list(range(12)) and {frame.source for frame in got} == {"camera:0"}
    assert all(b.timestamp >= a.timestamp for a, b in zip(got, got[1:], strict=False)) and not got[0].still
    assert probe(0).frames is None  # a camera has no end known in advance
    with pytest.raises(BadSource, match="camera 3"):
        list(open_frames(3))
    assert main(["analyze", "0", "--out", str(tmp_path / "cam.jsonl"), "--no-progress"]) == 0
    rows = read_back(tmp_path / "cam.jsonl")
    assert len(rows) == 12 and len({row["track"] for row in rows}) == 1 and rows[0]["track"] is not None


def test_a_batch_is_classified_in_one_call(analyzer, video):
    calls = []
    real = analyzer.classifier.predict_crops

    class Spy:
        spec = analyzer.classifier.spec
        model_id = analyzer.classifier.model_id

        def predict_crops(self, crops):
            calls.append(len(crops))
            return real(crops)

    spied = Analyzer(Spy(), analyzer.detector, AnalyzeOptions(batch_size=8))  # type: ignore[arg-type]
    frames = list(open_frames(video))[:8]
    rows = spied.analyze_batch(frames)
    assert calls == [8] and len(rows) == 8
    assert all(row.track is None for row in rows)  # a batch alone is not tracked
    full = list(spied.analyze(video))
    assert calls[1:] == [8, 8, 8, 6] and len(full) == 30  # 30 frames in batches of 8


# --- tracking -------------------------------------------------------------------------------------------


def test_two_faces_crossing_paths_keep_their_tracks(analyzer, tmp_path):
    """One head moves right, the other (mirrored, pasted on top, 30 px lower) left: in the middle frames the
    second hides part of the first, whose face is lost for a few frames and found again further on."""
    a, b = head(90), head(90, flip=True)

    def centres(i: int) -> np.ndarray:  # where each face is, roughly: the face sits in the head's middle
        return np.array([[10 + 9 * i + 45, 40 + 45], [370 - 9 * i + 45, 70 + 45]])

    frames = (canvas(480, 260, [(10 + 9 * i, 40, a), (370 - 9 * i, 70, b)]) for i in range(40))
    path = write_video(tmp_path / "crossing.mp4", frames)
    rows = list(Analyzer(analyzer.classifier, analyzer.detector, AnalyzeOptions(max_missed=8)).analyze(path))
    tracks_of: dict[int, set] = {0: set(), 1: set()}
    for row in rows:
        centre = np.array([centre_x(row), row.box[1] + row.box[3] / 2])
        distances = np.linalg.norm(centres(row.frame) - centre, axis=1)
        assert distances.min() < 20  # no false face
        tracks_of[int(np.argmin(distances))].add(row.track)
    assert len(tracks_of[0]) == len(tracks_of[1]) == 1 and tracks_of[0] != tracks_of[1]
    by_frame: dict[int, list[FaceRow]] = {}
    for row in rows:
        by_frame.setdefault(row.frame, []).append(row)
    assert len(by_frame[0]) == len(by_frame[39]) == 2  # both faces before and after the crossing
    overlapping = [
        f for f, found in by_frame.items() if len(found) == 2 and iou_matrix([found[0].box], [found[1].box])[0, 0] > 0
    ]
    assert overlapping  # the boxes really crossed


def test_a_face_that_leaves_briefly_keeps_its_track_and_a_long_absence_starts_a_new_one(analyzer, tmp_path):
    face = head()
    present = [i not in range(10, 13) and i not in range(20, 30) for i in range(36)]
    frames = (canvas(320, 240, [(100, 60, face)] if shown else []) for shown in present)
    path = write_video(tmp_path / "away.avi", frames)
    rows = list(Analyzer(analyzer.classifier, analyzer.detector, AnalyzeOptions(max_missed=5)).analyze(path))
    assert [row.frame for row in rows] == [i for i, shown in enumerate(present) if shown]
    first, second = rows[0].track, rows[-1].track
    assert {row.track for row in rows if row.frame < 20} == {first}  # 3 frames away: the same track
    assert {row.track for row in rows if row.frame >= 30} == {second} and second != first  # 10 frames: a new one


def test_smoothing_is_off_by_default_and_averages_each_track_when_asked(analyzer, tmp_path):
    # the face turns from smiling to mirrored-and-dim every other frame, so that raw probabilities jump
    face, other = head(), (head(flip=True) * 0.6).astype(np.uint8)
    frames = (canvas(320, 240, [(100, 60, face if i % 2 == 0 else other)]) for i in range(12))
    path = write_video(tmp_path / "flicker.mp4", frames)
    raw = list(analyzer.analyze(path))
    smooth = list(Analyzer(analyzer.classifier, analyzer.detector, AnalyzeOptions(smooth=0.3)).analyze(path))
    assert not any(row.smoothed for row in raw) and all(row.smoothed for row in smooth)
    assert [row.frame for row in raw] == [row.frame for row in smooth]
    assert smooth[0].probabilities == pytest.approx(raw[0].probabilities)  # the first frame is its own average
    labels = analyzer.labels
    expected = np.array([raw[0].probabilities[label] for label in labels])
    for r, s in zip(raw[1:], smooth[1:], strict=True):
        expected = 0.3 * np.array([r.probabilities[label] for label in labels]) + 0.7 * expected
        assert [s.probabilities[label] for label in labels] == pytest.approx(expected.tolist(), abs=1e-6)
        assert s.label == labels[int(np.argmax(expected))]
    assert any(abs(s.score - r.probabilities[s.label]) > 1e-3 for r, s in zip(raw[1:], smooth[1:], strict=True))
