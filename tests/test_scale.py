"""``mien analyze --ray`` (mien.service.scale): the still images of a folder analysed by Ray Data actors on a
local Ray instance with 2 workers give the single-process run's rows, row for row; the CLI writes them; a video
is refused. Behaviour only, never wall-clock time. One Ray instance for the module, shut down at the end."""

from __future__ import annotations

import json
from pathlib import Path

import cv2
import numpy as np
import pytest

pytest.importorskip("ray.data")

from mien.cli import main  # noqa: E402
from mien.service.analysis import AnalyzeError, AnalyzeOptions, Analyzer  # noqa: E402
from mien.service.scale import RayAnalyzer, connected, image_items  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
MODELS = ROOT / "models"
CPU = ("CPUExecutionProvider",)
# Ray Data's own DataContext warns of its deprecated fields when it copies itself.
pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning:ray.*")
BATCH = 4  # small batches: 20 images make several blocks, so both actors work and their results interleave


def astronaut() -> np.ndarray:
    from skimage import data

    return cv2.cvtColor(data.astronaut(), cv2.COLOR_RGB2BGR)


def make_folder(root: Path) -> Path:
    """22 files in nested folders: the astronaut resized, cropped, flipped and rotated (one face each), crops with
    no face (her suit, the flag, a grey frame), and one file that is not an image."""
    image = astronaut()
    variants = {
        "a/full.jpg": image,
        "a/small.png": cv2.resize(image, (256, 256), interpolation=cv2.INTER_AREA),
        "a/wide.jpg": cv2.resize(image, (700, 420)),
        "a/b/flipped.jpg": image[:, ::-1],
        "a/b/head.png": image[0:300, 100:360],
        "a/b/c/rot90.jpg": cv2.rotate(image, cv2.ROTATE_90_CLOCKWISE),
        "a/b/c/dark.jpg": (image * 0.6).astype(np.uint8),
        "a/b/c/bright.png": cv2.convertScaleAbs(image, alpha=1.2, beta=20),
        "b/suit.jpg": image[300:512, 0:300],  # no face
        "b/flag.png": image[0:200, 0:120],  # no face
        "b/grey.jpg": np.full((240, 320, 3), 110, np.uint8),  # no face
        "b/two.jpg": np.hstack([image[0:300, 100:360], image[0:300, 100:360][:, ::-1]]),  # two faces
        "c/blur.jpg": cv2.GaussianBlur(image, (9, 9), 3),
        "c/tiny.png": cv2.resize(image, (160, 160), interpolation=cv2.INTER_AREA),
        "c/shift.jpg": np.roll(image, 60, axis=1),
        "c/d/left.jpg": image[:, :300],
        "c/d/right.jpg": image[:, 150:],
        "c/d/gray.png": cv2.cvtColor(cv2.cvtColor(image, cv2.COLOR_BGR2GRAY), cv2.COLOR_GRAY2BGR),
        "c/d/bgr.webp": image[:, :, ::-1],
        "root.bmp": cv2.resize(image, (300, 300)),
        "z/last.jpg": image[50:450, 50:450],
    }
    for name, pixels in variants.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        assert cv2.imwrite(str(path), np.ascontiguousarray(pixels))
    (root / "b" / "broken.jpg").write_bytes(b"not an image at all")  # skipped with a warning, as in process
    return root


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    return make_folder(tmp_path_factory.mktemp("photos"))


@pytest.fixture(scope="module")
def ray_local():
    """A local Ray instance of 2 CPUs for the module (RayAnalyzer and the CLI use it; it is shut down at the end)."""
    with connected("local", workers=2) as ray:
        yield ray
    assert not ray.is_initialized()


@pytest.fixture(autouse=True)
def _cpu_only(monkeypatch):
    monkeypatch.setenv("MIEN_PROVIDERS", "cpu")  # the CLI reads the service's settings


def assert_same_records(expected: list[dict], got: list[dict]) -> None:
    assert len(got) == len(expected)
    for want, row in zip(expected, got, strict=True):
        probabilities = [key for key in want if key.startswith("p_")] + ["score", "detection_score"]
        assert {k: v for k, v in row.items() if k not in probabilities} == {
            k: v for k, v in want.items() if k not in probabilities
        }  # source, frame, box, landmarks, label, ...
        assert [row[k] for k in probabilities] == pytest.approx([want[k] for k in probabilities], abs=1e-6)


