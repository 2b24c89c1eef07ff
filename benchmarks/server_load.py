"""The real server driven by an HTTP client, shared by the service benchmarks (bench_service, bench_memory,
bench_replicas): ``mien serve`` in a subprocess, the package photos as JPEG bodies, a concurrent POST /predict
load with its latencies, statuses and the server's resident memory, and the rows that report them.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import cv2
import httpx
import numpy as np
from tqdm import tqdm

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.detect_photos import group, real_photo  # noqa: E402

PHOTOS = ("astronaut", "grace_hopper", "camera", "group", "coffee")


def photos() -> list[tuple[str, np.ndarray]]:
    """The benchmark photos as BGR images: three real faces, a five-face group and a photo with none."""
    return [(name, group().image if name == "group" else real_photo(name)) for name in PHOTOS]


def percentile(sorted_ms: list[float], q: float) -> float:
    return sorted_ms[min(len(sorted_ms) - 1, int(round(q / 100 * (len(sorted_ms) - 1))))]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_ready(process: subprocess.Popen, url: str, log_path: Path, timeout: float = 600.0) -> None:
    """Return once ``url``/ready answers 200; raise if the server process exits first or ``timeout`` passes."""
    deadline = time.monotonic() + timeout
    while True:
        if process.poll() is not None:
            raise RuntimeError(f"mien serve exited with {process.returncode}; see {log_path}")
        with contextlib.suppress(httpx.HTTPError):
            if httpx.get(f"{url}/ready", timeout=2).status_code == 200:
                return
        if time.monotonic() > deadline:
            raise RuntimeError(f"mien serve was not ready within {timeout:.0f} s; see {log_path}")
        time.sleep(0.2)


@contextlib.contextmanager
def server(model_dir: Path, log_path: Path, **env: str) -> Iterator[tuple[str, int]]:
    """``mien serve`` in a subprocess; yields (base URL, pid) once /ready answers 200."""
    port = free_port()
    command = [sys.executable, "-m", "mien.cli", "serve", "--port", str(port),
               "--model-dir", str(model_dir)]  # fmt: skip
    environment = os.environ | {f"MIEN_{key.upper()}": value for key, value in env.items()}
    with open(log_path, "ab") as log:
        process = subprocess.Popen(command, cwd=ROOT, env=environment, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_ready(process, url, log_path)
        yield url, process.pid
    finally:
        terminate(process, 30.0)


def terminate(process: subprocess.Popen, timeout: float) -> None:
    """SIGTERM, and SIGKILL when the process has not ended ``timeout`` seconds later."""
    process.terminate()
    try:
        process.wait(timeout)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait(timeout)


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"no VmRSS for process {pid}")


async def load(url: str, bodies: list[tuple[str, bytes]], concurrency: int, total: int, pid: int | None = None,
               desc: str = "") -> dict:  # fmt: skip
    """``total`` POST /predict requests, ``concurrency`` at a time, photos in turn; latencies and statuses."""
    latencies: list[float] = []
    statuses: dict[int | str, int] = {}
    rss: list[float] = []
    issued = 0
    bar = tqdm(total=total, desc=desc, leave=False, mininterval=1.0)
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(base_url=url, timeout=120, limits=limits) as client:

        async def worker() -> None:
            nonlocal issued
            while issued < total:
                name, body = bodies[issued % len(bodies)]
                issued += 1
                start = time.perf_counter()
                try:
                    response = await client.post("/predict", files={"file": (f"{name}.jpg", body, "image/jpeg")})
                    key: int | str = response.status_code
                except httpx.HTTPError as exc:
                    key = type(exc).__name__
                latencies.append((time.perf_counter() - start) * 1000.0)
                statuses[key] = statuses.get(key, 0) + 1
                bar.update()
                if pid is not None and len(latencies) % 250 == 0:
                    rss.append(rss_mb(pid))

        start = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        wall = time.perf_counter() - start
    bar.close()
    return {"latencies": sorted(latencies), "statuses": statuses, "wall": wall, "rss": rss}


def latency_row(label: str, result: dict) -> str:
    ms = result["latencies"]
    ok = result["statuses"].get(200, 0)
    others = {k: v for k, v in result["statuses"].items() if k != 200}
    return (f"| {label} | {len(ms)} | {percentile(ms, 50):.1f} | {percentile(ms, 95):.1f} | {percentile(ms, 99):.1f} "
            f"| {len(ms) / result['wall']:.1f} | {ok}{' ' + str(others) if others else ''} |")  # fmt: skip


def jpeg(image: np.ndarray) -> bytes:
    return cv2.imencode(".jpg", image, [cv2.IMWRITE_JPEG_QUALITY, 90])[1].tobytes()
