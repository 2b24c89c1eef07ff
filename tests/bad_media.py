"""Bad and awkward inputs made in code for tests/test_bad_inputs.py: images from scikit-image's astronaut photo
(one face) and coffee photo (none) in every format and shape the catalogue needs, files that claim sizes they do
not have, short videos and a WAV with no picture."""

from __future__ import annotations

import functools
import io
import struct
import tempfile
import wave
import zlib
from pathlib import Path
from typing import Any

import cv2
import numpy as np
from PIL import Image
from skimage import data

# --- images, made in code ------------------------------------------------------------------------


def astronaut() -> np.ndarray:
    return cv2.cvtColor(data.astronaut(), cv2.COLOR_RGB2BGR)


def encode(image: np.ndarray, ext: str, params: tuple[int, ...] = ()) -> bytes:
    ok, buf = cv2.imencode(ext, image, list(params))
    assert ok
    return buf.tobytes()


def pil_bytes(image: Image.Image, fmt: str, **save: Any) -> bytes:
    buf = io.BytesIO()
    image.save(buf, fmt, **save)
    return buf.getvalue()


def astronaut_pil() -> Image.Image:
    return Image.fromarray(data.astronaut())


def png_16bit() -> bytes:
    return encode(astronaut().astype(np.uint16) * 257, ".png")


def png_rgba() -> bytes:
    alpha = np.full((512, 512, 1), 255, np.uint8)
    alpha[:64, :64] = 0  # a transparent corner
    return encode(np.concatenate([astronaut(), alpha], axis=2), ".png")


def gif_animated(face_first: bool) -> bytes:
    face, other = astronaut_pil(), Image.fromarray(data.coffee()).resize((512, 512))
    frames = [face, other] if face_first else [other, face]
    return pil_bytes(frames[0], "GIF", save_all=True, append_images=frames[1:], duration=200, loop=0)


def jpeg_exif(orientation: int) -> bytes:
    """The astronaut stored turned so that EXIF ``orientation`` shows her upright again."""
    stored = {6: cv2.ROTATE_90_COUNTERCLOCKWISE, 3: cv2.ROTATE_180, 8: cv2.ROTATE_90_CLOCKWISE}[orientation]
    turned = cv2.cvtColor(cv2.rotate(astronaut(), stored), cv2.COLOR_BGR2RGB)
    exif = Image.Exif()
    exif[0x0112] = orientation
    return pil_bytes(Image.fromarray(turned), "JPEG", exif=exif, quality=95)


def panorama() -> bytes:
    """10,000 × 512 pixels, the astronaut at x = 7000."""
    canvas = np.full((512, 10_000, 3), 127, np.uint8)
    canvas[:, 7000:7512] = astronaut()
    return encode(canvas, ".jpg")


def _png_chunk(kind: bytes, body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))


def png_claiming(width: int, height: int) -> bytes:
    """A well-formed PNG header (valid CRC) declaring width × height, with a few bytes of pixel data."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    idat = zlib.compress(bytes(1024))
    return b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", ihdr) + _png_chunk(b"IDAT", idat) + _png_chunk(b"IEND", b"")


def jpeg_claiming(width: int, height: int) -> bytes:
    """A real JPEG whose frame header (SOF0) is rewritten to declare width × height."""
    jpeg = bytearray(encode(astronaut(), ".jpg"))
    sof = jpeg.index(b"\xff\xc0")
    jpeg[sof + 5 : sof + 9] = struct.pack(">HH", height, width)
    return bytes(jpeg)


def gif_claiming(width: int, height: int) -> bytes:
    gif = bytearray(pil_bytes(astronaut_pil().resize((16, 16)), "GIF"))
    gif[6:10] = struct.pack("<HH", width, height)
    return bytes(gif)


def garbage() -> bytes:
    return np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8).tobytes()


# --- videos, made in code (cv2.VideoWriter; there is no ffmpeg here to make an audio-only mp4) ----------------


# kind: frames, frames per second, codec, container
VIDEOS = {"face": (30, 10.0, "mp4v", ".mp4"), "blank": (30, 10.0, "mp4v", ".mp4"), "slow": (10, 0.01, "MJPG", ".avi"),
          "zero": (0, 10.0, "MJPG", ".avi")}  # fmt: skip


@functools.cache
def video(kind: str) -> bytes:
    """A short video as bytes: ``face`` (the astronaut's head moving over 320×240, 30 frames at 10 fps, mp4v),
    ``blank`` (the same canvas with no face), ``slow`` (10 MJPG frames at 0.01 fps: an AVI of about 90 KB that
    declares 1000 s), ``zero`` (a valid AVI with no frame)."""
    count, fps, fourcc, suffix = VIDEOS[kind]
    face = cv2.resize(astronaut()[20:220, 125:325], (100, 100), interpolation=cv2.INTER_AREA)
    with tempfile.TemporaryDirectory() as folder:
        path = str(Path(folder) / f"v{suffix}")
        writer = cv2.VideoWriter(path, cv2.VideoWriter_fourcc(*fourcc), fps, (320, 240))
        assert writer.isOpened()
        for i in range(count):
            frame = np.full((240, 320, 3), 110, np.uint8)
            if kind != "blank":
                frame[60:160, 20 + 5 * i : 120 + 5 * i] = face
            writer.write(frame)
        writer.release()
        return Path(path).read_bytes()


def wav() -> bytes:
    """One second of silence, 8 kHz mono: audio with no picture."""
    buf = io.BytesIO()
    with wave.open(buf, "wb") as out:
        out.setnchannels(1)
        out.setsampwidth(2)
        out.setframerate(8000)
        out.writeframes(bytes(16000))
    return buf.getvalue()