def test_two_ray_workers_give_the_single_process_rows(folder, ray_local):
    options = AnalyzeOptions(batch_size=BATCH, threads=1)
    single = Analyzer.load(MODELS, options, providers=CPU)
    expected = [row.record(single.labels) for row in single.analyze(folder)]
    assert len({record["source"] for record in expected}) >= 15  # most images have a face
    assert any(record["source"].endswith("two.jpg") for record in expected)

    spread = RayAnalyzer(MODELS, options, CPU, workers=2)
    got = [row.record(spread.labels) for row in spread.analyze(folder)]
    assert spread.workers == 2
    assert_same_records(expected, got)
    assert not any(Path(record["source"]).name in ("suit.jpg", "grey.jpg", "broken.jpg") for record in got)
    assert all(record["track"] is None and record["timestamp"] is None for record in got)


def test_the_items_follow_the_folder_order_and_a_list_names_images(folder, tmp_path):
    items = image_items(folder)
    assert [item.index for item in items] == list(range(22))
    assert [Path(item.source).relative_to(folder).parts for item in items] == sorted(
        Path(item.source).relative_to(folder).parts for item in items
    )
    listing = tmp_path / "images.txt"
    listing.write_text(f"# two of them\n{folder / 'a/full.jpg'}\n\nfile://{folder / 'b/two.jpg'}\n", encoding="utf-8")
    listed = image_items(listing)
    assert [(item.index, item.path) for item in listed] == [(0, str(folder / "a/full.jpg")),
                                                            (1, str(folder / "b/two.jpg"))]  # fmt: skip
    assert listed[1].source == f"file://{folder / 'b/two.jpg'}"  # the rows name the image as the list does
    listing.write_text("s3://bucket/a.jpg\n", encoding="utf-8")
    with pytest.raises(AnalyzeError, match="local paths and file:// URIs"):
        image_items(listing)


def test_the_cli_writes_the_same_jsonl(folder, ray_local, tmp_path, capsys):
    single_out, ray_out = tmp_path / "single.jsonl", tmp_path / "ray.jsonl"
    common = [str(folder), "--model-dir", str(MODELS), "--batch-size", str(BATCH), "--no-progress"]
    assert main(["analyze", *common, "--out", str(single_out)]) == 0
    assert main(["analyze", *common, "--out", str(ray_out), "--ray", "--workers", "2", "--summary"]) == 0
    captured = capsys.readouterr()
    assert "22 images" in captured.err and "2 Ray actors" in captured.err
    assert "happy" in captured.out  # the summary of the still images
    read = [[json.loads(line) for line in path.read_text().splitlines()] for path in (single_out, ray_out)]
    assert read[0]
    assert_same_records(*read)


def test_a_video_is_refused_with_a_reason(tmp_path, capsys):
    video = tmp_path / "clip.mp4"
    writer = cv2.VideoWriter(str(video), cv2.VideoWriter_fourcc(*"mp4v"), 10, (160, 120))
    for _ in range(3):
        writer.write(np.full((120, 160, 3), 100, np.uint8))
    writer.release()
    assert main(["analyze", str(video), "--model-dir", str(MODELS), "--ray"]) == 2
    assert "not split across Ray" in capsys.readouterr().err
    assert main(["analyze", "0", "--model-dir", str(MODELS), "--ray"]) == 2  # a camera neither
    assert main(["analyze", str(tmp_path), "--annotate", str(tmp_path / "x.mp4"), "--ray"]) == 2
    assert "not available with --ray" in capsys.readouterr().err
    assert main(["analyze", str(video), "--workers", "2"]) == 2  # --workers without --ray
    assert "needs --ray" in capsys.readouterr().err


def test_without_ray_the_message_names_the_extra(folder, monkeypatch, capsys):
    import sys

    monkeypatch.setitem(sys.modules, "ray", None)  # `import ray` now fails as if it were not installed
    assert main(["analyze", str(folder), "--model-dir", str(MODELS), "--ray"]) == 2
    assert "pip install 'mien[scale]'" in capsys.readouterr().err
