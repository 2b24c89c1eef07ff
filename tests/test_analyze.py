"""``mien analyze`` (mien.service.analysis, frames, cli) with the bundled mini_xception and YuNet on generated
inputs: scikit-image's astronaut pasted onto frames, moving, crossing another, leaving and coming back,
written as mp4/avi videos, images and folders. Behaviour only, never wall-clock time."""

from __future__ import annotations

import csv
import json
import subprocess
import sys
import textwrap
from pathlib import Path

import cv2
import numpy as np
import pytest

from mien.cli import main
from mien.service.analysis import (
    AnalyzeError,
    AnalyzeOptions,
    Analyzer,
    FaceRow,
    annotate,
    check_output,
    columns,
    plot_timeline,
    summarize,
)
from mien.service.frames import BadSource, count_frames, open_frames, probe, source_kind
from mien.service.tracking import iou_matrix

ROOT = Path(__file__).resolve().parents[1]
MODELS = ROOT / "models"
CPU = ("CPUExecutionProvider",)
SIDE = 100  # the pasted head's side, pixels


def head(side: int = SIDE, flip: bool = False) -> np.ndarray:
    """The astronaut's head (hair to chin), BGR, ``side`` pixels square."""
    from skimage import data

    image = cv2.cvtColor(data.astronaut(), cv2.COLOR_RGB2BGR)[20:220, 125:325]
    image = cv2.resize(image, (side, side), interpolation=cv2.INTER_AREA)
    return image[:, ::-1].copy() if flip else image


def canvas(width: int, height: int, heads: list[tuple[int, int, np.ndarray]]) -> np.ndarray:
    """A grey frame with each (x, y, head) pasted, later ones on top."""
    frame = np.full((height, width, 3), 110, np.uint8)
    for x, y, face in heads:
        h, w = face.shape[:2]
        x0, y0, x1, y1 = max(x, 0), max(y, 0), min(x + w, width), min(y + h, height)
        if x1 > x0 and y1 > y0:
            frame[y0:y1, x0:x1] = face[y0 - y : y1 - y, x0 - x : x1 - x]
    return frame


def write_video(path: Path, frames, fps: float = 10.0) -> Path:
    """Frames to ``path`` (.mp4: mp4v, .avi: MJPG), at ``fps``."""
    writer = None
    for frame in frames:
        if writer is None:
            fourcc = cv2.VideoWriter_fourcc(*("MJPG" if path.suffix == ".avi" else "mp4v"))
            writer = cv2.VideoWriter(str(path), fourcc, fps, (frame.shape[1], frame.shape[0]))
            assert writer.isOpened()
        writer.write(frame)
    assert writer is not None
    writer.release()
    return path


def moving_face(path: Path, count: int = 30, fps: float = 10.0) -> Path:
    """One head moving right by 5 pixels a frame over a 320×240 frame."""
    face = head()
    return write_video(path, (canvas(320, 240, [(10 + 5 * i, 60, face)]) for i in range(count)), fps)


@pytest.fixture(scope="module")
def analyzer() -> Analyzer:
    return Analyzer.load(MODELS, AnalyzeOptions(), providers=CPU)


@pytest.fixture(scope="module")
def video(tmp_path_factory) -> Path:
    return moving_face(tmp_path_factory.mktemp("video") / "moving.mp4")


@pytest.fixture(autouse=True)
def _cpu_only(monkeypatch):
    monkeypatch.setenv("MIEN_PROVIDERS", "cpu")  # the CLI reads the service's settings


def centre_x(row: FaceRow) -> float:
    return row.box[0] + row.box[2] / 2


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


# --- outputs ----------------------------------------------------------------------------------------------


def read_back(path: Path) -> list[dict]:
    """The rows of a jsonl, csv or parquet file as comparable dicts."""
    if path.suffix == ".jsonl":
        return [json.loads(line) for line in path.read_text().splitlines()]
    if path.suffix == ".parquet":
        import pyarrow.parquet as pq

        return pq.read_table(path).to_pylist()
    out = []
    with path.open(newline="") as stream:
        for record in csv.DictReader(stream):
            parsed = {}
            for key, value in record.items():
                if value == "":
                    parsed[key] = None
                elif key in ("source", "label"):
                    parsed[key] = value
                elif key == "smoothed":
                    parsed[key] = value == "True"
                else:
                    parsed[key] = json.loads(value)
            out.append(parsed)
    return out


