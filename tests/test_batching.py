"""Dynamic micro-batching (service/batching.py): merging, identical results, errors, size cap, wiring.

No test measures time: merging is made deterministic by a wait window far longer than any test
(the batch closes because it is full) or by holding the worker inside a call while requests queue.
"""

from __future__ import annotations

import sys
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest

from mien.ensemble import load_classifier
from mien.runtime import OnnxClassifier
from mien.service.batching import MicroBatcher
from mien.service.exceptions import NotReady
from mien.spec import FER2013_LABELS
from tests.conftest import make_client

CPU = ("CPUExecutionProvider",)
BUNDLED = Path(__file__).resolve().parents[1] / "models"
LONG_WAIT_MS = 600_000  # a batch in these tests closes because it is full, never because the window ran out


class FakeSpec:
    num_classes = len(FER2013_LABELS)


class StubClassifier:
    """Row i of the answer is a function of crop i alone; records the number of crops of every call."""

    spec = FakeSpec()

    def __init__(self, fail_first: int = 0, hold: threading.Event | None = None) -> None:
        self.calls: list[int] = []
        self.fail_first = fail_first
        self.hold = hold  # when set, the first call waits for it

    def predict_crops(self, crops: list[np.ndarray], batch_size: int = 256) -> np.ndarray:
        self.calls.append(len(crops))
        if self.hold is not None and len(self.calls) == 1:
            self.hold.wait()
        if len(self.calls) <= self.fail_first:
            raise RuntimeError("onnxruntime exploded")
        return np.stack([np.full(self.spec.num_classes, float(c.mean()), np.float32) for c in crops])


def crop(value: int, side: int = 8) -> np.ndarray:
    return np.full((side, side, 3), value, np.uint8)


def submit_all(batcher: MicroBatcher, requests: list[list[np.ndarray]]) -> list:
    """Each request from its own thread, all at once; the answers (or exceptions) in request order."""
    with ThreadPoolExecutor(len(requests)) as pool:
        futures = [pool.submit(batcher.predict_crops, crops) for crops in requests]
        return [f.exception() or f.result() for f in futures]


def wait_until(condition, what: str) -> None:
    """Wait (not a timing assertion: only a guard against hanging) until ``condition()`` holds."""
    done = threading.Event()
    for _ in range(6000):
        if condition():
            return
        done.wait(0.01)
    raise AssertionError(f"gave up waiting for {what}")


def awaits_answer(thread_id: int) -> bool:
    """The thread is blocked in ``Future.result``: predict_crops queues a request before it waits for the
    answer, so its request is in the batcher's queue."""
    frame = sys._current_frames().get(thread_id)
    while frame is not None:
        code = frame.f_code
        if code.co_name == "result" and Path(code.co_filename).parts[-2:] == ("futures", "_base.py"):
            return True
        frame = frame.f_back
    return False


def test_concurrent_requests_are_merged_into_one_call():
    stub = StubClassifier()
    batcher = MicroBatcher(stub, max_size=4, max_wait_ms=LONG_WAIT_MS)
    try:
        answers = submit_all(batcher, [[crop(10)], [crop(20)], [crop(30)], [crop(40)]])
    finally:
        batcher.close()
    assert stub.calls == [4]  # four requests, one classifier call
    assert [a[:, 0].tolist() for a in answers] == [[10.0], [20.0], [30.0], [40.0]]  # each got its own row


def test_requests_of_several_faces_keep_their_rows():
    stub = StubClassifier()
    batcher = MicroBatcher(stub, max_size=6, max_wait_ms=LONG_WAIT_MS)
    try:
        answers = submit_all(batcher, [[crop(1), crop(2), crop(3)], [crop(4), crop(5)], [crop(6)]])
    finally:
        batcher.close()
    assert stub.calls == [6]
    assert [a[:, 0].tolist() for a in answers] == [[1.0, 2.0, 3.0], [4.0, 5.0], [6.0]]


