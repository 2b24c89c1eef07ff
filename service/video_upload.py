"""The upload of POST /analyze/video, read as it streams: python-multipart's parser writes the part in the field
``file`` into a temporary file and counts its bytes, so a video is never held in memory whole and one over the
limit is refused as soon as it passes it; a declared type or leading bytes that are not a video's are refused
with 415 (a still image goes to POST /predict)."""

from __future__ import annotations

import logging
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import python_multipart as multipart
from python_multipart.exceptions import FormParserError
from starlette.concurrency import run_in_threadpool
from starlette.formparsers import parse_options_header
from starlette.requests import ClientDisconnect, Request

from mien.service.exceptions import BadMultipart, EmptyFile, MissingFile, TooLarge, TooManyFiles, UnsupportedMediaType
from mien.service.frames import VIDEO_SUFFIXES
from mien.service.imaging import GENERIC_MEDIA_TYPES, sniff_format

log = logging.getLogger(__name__)

FIELD = "file"
#: Leading bytes of audio files: named in the 415 answer so the user knows what they sent.
_AUDIO_SIGNATURES = ((b"ID3", "MP3"), (b"\xff\xfb", "MP3"), (b"\xff\xf3", "MP3"), (b"fLaC", "FLAC"),
                     (b"OggS", "Ogg"), (b"#!AMR", "AMR"))  # fmt: skip
FORMATS = "mp4, webm, mov, avi, mkv, ..."


@dataclass
class ReceivedVideo:
    path: Path
    size: int
    head: bytes  # the first bytes, to tell a still image or audio from a video


class VideoUpload:
    """Callbacks of python-multipart's streaming parser: the part in the field ``file`` goes to a temporary
    file, counted; other fields are skipped unread; a second file is refused."""

    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = max_bytes
        self.header_name = b""
        self.header_value = b""
        self.disposition = b""
        self.content_type = ""
        self.writing = False  # the current part is the video
        self.files = 0
        self.other_fields: list[str] = []
        self.found = False
        self.size = 0
        self.head = b""
        self.pending: list[bytes] = []
        self.path: Path | None = None
        self.stream: IO[bytes] | None = None

    def on_part_begin(self) -> None:
        self.disposition, self.content_type, self.writing = b"", "", False

    def on_header_field(self, data: bytes, start: int, end: int) -> None:
        self.header_name += data[start:end]

    def on_header_value(self, data: bytes, start: int, end: int) -> None:
        self.header_value += data[start:end]

    def on_header_end(self) -> None:
        name = self.header_name.strip().lower()
        if name == b"content-disposition":
            self.disposition = self.header_value
        elif name == b"content-type":
            self.content_type = self.header_value.decode("latin-1").split(";")[0].strip().lower()
        self.header_name = self.header_value = b""

    def on_headers_finished(self) -> None:
        _, options = parse_options_header(self.disposition)
        field = options.get(b"name", b"").decode("utf-8", "replace")
        if b"filename" not in options:
            self.other_fields.append(field)
            return
        self.files += 1
        if self.files > 1:
            raise TooManyFiles(f"the request carries {self.files} files; send one video per request, in the field "
                               f"'{FIELD}'")  # fmt: skip
        if field != FIELD:
            self.other_fields.append(field)
            return
        check_video_media_type(self.content_type)
        self.found = self.writing = True
        suffix = Path(options[b"filename"].decode("utf-8", "replace")).suffix.lower()
        # The name's extension is a hint to FFmpeg's probing; the name itself is never used.
        handle, name = tempfile.mkstemp(prefix="mien-video-", suffix=suffix if suffix in VIDEO_SUFFIXES else "")
        self.path = Path(name)
        self.stream = os.fdopen(handle, "wb")

    def on_part_data(self, data: bytes, start: int, end: int) -> None:
        if not self.writing:
            return
        piece = data[start:end]
        self.size += len(piece)
        if self.size > self.max_bytes:
            raise TooLarge(f"the uploaded video is larger than the limit of {self.max_bytes} bytes "
                           "(MIEN_MAX_VIDEO_BYTES); send a shorter or more compressed video")  # fmt: skip
        if len(self.head) < 64:
            self.head += piece[: 64 - len(self.head)]
        self.pending.append(piece)

    def on_part_end(self) -> None:
        self.writing = False

    def flush(self) -> None:
        """Write what arrived since the last flush (called in a worker thread: disk writes block)."""
        if self.pending and self.stream is not None:
            self.stream.write(b"".join(self.pending))
        self.pending.clear()

    def close(self) -> None:
        if self.stream is not None:
            self.stream.close()
            self.stream = None


