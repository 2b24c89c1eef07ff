"""Scale-out with real parts: two ``mien serve`` replicas behind Debian's HAProxy running the shipped
deploy/haproxy/haproxy.cfg, and one replica stopped under load.

Each failover test starts two replicas (one onnxruntime thread each, the bundled mini_xception and YuNet) on free
loopback ports and HAProxy in front, waits until HAProxy reports both UP, and sends ``TOTAL`` POST /predict
(scikit-image's astronaut) through the proxy from ``CONCURRENCY`` threads. After ``KILL_AFTER`` answers one
replica is stopped: SIGKILL (the process vanishes mid-request) or SIGTERM (uvicorn's graceful stop). Checked:
every request got an answer; a request failed only if it was in flight at the signal, and then with HAProxy's
mien-shaped error body; every request sent after the replica was gone succeeded, and the survivor's own
/metrics counted at least those; both replicas served before the signal; HAProxy marked the stopped one DOWN.
A last test checks the errors HAProxy answers itself when no replica is in the rotation.

The figures (requests, in flight at the signal, failures, HAProxy's retries and redispatches, answers per
replica) are printed; ``pytest -s`` shows them. Nothing here times anything: every wait is bounded in count
and time only so that a broken setup fails instead of hanging.
"""

from __future__ import annotations

import contextlib
import os
import signal
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from benchmarks.bench_replicas import SERVERS, Replica, find_haproxy, haproxy, model_folder
from benchmarks.detect_photos import real_photo
from benchmarks.server_load import jpeg
from mien.client import MienClient, MienError

TOTAL = 300  # POST /predict requests per failover test
CONCURRENCY = 8  # client threads, each with its own keep-alive connection to the proxy
KILL_AFTER = 100  # answers received before a replica is stopped
LOAD_TIMEOUT = 600.0  # seconds the whole load may take before the test gives up (a bound, not a measurement)
HAPROXY_ERROR_CODES = {502: "bad_gateway", 503: "busy", 504: "timeout"}  # the http-error bodies of haproxy.cfg


@pytest.fixture(scope="module")
def haproxy_path() -> str:
    path = find_haproxy()
    if path is None:
        message = "no haproxy on this machine: `apt-get install haproxy` (scripts/test.sh does it when run as root)"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    return path


@pytest.fixture(scope="module")
def photo() -> bytes:
    return jpeg(real_photo("astronaut"))  # 512×512, one face, ~68 KB: fits HAProxy's 256 KiB retry buffer


@dataclass
class Answer:
    index: int
    started: float  # time.monotonic()
    ended: float
    status: int | None  # None: the client got no HTTP answer (the exception is in `detail`)
    detail: str = ""  # the error code of a non-200 JSON body, or the exception's class and message