def test_jsonl_csv_and_parquet_hold_the_same_rows(video, tmp_path, capsys):
    outputs = [tmp_path / f"rows.{suffix}" for suffix in ("jsonl", "csv", "parquet")]
    for out in outputs:
        assert main(["analyze", str(video), "--out", str(out), "--no-progress", "--batch-size", "7"]) == 0
    tables = [read_back(out) for out in outputs]
    assert len(tables[0]) == 30
    assert list(tables[0][0]) == columns(("angry", "disgust", "fear", "happy", "sad", "surprise", "neutral"))
    for table in tables[1:]:
        assert len(table) == len(tables[0])
        assert table == tables[0]  # exactly: floats are written with every digit in each format
    row = tables[0][5]
    assert row["frame"] == 5 and row["timestamp"] == pytest.approx(0.5) and row["track"] == tables[0][0]["track"]
    assert row["label"] == "happy" and row["smoothed"] is False and len(row["landmarks"]) == 5
    assert sum(value for key, value in row.items() if key.startswith("p_")) == pytest.approx(1.0, abs=1e-5)


def test_rows_to_stdout_and_the_summary_by_default(video, capsys):
    assert main(["analyze", str(video), "--out", "-", "--no-progress", "--summary"]) == 0
    out, err = capsys.readouterr()
    rows = [json.loads(line) for line in out.splitlines()]
    assert len(rows) == 30 and rows[0]["frame"] == 0  # only rows on stdout: the summary goes to stderr
    assert "dominant" in err and "30 frames, 30 faces" in err
    assert main(["analyze", str(video), "--no-progress"]) == 0  # no output asked for: the summary is printed
    assert "dominant" in capsys.readouterr().out


def test_folder_rows_have_an_empty_track(tmp_path):
    (tmp_path / "in").mkdir()
    cv2.imwrite(str(tmp_path / "in" / "face.png"), canvas(300, 260, [(100, 80, head())]))
    assert main(["analyze", str(tmp_path / "in"), "--out", str(tmp_path / "rows.csv"), "--no-progress"]) == 0
    (row,) = read_back(tmp_path / "rows.csv")
    assert row["track"] is None and row["timestamp"] is None and row["frame"] == 0


def test_annotate_plot_and_summary(video, tmp_path, capsys):
    annotated, plot, summary = tmp_path / "drawn.mp4", tmp_path / "timeline.png", tmp_path / "summary.json"
    code = main(["analyze", str(video), "--annotate", str(annotated), "--plot", str(plot), "--summary",
                 "--summary-json", str(summary), "--no-progress", "--fps", "5"])  # fmt: skip
    assert code == 0
    capture = cv2.VideoCapture(str(annotated))
    count = 0
    while True:
        ok, frame = capture.read()
        if not ok:
            break
        count += 1
        assert frame.shape == (240, 320, 3)
    assert count == 15  # every sampled frame, faces or not
    assert capture.get(cv2.CAP_PROP_FPS) == pytest.approx(5.0)
    assert plot.read_bytes().startswith(b"\x89PNG\r\n\x1a\n")
    document = json.loads(summary.read_text())
    (track,) = document["tracks"]
    assert document["frames"] == 15 and document["faces"] == 15 and document["smoothed"] is False
    assert sum(track["shares"].values()) == pytest.approx(1.0)
    assert track["frames"] == 15 and track["seconds"] == pytest.approx(15 / 5)  # 15 frames at 5 per second
    assert track["first"] == 0.0 and track["last"] == pytest.approx(2.8)
    assert track["dominant"] == "happy"
    printed = capsys.readouterr().out
    assert "dominant" in printed and "happy" in printed


def test_annotated_frames_show_the_faces(analyzer, video, tmp_path):
    pairs = list(analyzer.analyze_frames(video))[:3]
    assert annotate(pairs, tmp_path / "three.avi", analyzer.labels, fps=10) == 3
    frame, rows = pairs[0]
    capture = cv2.VideoCapture(str(tmp_path / "three.avi"))
    ok, drawn = capture.read()
    assert ok
    assert np.abs(drawn.astype(int) - frame.image.astype(int)).mean() > 1  # boxes and bars were drawn


def test_summarize_and_plot_directly(tmp_path):
    labels = ("happy", "sad")

    def row(track, t, p_happy):
        label = "happy" if p_happy >= 0.5 else "sad"
        probs = {"happy": p_happy, "sad": 1 - p_happy}
        return FaceRow("v.mp4", int(t * 4), t, track, (0, 0, 10, 10), None, label, probs[label], probs)

    rows = [row(1, t / 4, 0.9 if t < 3 else 0.2) for t in range(4)] + [row(2, 1.0, 0.1)]
    rows += [FaceRow("a.jpg", 0, None, None, (0, 0, 9, 9), None, "sad", 0.8, {"happy": 0.2, "sad": 0.8})]
    one, two, still = summarize(rows, labels)
    assert (one.track, one.frames, one.seconds, one.dominant) == (1, 4, pytest.approx(1.0), "happy")
    assert one.shares == pytest.approx({"happy": 0.75, "sad": 0.25})
    assert (two.track, two.frames, two.seconds, two.dominant) == (2, 1, pytest.approx(0.25), "sad")
    assert (still.track, still.seconds, still.frames, still.dominant) == (None, None, 1, "sad")
    assert summarize(rows, labels, frame_interval=0.5)[0].seconds == pytest.approx(2.0)
    assert plot_timeline(rows, tmp_path / "t.png", labels).read_bytes()[:4] == b"\x89PNG"


