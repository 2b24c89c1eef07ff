"""Shared fixtures: a tiny generated FER-like data set, a model trained on it by the project's own
training loop, and that model exported by the project's own export into a model folder."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pytest

from mien.spec import FER2013_LABELS

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "fer2013.npz"


def make_faces(per_class: int, rng: np.random.Generator, side: int = 48) -> tuple[np.ndarray, np.ndarray]:
    """Noisy 48×48 images whose class sets their brightness: learnable in a few epochs by a
    global-average-pooling network whatever the flips, shifts and rotations of augmentation."""
    labels = np.repeat(np.arange(len(FER2013_LABELS)), per_class)
    noise = rng.integers(0, 60, size=(len(labels), side, side))
    return (noise + 28 * labels[:, None, None]).astype(np.uint8), labels


def write_npz(path: Path, train_per_class: int = 150, test_per_class: int = 40, seed: int = 0) -> Path:
    rng = np.random.default_rng(seed)
    train_x, train_y = make_faces(train_per_class, rng)
    test_x, test_y = make_faces(test_per_class, rng)
    np.savez(
        path,
        images=np.concatenate([train_x, test_x]),
        labels=np.concatenate([train_y, test_y]).astype(np.int64),
        split=np.concatenate([np.zeros(len(train_y)), np.ones(len(test_y))]).astype(np.int8),
        split_names=np.array(["train", "public_test"]),
        label_names=np.array(FER2013_LABELS),
    )
    return path


@pytest.fixture(scope="session")
def tiny_npz(tmp_path_factory) -> Path:
    return write_npz(tmp_path_factory.mktemp("data") / "tiny.npz")


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory, tiny_npz) -> Path:
    """A run folder from `train()` on the tiny data: best.pt, last.pt, history, curves."""
    from mien.training.train import TrainConfig, train

    out = tmp_path_factory.mktemp("run")
    train(TrainConfig(data=str(tiny_npz), out=str(out), epochs=3, batch_size=32, lr=2e-3, warmup_epochs=1, threads=1))
    return out


@pytest.fixture(scope="session")
def model_dir(tmp_path_factory, tiny_run, tiny_npz) -> Path:
    """A model folder holding mini_xception.onnx + card, made by the project's export."""
    from mien.export.onnx_export import ExportConfig, export_checkpoint

    folder = tmp_path_factory.mktemp("models")
    result = export_checkpoint(
        ExportConfig(
            checkpoint=str(tiny_run / "best.pt"),
            out=str(folder / "mini_xception.onnx"),
            data=str(tiny_npz),
            parity_faces=256,
        )  # fmt: skip
    )
    assert result.passed, result
    return folder


CPU = ("CPUExecutionProvider",)


def make_client(model_dir: Path, **overrides):
    """A TestClient of a fresh app serving ``model_dir`` on the CPU provider unless told otherwise."""
    from fastapi.testclient import TestClient

    from mien.service.config import Settings
    from mien.service.main import create_app

    return TestClient(create_app(Settings(model_dir=model_dir, providers=overrides.pop("providers", CPU), **overrides)))


@pytest.fixture(scope="module")
def client(model_dir: Path):
    with make_client(model_dir) as c:
        yield c


@pytest.fixture(scope="module")
def astronaut_jpeg() -> bytes:
    """scikit-image's astronaut (one smiling face) as JPEG bytes."""
    import cv2
    from skimage import data

    return cv2.imencode(".jpg", cv2.cvtColor(data.astronaut(), cv2.COLOR_RGB2BGR))[1].tobytes()


#: Seconds a test waits for a condition before it fails (never reached when the code is right).
WAIT = 60


class Gate:
    """Holds every /predict inside the route's dependencies until ``release`` is set; counts the requests it
    holds, and can make the ones it lets through fail (``fail = True``)."""

    def __init__(self) -> None:
        import threading

        self.release = threading.Event()
        self.entered = threading.Semaphore(0)
        self.fail = False

    def hold(self, app) -> None:
        from mien.service.deps import get_detectors

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


def wait_until(condition) -> None:
    """Polls ``condition`` every 10 ms until it holds; fails after WAIT seconds."""
    import threading

    pause = threading.Event()
    for _ in range(WAIT * 100):
        if condition():
            return
        pause.wait(0.01)
    raise AssertionError("condition never became true")


def post_photo(client, photo: bytes):
    """POST /predict with ``photo`` as a JPEG upload."""
    return client.post("/predict", files={"file": ("a.jpg", photo, "image/jpeg")})


@pytest.fixture(autouse=True)
def _quiet_matplotlib():
    logging.getLogger("matplotlib").setLevel(logging.WARNING)


def train_interrupted(cfg, epochs: int, monkeypatch) -> None:
    """Run ``train(cfg)`` and stop it with a KeyboardInterrupt after ``epochs`` epochs, as a lost session would."""
    import mien.training.train as train_module

    real_epoch = train_module.train_one_epoch
    calls = {"n": 0}

    def interrupted(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] > epochs:
            raise KeyboardInterrupt
        return real_epoch(*args, **kwargs)

    monkeypatch.setattr(train_module, "train_one_epoch", interrupted)
    with pytest.raises(KeyboardInterrupt):
        train_module.train(cfg)
    monkeypatch.setattr(train_module, "train_one_epoch", real_epoch)


# --- `mien analyze` (test_analyze.py, test_analyze_outputs.py) ---------------------------------------------------


@pytest.fixture(scope="module")
def analyzer():
    """The bundled default model and detector, on the CPU, for ``mien analyze``."""
    from mien.service.analysis import AnalyzeOptions, Analyzer
    from tests.video_helpers import CPU, MODELS

    return Analyzer.load(MODELS, AnalyzeOptions(), providers=CPU)


@pytest.fixture(scope="module")
def video(tmp_path_factory) -> Path:
    """A 30-frame, 10 fps mp4 of one head moving right by 5 pixels a frame (tests/video_helpers.py)."""
    from tests.video_helpers import moving_face

    return moving_face(tmp_path_factory.mktemp("video") / "moving.mp4")
