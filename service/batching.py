"""Dynamic micro-batching: face crops from concurrent /predict requests share one classifier call.

/predict runs in worker threads (a plain ``def`` route), so each served model gets one
:class:`MicroBatcher`: a queue and one worker thread. A request hands over its crops and blocks on a
future; the worker takes the oldest waiting request, then keeps adding waiting requests until the batch
holds ``max_size`` crops or ``max_wait_ms`` have passed since it started collecting, runs the classifier
once and hands every request its own rows back. A lone request therefore waits at most ``max_wait_ms``
longer than without batching; under load, many small calls become a few large ones, which onnxruntime
runs at a lower cost per face.

A request's crops are never split between batches unless the request alone holds more than
``max_size`` crops; it then runs on its own, in calls of at most ``max_size``. An exception in a
batch is raised in every request of that batch. Results are the unbatched results: each crop is
preprocessed on its own, and the classifier treats the rows of a batch independently.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np

from mien.service.exceptions import NotReady
from mien.spec import PreprocessSpec

log = logging.getLogger(__name__)


class CropClassifier(Protocol):
    """What the batcher needs of a model: :class:`mien.runtime.OnnxClassifier` and the ensemble both qualify."""

    spec: PreprocessSpec

    def predict_crops(self, crops: list[np.ndarray], batch_size: int = ...) -> np.ndarray: ...


@dataclass
class _Job:
    crops: list[np.ndarray]
    future: Future = field(default_factory=Future)


class MicroBatcher:
    """Merges the crops of concurrent ``predict_crops`` calls into classifier calls of at most ``max_size``.

    ``on_batch(n)`` is called with the number of crops of every classifier call (for the batch-size
    metric). :meth:`close` lets the worker finish the waiting requests and stops it.
    """

    def __init__(
        self,
        classifier: CropClassifier,
        max_size: int = 32,
        max_wait_ms: float = 2.0,
        on_batch: Callable[[int], None] | None = None,
        name: str = "",
    ) -> None:
        if max_size < 1 or max_wait_ms < 0:
            raise ValueError(f"max_size must be >= 1 and max_wait_ms >= 0, got {max_size} and {max_wait_ms}")
        self.classifier = classifier
        self.spec = classifier.spec
        self.max_size = max_size
        self.max_wait = max_wait_ms / 1000.0
        self.on_batch = on_batch
        self.name = name or str(getattr(classifier, "model_id", "model"))
        self._jobs: deque[_Job] = deque()
        self._cond = threading.Condition()
        self._closed = False
        self._thread = threading.Thread(target=self._work, name=f"mien-batcher-{self.name}", daemon=True)
        self._thread.start()

    @property
    def running(self) -> bool:
        return self._thread.is_alive()

    def predict_crops(self, crops: list[np.ndarray], batch_size: int | None = None) -> np.ndarray:
        """Probabilities (N × labels) for raw face crops, computed in a batch shared with other requests.

        ``batch_size`` is accepted for the classifier interface and ignored: the batcher's ``max_size`` rules.
        """
        if not crops:
            return np.zeros((0, self.spec.num_classes), dtype=np.float32)
        job = _Job(list(crops))
        with self._cond:
            if self._closed:
                raise NotReady(f"model {self.name!r} is shutting down; retry on another instance")
            self._jobs.append(job)
            self._cond.notify()
        return job.future.result()

    def close(self, timeout: float | None = 10.0) -> None:
        """Stop taking requests, let the worker answer the ones already waiting, and wait for it to end."""
        with self._cond:
            self._closed = True
            self._cond.notify_all()
        self._thread.join(timeout)
        if self._thread.is_alive():
            log.warning("batcher %s did not stop within %.0f s", self.name, timeout or 0)

    def _next_batch(self) -> list[_Job] | None:
        """The next batch to run, or None once closed with nothing left to do."""
        with self._cond:
            while not self._jobs and not self._closed:
                self._cond.wait()
            if not self._jobs:
                return None
            batch = [self._jobs.popleft()]
            size = len(batch[0].crops)
            deadline = time.monotonic() + self.max_wait
            while size < self.max_size:
                if self._jobs:
                    if size + len(self._jobs[0].crops) > self.max_size:
                        break  # the next request waits for the next batch rather than being split
                    job = self._jobs.popleft()
                    batch.append(job)
                    size += len(job.crops)
                    continue
                remaining = deadline - time.monotonic()
                if remaining <= 0 or self._closed:
                    break
                self._cond.wait(remaining)
            return batch

    def _work(self) -> None:
        while (batch := self._next_batch()) is not None:
            self._run(batch)

    def _run(self, batch: list[_Job]) -> None:
        crops = [crop for job in batch for crop in job.crops]
        try:
            probabilities = self.classifier.predict_crops(crops, batch_size=self.max_size)
        except BaseException as exc:  # every waiting request must hear of it, and the worker must live on
            log.exception("batch of %d faces from %d requests failed on %s", len(crops), len(batch), self.name)
            for job in batch:
                job.future.set_exception(exc)
            return
        start = 0
        for job in batch:
            job.future.set_result(probabilities[start : start + len(job.crops)])
            start += len(job.crops)
        if self.on_batch is not None:
            try:
                for first in range(0, len(crops), self.max_size):  # the calls predict_crops made
                    self.on_batch(min(self.max_size, len(crops) - first))
            except Exception:
                log.exception("recording the batch size of %s failed", self.name)