def test_options_and_outputs_are_checked():
    with pytest.raises(AnalyzeError, match="unknown output format"):
        check_output("rows.xlsx")
    assert check_output("-") == ".jsonl"
    with pytest.raises(AnalyzeError, match="fps"):
        AnalyzeOptions(fps=-1)
    with pytest.raises(AnalyzeError, match="smooth"):
        AnalyzeOptions(smooth=1.5)
    assert AnalyzeOptions().model == "mini_xception" and AnalyzeOptions().detector == "yunet"


# --- the command line: bad input exits 2 with one line --------------------------------------------------


@pytest.mark.parametrize(
    "case, message",
    [
        ("missing", "no such file"),
        ("unreadable", "cannot open|no frame"),
        ("zero_frames", "no frame"),
        ("extension", "unknown output format"),
        ("model", "unknown model"),
        ("plot_image", "needs a video"),
    ],
)
def test_bad_input_exits_2_with_a_message(case, message, video, tmp_path, capsys):
    fake = tmp_path / "fake.mp4"
    fake.write_bytes(b"\x00\x01 not a video at all" * 10)
    image = tmp_path / "face.jpg"
    cv2.imwrite(str(image), canvas(200, 200, [(50, 50, head())]))
    zero = tmp_path / "zero.avi"
    cv2.VideoWriter(str(zero), cv2.VideoWriter_fourcc(*"MJPG"), 10, (64, 48)).release()
    argv = {
        "missing": [str(tmp_path / "nothing.mp4")],
        "unreadable": [str(fake), "--out", str(tmp_path / "rows.jsonl")],
        "zero_frames": [str(zero), "--out", str(tmp_path / "rows.jsonl")],
        "extension": [str(video), "--out", str(tmp_path / "rows.xlsx")],
        "model": [str(video), "--model", "vgg"],
        "plot_image": [str(image), "--plot", str(tmp_path / "t.png")],
    }[case]
    assert main(["analyze", *argv, "--no-progress"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("mien analyze: ")
    assert pytest.importorskip("re").search(message, err[-1])
    assert not (tmp_path / "rows.xlsx").exists() and not (tmp_path / "rows.jsonl").exists()  # refused before work


# --- memory: bounded by the batch, not by the video ----------------------------------------------------

LONG_VIDEO_SCRIPT = textwrap.dedent(
    """
    import json, resource, sys
    from pathlib import Path
    from mien.service.analysis import AnalyzeOptions, Analyzer, open_writer


    def peak_kb():
        # This process's own peak RSS. ru_maxrss survives fork and exec, so a child of a big process (pytest with
        # torch loaded) would report its parent's peak; VmHWM belongs to the address space exec made.
        try:
            with open("/proc/self/status") as status:
                return next(int(line.split()[1]) for line in status if line.startswith("VmHWM:"))
        except (OSError, StopIteration):
            return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss


    video, out, models = sys.argv[1], sys.argv[2], Path(sys.argv[3])
    analyzer = Analyzer.load(models, AnalyzeOptions(batch_size=16), providers=("CPUExecutionProvider",))
    peaks, frames, faces = {"start": peak_kb()}, 0, 0
    with open_writer(out, analyzer.labels) as writer:
        for frame, rows in analyzer.analyze_frames(video):
            writer.write(rows)
            frames += 1
            faces += len(rows)
            if frames == 400:  # warmed up: every buffer, arena and plan is in place
                peaks["early"] = peak_kb()
    peaks["end"] = peak_kb()
    print(json.dumps({"frames": frames, "faces": faces, **peaks}))
    """
)


def test_a_long_video_is_analysed_in_bounded_memory(tmp_path):
    """3000 frames (about 250 MB decoded): the process's peak RSS after the whole video stays where it was after
    the first 400 frames; holding the frames (or the rows) would raise it by a couple of hundred megabytes."""
    face = head(56)
    frames = (canvas(192, 144, [(10 + (i * 3) % 110, 30 + (i // 40) % 2 * 20, face)]) for i in range(3000))
    path = write_video(tmp_path / "long.mp4", frames, fps=25)
    script = tmp_path / "long.py"
    script.write_text(LONG_VIDEO_SCRIPT)
    result = subprocess.run([sys.executable, str(script), str(path), str(tmp_path / "rows.jsonl"), str(MODELS)],
                            capture_output=True, text=True, timeout=300, cwd=ROOT)  # fmt: skip
    assert result.returncode == 0, result.stderr[-2000:]
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert report["frames"] == 3000
    assert report["faces"] >= 2700  # the face is found in (almost) every frame, so rows are made throughout
    assert report["early"] > report["start"]  # the measure sees this process's own growth (frames, arenas)
    grown_mb = (report["end"] - report["early"]) / 1024  # kilobytes
    assert grown_mb < 25, report
    assert report["end"] / 1024 < 700, report