class Load:
    """``total`` POST /predict from ``concurrency`` threads; every request's start, end and outcome."""

    def __init__(self, url: str, body: bytes, total: int, concurrency: int) -> None:
        self.url, self.body, self.total = url, body, total
        self.lock = threading.Lock()
        self.answers: list[Answer] = []
        self.running: dict[int, float] = {}  # index -> start, for the requests sent and not yet answered
        self._next = 0
        self._threads = [threading.Thread(target=self._work, daemon=True) for _ in range(concurrency)]

    def start(self) -> Load:
        for thread in self._threads:
            thread.start()
        return self

    def _work(self) -> None:
        with httpx.Client(base_url=self.url, timeout=120) as client:
            while True:
                with self.lock:
                    if self._next >= self.total:
                        return
                    index, self._next = self._next, self._next + 1
                    started = self.running[index] = time.monotonic()
                try:
                    response = client.post("/predict", files={"file": ("astronaut.jpg", self.body, "image/jpeg")})
                    status, detail = response.status_code, "" if response.status_code == 200 else error_code(response)
                except httpx.HTTPError as exc:
                    status, detail = None, f"{type(exc).__name__}: {exc}"
                with self.lock:
                    del self.running[index]
                    self.answers.append(Answer(index, started, time.monotonic(), status, detail))

    def wait_answered(self, count: int, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while len(self.answers) < count:
            assert time.monotonic() < deadline, f"only {len(self.answers)} of {count} answers in {timeout:.0f} s"
            time.sleep(0.01)

    def join(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        for thread in self._threads:
            thread.join(max(0.0, deadline - time.monotonic()))
        assert not any(t.is_alive() for t in self._threads), f"the load did not finish within {timeout:.0f} s"


def error_code(response: httpx.Response) -> str:
    """The ``error.code`` of a mien-shaped error body (the service's or haproxy.cfg's), else the body's start."""
    with contextlib.suppress(ValueError, KeyError, TypeError):
        return response.json()["error"]["code"]
    return response.text[:200]


@contextlib.contextmanager
def two_replicas_behind_haproxy(tmp_path: Path):
    """Two replicas and HAProxy in front, both replicas UP; everything stopped on exit, whatever happened."""
    models = model_folder(tmp_path / "models")
    with contextlib.ExitStack() as stack:
        replicas = [Replica(models, tmp_path / f"replica{i + 1}.log", threads=1) for i in range(2)]
        for replica in replicas:
            stack.callback(replica.stop, signal.SIGKILL, 10.0)  # if entering the other one fails
            replica.start()  # both load their models at the same time
        for replica in replicas:
            stack.enter_context(replica)
        proxy = stack.enter_context(haproxy([r.address for r in replicas], tmp_path / "haproxy"))
        proxy.wait_status(dict.fromkeys(SERVERS, "UP"))
        yield replicas, proxy


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGTERM], ids=["sigkill", "sigterm"])
def test_a_stopped_replica_loses_no_request_beyond_those_in_flight(haproxy_path, photo, tmp_path, sig):
    with two_replicas_behind_haproxy(tmp_path) as (replicas, proxy):
        victim, survivor = replicas
        victim_name, survivor_name = SERVERS
        load = Load(proxy.url, photo, TOTAL, CONCURRENCY).start()
        load.wait_answered(KILL_AFTER, timeout=LOAD_TIMEOUT)

        served_before = {name: replica.predictions() for name, replica in zip(SERVERS, replicas, strict=True)}
        # With the lock held no request starts and none is recorded as answered: whatever HAProxy forwards from
        # the victim after this snapshot is one of `in_flight` or was sent after the signal.
        with load.lock:
            in_flight = set(load.running)
            stats_before = proxy.stats()
            signalled = time.monotonic()
            victim.process.send_signal(sig)
        victim.process.wait(60)
        gone = time.monotonic()
        down = proxy.wait_status({victim_name: "DOWN", survivor_name: "UP"}, timeout=60)
        marked_down_after = time.monotonic() - signalled

        load.join(LOAD_TIMEOUT)
        stats = proxy.stats()
        survivor_served = survivor.predictions()
        # A client through the proxy after all this: the survivor answers, with the face.
        with MienClient(proxy.url, timeout=60) as client:
            assert len(client.predict(photo).faces) == 1

    answers = sorted(load.answers, key=lambda a: a.index)
    failed = [a for a in answers if a.status != 200]
    started_after = [a for a in answers if a.started > gone]
    started_between = [a for a in answers if signalled <= a.started <= gone]
    lb_2xx_before = {name: int(stats_before[name]["hrsp_2xx"] or 0) for name in SERVERS}
    lb_2xx = {name: int(stats[name]["hrsp_2xx"] or 0) for name in SERVERS}
    figures = {
        "signal": sig.name,
        "requests": TOTAL,
        "concurrency": CONCURRENCY,
        "answered before the signal": len([a for a in answers if a.ended < signalled]),
        "in flight at the signal": len(in_flight),
        "sent between the signal and the process's end": len(started_between),
        "sent after the replica was gone": len(started_after),
        "failed": len(failed),
        "failures": [(a.index, a.status, a.detail) for a in failed],
        "retries (HAProxy wretr)": int(stats["BACKEND"]["wretr"] or 0),
        "redispatches (HAProxy wredis)": int(stats["BACKEND"]["wredis"] or 0),
        "200s per replica just before the signal (their /metrics)": served_before,
        "200s per replica at the signal (HAProxy hrsp_2xx)": lb_2xx_before,
        "200s per replica in all (HAProxy hrsp_2xx)": lb_2xx,
        "HAProxy marked it DOWN, seconds after the signal (not asserted)": round(marked_down_after, 2),
        "victim status": down[victim_name]["status"],
        "victim exit code": victim.process.returncode,
    }
    print("\nfailover figures: " + "; ".join(f"{key}: {value}" for key, value in figures.items()))

    # Every request got an answer: a status or a recorded client-side exception.
    assert sorted(a.index for a in answers) == list(range(TOTAL))
    # Both replicas took traffic while both were up (their own counters and HAProxy's agree on that).
    assert all(n > 0 for n in served_before.values()), served_before
    assert all(n > 0 for n in lb_2xx_before.values()), lb_2xx_before
    # A request failed only if it was in flight when the replica was stopped, and then with a clear error:
    # HAProxy's mien-shaped 502/503/504 body, or an exception the client saw (HAProxy closes a keep-alive client
    # connection without an answer when the replica vanished mid-request). "In flight at the kill" is sent before
    # the process was gone and unanswered at the signal: a SIGKILLed process still takes connections into its
    # listening socket while the kernel tears it down.
    in_flight_at_kill = in_flight | {a.index for a in started_between}
    assert len(failed) <= len(in_flight_at_kill)
    for answer in failed:
        assert answer.index in in_flight_at_kill, f"request {answer.index} failed but was not in flight at the kill"
        assert answer.status is None or HAPROXY_ERROR_CODES.get(answer.status) == answer.detail, answer
    # Every request sent once the replica was gone succeeded, and the survivor served them all.
    assert started_after, "the load ended before the replica was gone: raise TOTAL"
    assert all(a.status == 200 for a in started_after)
    assert survivor_served - served_before[survivor_name] >= len(started_after)
    # HAProxy forwarded every 200 the clients got, and the stopped replica answered none sent after the signal
    # (beyond those in flight then and, for SIGTERM, those it took during its graceful stop).
    # HAProxy counts a 2xx when the status line arrives: a replica killed while sending the body leaves one counted
    # that its client saw fail, so the two counts may differ by at most the failed requests.
    got_200 = sum(a.status == 200 for a in answers)
    assert got_200 <= sum(lb_2xx.values()) <= got_200 + len(failed)
    assert lb_2xx[victim_name] <= lb_2xx_before[victim_name] + len(in_flight) + len(started_between)
    assert lb_2xx[survivor_name] == survivor_served