@pytest.mark.parametrize("model_file", ["mini_xception.onnx", "stn_cnn.onnx", "ensemble.ensemble.json"])
def test_batched_results_equal_unbatched(model_file):
    classifier = load_classifier(BUNDLED / model_file, CPU)
    rng = np.random.default_rng(0)
    requests = [
        [rng.integers(0, 256, (int(rng.integers(30, 120)), int(rng.integers(30, 120)), 3), np.uint8) for _ in range(n)]
        for n in (1, 3, 2, 2)
    ]
    alone = [classifier.predict_crops(crops) for crops in requests]
    batcher = MicroBatcher(classifier, max_size=8, max_wait_ms=LONG_WAIT_MS)
    sizes: list[int] = []
    batcher.on_batch = sizes.append
    try:
        together = submit_all(batcher, requests)
    finally:
        batcher.close()
    assert sizes == [8]  # all four requests in one call
    for a, b in zip(alone, together, strict=True):
        # Rows of a batch do not influence each other: the networks give the same bits at any batch size, but the
        # calibration inside a calibrated graph (Log, Exp over the whole N × classes tensor, vectorised over the flat
        # buffer) can round a row's last bit differently with the batch size (3e-8 measured): far below any mixing.
        np.testing.assert_allclose(a, b, rtol=0, atol=1e-6)
        assert (a.argmax(1) == b.argmax(1)).all()


def test_an_error_reaches_every_request_of_the_batch_and_the_worker_survives():
    stub = StubClassifier(fail_first=1)
    batcher = MicroBatcher(stub, max_size=3, max_wait_ms=LONG_WAIT_MS)
    try:
        answers = submit_all(batcher, [[crop(1)], [crop(2)], [crop(3)]])
        assert stub.calls == [3]
        assert all(isinstance(a, RuntimeError) and "exploded" in str(a) for a in answers)
        again = submit_all(batcher, [[crop(7)], [crop(8), crop(9)]])  # the next batch is served
    finally:
        batcher.close()
    assert [a[:, 0].tolist() for a in again] == [[7.0], [8.0, 9.0]]
    assert stub.calls == [3, 3]


def test_batches_never_exceed_the_maximum_size():
    hold = threading.Event()
    stub = StubClassifier(hold=hold)
    batcher = MicroBatcher(stub, max_size=4, max_wait_ms=0)
    sizes = [2, 1, 2, 1, 2, 2]  # any two neighbours in the queue fit in one batch, whatever order they queue in
    values = iter(range(1, 100))
    requests = [[crop(next(values)) for _ in range(n)] for n in sizes]
    try:
        with ThreadPoolExecutor(len(requests) + 1) as pool:
            first = pool.submit(batcher.predict_crops, [crop(99)])
            wait_until(lambda: stub.calls == [1], "the first call to start")  # the worker is now held in it
            callers: list[int] = []

            def ask(crops: list[np.ndarray]) -> np.ndarray:
                callers.append(threading.get_ident())
                return batcher.predict_crops(crops)

            futures = [pool.submit(ask, crops) for crops in requests]
            wait_until(lambda: len(callers) == len(requests) and all(map(awaits_answer, callers)),
                       "every request to queue")  # fmt: skip
            hold.set()
            answers = [f.result() for f in futures]
            assert first.result()[:, 0].tolist() == [99.0]
    finally:
        batcher.close()
    later = stub.calls[1:]
    assert all(n <= 4 for n in later) and sum(later) == sum(sizes)
    assert len(later) <= (len(requests) + 1) // 2  # every batch but maybe the last merged two or more requests
    for crops, answer in zip(requests, answers, strict=True):
        assert answer[:, 0].tolist() == [float(c.mean()) for c in crops]