def check_video_media_type(content_type: str) -> None:
    """A declared type must be a video's, or say nothing (octet-stream, none): anything else is 415."""
    if content_type in GENERIC_MEDIA_TYPES or content_type.startswith("video/"):
        return
    still = " (a still image goes to POST /predict)" if content_type.startswith("image/") else ""
    raise UnsupportedMediaType(f"the uploaded file is {content_type!r}; send a video ({FORMATS}){still}")


def check_video_bytes(head: bytes) -> None:
    """415 for bytes that are a still image or audio, whatever type they were declared with."""
    image = sniff_format(head)
    if image is not None:
        raise UnsupportedMediaType(f"the uploaded file is a {image.upper()} image, not a video; send a video "
                                   f"({FORMATS}), or the image to POST /predict")  # fmt: skip
    audio = next((name for signature, name in _AUDIO_SIGNATURES if head.startswith(signature)), None)
    if audio is None and head[:4] == b"RIFF" and head[8:12] == b"WAVE":
        audio = "WAV"
    if audio is not None:
        raise UnsupportedMediaType(f"the uploaded file is {audio} audio, not a video; send a video ({FORMATS})")


async def receive_video(request: Request, upload: VideoUpload) -> ReceivedVideo:
    """The video in the multipart field ``file``, streamed into a temporary file (``upload.path``, which the
    caller deletes, also when this raises)."""
    kind, params = parse_options_header(request.headers.get("content-type", ""))
    if kind != b"multipart/form-data":
        raise MissingFile(f"no video uploaded: send it as multipart/form-data in a field named '{FIELD}' (e.g. "
                          "curl -F file=@clip.mp4 http://host:port/analyze/video)")  # fmt: skip
    if b"boundary" not in params:
        raise BadMultipart("the multipart/form-data body could not be read (no boundary); let the HTTP client "
                           "build it, e.g. curl -F file=@clip.mp4 http://host:port/analyze/video")  # fmt: skip
    callbacks: Any = {name: getattr(upload, name) for name in (
        "on_part_begin", "on_header_field", "on_header_value", "on_header_end", "on_headers_finished",
        "on_part_data", "on_part_end")}  # fmt: skip
    try:
        parser = multipart.MultipartParser(params[b"boundary"], callbacks)
        async for chunk in request.stream():
            parser.write(chunk)
            if upload.pending:
                await run_in_threadpool(upload.flush)
        parser.finalize()
        await run_in_threadpool(upload.flush)
    except FormParserError as exc:
        raise BadMultipart(
            f"the multipart/form-data body could not be read ({exc}); let the HTTP client build "
            "it, e.g. curl -F file=@clip.mp4 http://host:port/analyze/video"
        ) from None
    except ClientDisconnect:
        raise BadMultipart("the client went away before the upload ended") from None
    finally:
        upload.close()
    if not upload.found:
        fields = f" (form fields: {', '.join(sorted(set(upload.other_fields)))})" if upload.other_fields else ""
        raise MissingFile(f"no video uploaded{fields}: send the video as a file in the field '{FIELD}' (e.g. "
                          "curl -F file=@clip.mp4 http://host:port/analyze/video)")  # fmt: skip
    if upload.size == 0:
        raise EmptyFile(f"the uploaded video is empty; send a video ({FORMATS})")
    return ReceivedVideo(upload.path, upload.size, upload.head)  # type: ignore[arg-type]


def delete(path: Path | None) -> None:
    if path is not None:
        try:
            path.unlink(missing_ok=True)
        except OSError:
            log.exception("could not delete an uploaded video's temporary file")
