"""Turn uploaded bytes into a BGR image, refusing what is not an image or too big to decode safely.

The format is sniffed from the leading bytes and the dimensions are read from the file header, so a
small file that declares a huge image (a decompression bomb) is refused before OpenCV allocates it.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field

import cv2
import numpy as np

from mien.service.exceptions import BadImage, EmptyFile, TooManyPixels, UnsupportedMediaType

#: Media types a client may declare for the uploaded part; octet-stream and none are sniffed instead.
ACCEPTED_MEDIA_TYPES = {
    "image/jpeg": "jpeg",
    "image/jpg": "jpeg",
    "image/pjpeg": "jpeg",
    "image/png": "png",
    "image/webp": "webp",
    "image/bmp": "bmp",
    "image/x-bmp": "bmp",
    "image/x-ms-bmp": "bmp",
    "image/gif": "gif",
}
GENERIC_MEDIA_TYPES = {"", "application/octet-stream", "binary/octet-stream"}
SUPPORTED = "JPEG, PNG, WebP, BMP or GIF"

# Recognisable formats we do not serve: named in the 415 message so the user knows what they sent.
_OTHER_SIGNATURES = (
    (b"II*\x00", "TIFF"),
    (b"MM\x00*", "TIFF"),
    (b"%PDF", "PDF"),
    (b"PK\x03\x04", "ZIP"),
    (b"\x00\x00\x01\x00", "ICO"),
    (b"\xff\x0a", "JPEG XL"),
    (b"\x00\x00\x00\x0cJXL ", "JPEG XL"),
)


def sniff_format(data: bytes) -> str | None:
    """'jpeg', 'png', 'webp', 'bmp' or 'gif' from the magic bytes, else None."""
    if data.startswith(b"\xff\xd8\xff"):
        return "jpeg"
    if data.startswith(b"\x89PNG\r\n\x1a\n"):
        return "png"
    if len(data) >= 12 and data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "webp"
    if data.startswith(b"BM") and len(data) >= 26:
        return "bmp"
    if data[:6] in (b"GIF87a", b"GIF89a") and len(data) >= 13:
        return "gif"
    return None


def sniff_other(data: bytes) -> str | None:
    """Name a recognisable non-supported format (GIF, PDF, HEIC, text, ...), or None for unknown bytes."""
    for signature, name in _OTHER_SIGNATURES:
        if data.startswith(signature):
            return name
    if len(data) >= 12 and data[4:8] == b"ftyp":
        return "HEIC/AVIF/MP4"
    head = data[:4096]
    try:
        text = head.decode("utf-8")
    except UnicodeDecodeError:
        # A cut in the middle of a multi-byte character at the end of the slice is still text.
        try:
            text = head[:-3].decode("utf-8") if len(head) > 3 else ""
        except UnicodeDecodeError:
            return None
    if text and all(ch.isprintable() or ch in "\r\n\t\f" for ch in text):
        return "text"
    return None


def _jpeg_size(data: bytes) -> tuple[int, int] | None:
    """(width, height) from the first SOF marker, walking the marker segments."""
    pos, end = 2, len(data)
    while pos + 4 <= end:
        if data[pos] != 0xFF:
            return None
        marker = data[pos + 1]
        if marker == 0xFF:  # fill byte
            pos += 1
            continue
        if marker in (0x01, *range(0xD0, 0xD8)):  # standalone markers carry no length
            pos += 2
            continue
        (length,) = struct.unpack(">H", data[pos + 2 : pos + 4])
        is_sof = 0xC0 <= marker <= 0xCF and marker not in (0xC4, 0xC8, 0xCC)
        if is_sof and pos + 9 <= end:
            height, width = struct.unpack(">HH", data[pos + 5 : pos + 9])
            return (width, height) if height else None  # height 0: given later by a DNL marker
        if marker in (0xD9, 0xDA) or length < 2:  # end of image / start of scan before any SOF
            return None
        pos += 2 + length
    return None


def _webp_size(data: bytes) -> tuple[int, int] | None:
    chunk = data[12:16]
    if chunk == b"VP8X" and len(data) >= 30:
        width = 1 + int.from_bytes(data[24:27], "little")
        height = 1 + int.from_bytes(data[27:30], "little")
        return width, height
    if chunk == b"VP8L" and len(data) >= 25 and data[20] == 0x2F:
        bits = int.from_bytes(data[21:25], "little")
        return (bits & 0x3FFF) + 1, ((bits >> 14) & 0x3FFF) + 1
    if chunk == b"VP8 " and len(data) >= 30 and data[23:26] == b"\x9d\x01\x2a":
        width, height = struct.unpack("<HH", data[26:30])
        return width & 0x3FFF, height & 0x3FFF
    return None


def _bmp_size(data: bytes) -> tuple[int, int] | None:
    (header_size,) = struct.unpack("<I", data[14:18])
    if header_size == 12:  # OS/2 BITMAPCOREHEADER: 16-bit sizes
        width, height = struct.unpack("<HH", data[18:22])
    else:
        width, height = struct.unpack("<ii", data[18:26])
    return abs(width), abs(height)  # negative height means top-down rows


def _gif_size(data: bytes) -> tuple[int, int]:
    """The logical screen, grown to hold the first frame (which may claim to be larger than the screen)."""
    width, height = struct.unpack("<HH", data[6:10])
    flags, pos = data[10], 13
    if flags & 0x80:  # global colour table
        pos += 3 * 2 ** ((flags & 0x07) + 1)
    while pos < len(data):
        block = data[pos]
        if block == 0x21:  # extension: label, then sub-blocks until a zero length
            pos += 2
            while pos < len(data) and data[pos]:
                pos += data[pos] + 1
            pos += 1
        elif block == 0x2C and pos + 9 <= len(data):  # the first image descriptor
            left, top, frame_w, frame_h = struct.unpack("<HHHH", data[pos + 1 : pos + 9])
            return max(width, left + frame_w), max(height, top + frame_h)
        else:
            break
    return width, height


def header_size(data: bytes, fmt: str) -> tuple[int, int] | None:
    """(width, height) read from the header of a sniffed image, or None when the header does not say."""
    if fmt == "png":
        return struct.unpack(">II", data[16:24]) if len(data) >= 24 and data[12:16] == b"IHDR" else None
    if fmt == "jpeg":
        return _jpeg_size(data)
    if fmt == "webp":
        return _webp_size(data)
    if fmt == "bmp":
        return _bmp_size(data)
    if fmt == "gif":
        return _gif_size(data)
    return None


def check_media_type(content_type: str | None) -> None:
    """UnsupportedMediaType for a declared part type that is not one of ours; generic types are left to sniffing."""
    declared = (content_type or "").split(";")[0].strip().lower()
    if declared not in ACCEPTED_MEDIA_TYPES and declared not in GENERIC_MEDIA_TYPES:
        raise UnsupportedMediaType(f"the uploaded file is {declared!r}; send a {SUPPORTED} image")


def _check_pixels(width: int, height: int, max_pixels: int) -> None:
    if width * height > max_pixels:
        raise TooManyPixels(
            f"image is {width}×{height} = {width * height / 1e6:.1f} megapixels; the limit is "
            f"{max_pixels / 1e6:.1f} megapixels (MIEN_MAX_PIXELS); send a smaller image"
        )


#: JPEG's DCT scaling: OpenCV decodes a JPEG at 1/2, 1/4 or 1/8 of its size with these flags, several
#: times faster than a full decode (the entropy decoding stays, the inverse DCT and colour conversion shrink).
#: Without IMREAD_IGNORE_ORIENTATION they apply the EXIF orientation like IMREAD_COLOR.
_REDUCED = {2: cv2.IMREAD_REDUCED_COLOR_2, 4: cv2.IMREAD_REDUCED_COLOR_4, 8: cv2.IMREAD_REDUCED_COLOR_8}


def reduction_for(size: tuple[int, int] | None, fmt: str, need_pixels: int) -> int:
    """The largest JPEG reduction (1, 2, 4 or 8) that still leaves at least ``need_pixels`` pixels.

    1 (a full decode) for other formats, an unknown size, or ``need_pixels`` 0.
    """
    if fmt != "jpeg" or size is None or need_pixels <= 0:
        return 1
    width, height = size
    return next((factor for factor in (8, 4, 2) if (width // factor) * (height // factor) >= need_pixels), 1)


@dataclass
class Photo:
    """A decoded upload: ``image`` (BGR uint8, EXIF orientation applied), perhaps decoded at a reduced size.

    ``width``/``height`` are the full-resolution photo's, which boxes and landmarks are reported in;
    :meth:`full` decodes it at full resolution when a face is too small in the reduced copy.
    """

    image: np.ndarray
    width: int
    height: int
    data: bytes = field(repr=False, default=b"")
    fmt: str = "jpeg"
    _full: np.ndarray | None = field(default=None, repr=False)

    @property
    def reduced(self) -> bool:
        return self.image.shape[1] != self.width or self.image.shape[0] != self.height

    @property
    def scale(self) -> tuple[float, float]:
        """Full-resolution pixels per pixel of ``image``, along x and y."""
        return self.width / self.image.shape[1], self.height / self.image.shape[0]

    def full(self) -> np.ndarray:
        """The photo at full resolution (decoded once, on first use)."""
        if not self.reduced:
            return self.image
        if self._full is None:
            self._full = _imdecode(self.data, self.fmt, cv2.IMREAD_COLOR)
        return self._full


def _imdecode(data: bytes, fmt: str, flags: int) -> np.ndarray:
    try:
        # IMREAD_COLOR applies the EXIF orientation (OpenCV 4.x), always gives 8-bit BGR (16-bit, alpha, palette,
        # grey and CMYK alike) and reads the first frame of an animated GIF.
        image = cv2.imdecode(np.frombuffer(data, dtype=np.uint8), flags)
    except cv2.error as exc:
        raise BadImage(f"could not decode the {fmt.upper()} image: {str(exc).strip().splitlines()[-1]}") from None
    if image is None or image.size == 0:
        raise BadImage(f"could not decode the {fmt.upper()} image; the file is corrupt or truncated")
    return image


def _sniffed(data: bytes, max_pixels: int) -> tuple[str, tuple[int, int] | None]:
    """The format and header size of an upload mien can decode; the errors for one it cannot."""
    if not data:
        raise EmptyFile("the uploaded file is empty; send a " + SUPPORTED + " image")
    fmt = sniff_format(data)
    if fmt is None:
        other = sniff_other(data)
        if other is not None:
            raise UnsupportedMediaType(
                f"the uploaded file looks like {other}, not an image mien reads; send a {SUPPORTED} image"
            )
        raise BadImage(f"the uploaded file is not a {SUPPORTED} image (unrecognised or corrupt data)")
    size = header_size(data, fmt)
    if size is not None:
        if size[0] == 0 or size[1] == 0:
            raise BadImage(f"the {fmt.upper()} header declares an empty image ({size[0]}×{size[1]})")
        _check_pixels(*size, max_pixels)
    return fmt, size


def decode_photo(data: bytes, max_pixels: int, need_pixels: int = 0) -> Photo:
    """The upload decoded, at 1/2, 1/4 or 1/8 size when it is a JPEG whose reduced copy still has at least
    ``need_pixels`` pixels (0: always full size); BadImage, TooManyPixels or UnsupportedMediaType for what
    cannot be served."""
    fmt, size = _sniffed(data, max_pixels)
    factor = reduction_for(size, fmt, need_pixels)
    image = _imdecode(data, fmt, _REDUCED[factor] if factor > 1 else cv2.IMREAD_COLOR)
    if factor == 1:
        _check_pixels(image.shape[1], image.shape[0], max_pixels)  # for headers that did not say
        return Photo(image, image.shape[1], image.shape[0], data, fmt)
    assert size is not None  # a reduction needs the header's size
    width, height = size
    # EXIF orientation may have turned the photo: the reduced copy's shape says whether width and height swapped.
    if (image.shape[1] > image.shape[0]) != (width > height) and width != height:
        width, height = height, width
    return Photo(image, width, height, data, fmt)


def decode_image(data: bytes, max_pixels: int) -> np.ndarray:
    """A BGR uint8 H×W×3 image at full size, EXIF orientation applied; BadImage, TooManyPixels or
    UnsupportedMediaType for what cannot be served."""
    return decode_photo(data, max_pixels).image