def test_haproxy_answers_its_own_errors_in_mien_shape(haproxy_path, photo, tmp_path):
    """No replica in the rotation: /predict gets HAProxy's 503 in mien's error body with Retry-After (which
    MienClient retries as it does the service's busy), and /lb/ready says so; back in, both answer 200."""
    with two_replicas_behind_haproxy(tmp_path) as (_, proxy):
        assert httpx.get(f"{proxy.url}/lb/ready", timeout=10).status_code == 200
        for name in SERVERS:
            proxy.set_state(name, "maint")
        proxy.wait_status(dict.fromkeys(SERVERS, "MAINT"))
        response = httpx.post(f"{proxy.url}/predict", files={"file": ("a.jpg", photo, "image/jpeg")}, timeout=60)
        assert response.status_code == 503
        assert response.headers["content-type"] == "application/json"
        assert response.headers["retry-after"] == "1"
        assert response.json()["error"]["code"] == "busy"
        assert httpx.get(f"{proxy.url}/lb/ready", timeout=10).status_code == 503
        with MienClient(proxy.url, timeout=60, max_retries=1, backoff=0.01) as client:
            with pytest.raises(MienError) as error:
                client.predict(photo)
        assert (error.value.status, error.value.code) == (503, "busy")

        for name in SERVERS:
            proxy.set_state(name, "ready")
        proxy.wait_status(dict.fromkeys(SERVERS, "UP"))
        assert httpx.get(f"{proxy.url}/lb/ready", timeout=10).status_code == 200
        with MienClient(proxy.url, timeout=60) as client:
            assert len(client.predict(photo).faces) == 1
