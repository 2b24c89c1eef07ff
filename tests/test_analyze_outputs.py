"""``mien analyze``'s outputs (jsonl, csv, parquet, stdout, annotated video, timeline plot, summary), its
command line's refusals (exit 2 with one line) and its memory, bounded by the batch and not by the video's
length; with the bundled mini_xception and YuNet on generated videos. Behaviour only, never wall-clock time."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import cv2
import numpy as np
import pytest

from mien.cli import main
from mien.service.analysis import (
    AnalyzeError,
    AnalyzeOptions,
    FaceRow,
    annotate,
    check_output,
    columns,
    plot_timeline,
    summarize,
)
from tests.video_helpers import MODELS, ROOT, canvas, head, read_back, write_video


@pytest.fixture(autouse=True)
def _cpu_only(monkeypatch):
    monkeypatch.setenv("MIEN_PROVIDERS", "cpu")  # the CLI reads the service's settings


# --- outputs ----------------------------------------------------------------------------------------------


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