class SpyClassifier(OnnxClassifier):
    """The real classifier, recording the batch of every onnxruntime call."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.batches: list[int] = []

    def __call__(self, batch: np.ndarray) -> np.ndarray:
        self.batches.append(len(batch))
        return super().__call__(batch)


def test_a_request_larger_than_the_maximum_runs_in_calls_of_at_most_the_maximum():
    classifier = SpyClassifier(OnnxClassifier.from_path(BUNDLED / "mini_xception.onnx", CPU).session)
    recorded: list[int] = []
    batcher = MicroBatcher(classifier, max_size=4, max_wait_ms=LONG_WAIT_MS, on_batch=recorded.append)
    faces = [crop(v, 48) for v in range(10)]
    try:
        answer = batcher.predict_crops(faces)
    finally:
        batcher.close()
    assert classifier.batches == [4, 4, 2] and recorded == [4, 4, 2]
    assert np.array_equal(answer, classifier.predict_crops(faces))


def test_close_stops_the_worker_and_refuses_new_requests():
    batcher = MicroBatcher(StubClassifier(), max_size=2, max_wait_ms=0)
    assert batcher.predict_crops([crop(5)])[:, 0].tolist() == [5.0]
    batcher.close()
    assert not batcher.running
    with pytest.raises(NotReady):
        batcher.predict_crops([crop(5)])
    assert batcher.predict_crops([]).shape == (0, len(FER2013_LABELS))  # no face: no call at all


# --- wired into the service -------------------------------------------------------------------------


def batch_metric(client, model: str) -> tuple[float, float]:
    """(number of calls, faces in them) from the mien_batch_size histogram."""
    text = client.get("/metrics").text
    values = {}
    for line in text.splitlines():
        for kind in ("count", "sum"):
            if line.startswith(f'mien_batch_size_{kind}{{model="{model}"}}'):
                values[kind] = float(line.split()[-1])
    return values.get("count", 0.0), values.get("sum", 0.0)


def test_concurrent_predict_requests_share_one_classifier_call(model_dir, astronaut_jpeg):
    with make_client(model_dir, batch_max_size=4, batch_max_wait_ms=1000) as client:
        batcher = client.app.state.models.get("mini_xception").batcher
        assert batcher is not None and batcher.running and batcher.max_size == 4 and batcher.max_wait == 1.0
        batcher.max_wait = LONG_WAIT_MS / 1000  # beyond the settings' cap: the batch must close because it is full

        def post(_):
            files = {"file": ("a.jpg", astronaut_jpeg, "image/jpeg")}
            return client.post("/predict?detect=false", files=files)

        with ThreadPoolExecutor(4) as pool:
            responses = list(pool.map(post, range(4)))
        assert [r.status_code for r in responses] == [200] * 4
        probabilities = [r.json()["faces"][0]["probabilities"] for r in responses]
        assert all(p == probabilities[0] for p in probabilities)  # same photo, same answer, whatever the batch
        assert batch_metric(client, "mini_xception") == (1.0, 4.0)  # one call of four faces, recorded as such
    assert not batcher.running  # the lifespan's shutdown stopped the worker


def test_batching_can_be_switched_off(model_dir, astronaut_jpeg):
    with make_client(model_dir, batching=False) as client:
        assert client.app.state.models.get("mini_xception").batcher is None
        response = client.post("/predict?detect=false", files={"file": ("a.jpg", astronaut_jpeg, "image/jpeg")})
        assert response.status_code == 200
        assert batch_metric(client, "mini_xception") == (1.0, 1.0)  # the per-request call is still recorded


def test_batched_and_unbatched_service_answer_alike(model_dir, astronaut_jpeg):
    files = {"file": ("a.jpg", astronaut_jpeg, "image/jpeg")}
    answers = []
    for batching in (True, False):
        with make_client(model_dir, batching=batching, detector="haar") as client:
            response = client.post("/predict", files=files)
            assert response.status_code == 200 and response.json()["faces"]
            answers.append([(f["box"], f["probabilities"]) for f in response.json()["faces"]])
    assert answers[0] == answers[1]
