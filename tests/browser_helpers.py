"""What the browser tests need besides pytest: a live server on a free port, Debian's Chromium, a fake camera."""

from __future__ import annotations

import os
import shutil
import socket
import threading
import time
from pathlib import Path

import numpy as np

# Debian's package puts it at /usr/bin/chromium; MIEN_CHROMIUM names another binary.
CHROMIUM_NAMES = ("chromium", "chromium-browser", "google-chrome")
# A closed network: no background connections, updates or sync, no QUIC (see the machine notes).
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-dev-shm-usage",
]


def find_chromium() -> str | None:
    configured = os.environ.get("MIEN_CHROMIUM")
    if configured:
        return configured if Path(configured).is_file() else None
    for name in CHROMIUM_NAMES:
        found = shutil.which(name)
        if found:
            return found
    return None


def fake_camera_args(video: Path) -> list[str]:
    """Chromium's fake camera, allowed without a prompt, playing ``video`` (a .y4m) in a loop."""
    return [
        "--use-fake-device-for-media-stream",
        "--use-fake-ui-for-media-stream",
        f"--use-file-for-fake-video-capture={video}",
    ]


def write_y4m(path: Path, rgb: np.ndarray, frames: int = 2, fps: int = 10) -> Path:
    """A YUV4MPEG2 (4:2:0) video of ``frames`` copies of an RGB picture with even sides.

    The format: one text header line, then per frame ``FRAME\\n`` and the Y, U and V planes (U and V at half
    the width and height). BT.601 full-range conversion, as in JPEG.
    """
    height, width = rgb.shape[:2]
    if height % 2 or width % 2:
        raise ValueError(f"4:2:0 needs even sides, got {width}x{height}")
    r, g, b = (rgb[..., i].astype(np.float32) for i in range(3))
    y = 0.299 * r + 0.587 * g + 0.114 * b
    u = -0.168736 * r - 0.331264 * g + 0.5 * b + 128.0
    v = 0.5 * r - 0.418688 * g - 0.081312 * b + 128.0

    def half(plane: np.ndarray) -> np.ndarray:
        return plane.reshape(height // 2, 2, width // 2, 2).mean(axis=(1, 3))

    planes = [np.clip(np.rint(p), 0, 255).astype(np.uint8).tobytes() for p in (y, half(u), half(v))]
    with open(path, "wb") as out:
        out.write(f"YUV4MPEG2 W{width} H{height} F{fps}:1 Ip A1:1 C420jpeg\n".encode("ascii"))
        for _ in range(frames):
            out.write(b"FRAME\n")
            for plane in planes:
                out.write(plane)
    return path


def letterbox(rgb: np.ndarray, width: int, height: int, fill: int = 40) -> np.ndarray:
    """``rgb`` scaled to fit ``width``×``height`` and centred on a grey background (a webcam-shaped frame)."""
    import cv2

    scale = min(width / rgb.shape[1], height / rgb.shape[0])
    w, h = round(rgb.shape[1] * scale), round(rgb.shape[0] * scale)
    frame = np.full((height, width, 3), fill, np.uint8)
    top, left = (height - h) // 2, (width - w) // 2
    frame[top : top + h, left : left + w] = cv2.resize(rgb, (w, h), interpolation=cv2.INTER_AREA)
    return frame


class LiveServer:
    """An ASGI app served by uvicorn in a thread on a free loopback port; a context manager."""

    def __init__(self, app, startup_timeout: float = 120.0) -> None:
        import uvicorn

        self._sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._sock.bind(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self._sock.getsockname()[1]}"
        self._server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="on"))
        self._thread = threading.Thread(target=self._server.run, kwargs={"sockets": [self._sock]}, daemon=True)
        self._timeout = startup_timeout

    def __enter__(self) -> LiveServer:
        self._thread.start()
        deadline = time.monotonic() + self._timeout
        while not self._server.started:
            if not self._thread.is_alive():
                raise RuntimeError("the live server stopped while starting (see the log above)")
            if time.monotonic() > deadline:
                raise TimeoutError(f"the live server did not start within {self._timeout:.0f} s")
            time.sleep(0.05)
        return self

    def __exit__(self, *exc) -> None:
        self._server.should_exit = True
        self._thread.join(timeout=30)
        self._sock.close()
