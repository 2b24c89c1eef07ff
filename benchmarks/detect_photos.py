"""Photos with known faces for the detection benchmark and tests: real photos that ship with packages and
composites made from them (a group, ~24-pixel faces, ±30° tilts, darkness, an occluded mouth).

Ground-truth boxes on the real photos were drawn by eye; composites carry them through their own
scaling, placement and rotation. A detection *finds* a face when its centre lies inside the face's box
and its area is within 4× of it either way; a detection that finds no face is a *false face*.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import cv2
import numpy as np

# (x, y, width, height) of each face, checked by eye on the image.
FACE_BOXES: dict[str, list[tuple[int, int, int, int]]] = {
    "astronaut": [(175, 60, 95, 115)],
    "camera": [(198, 118, 58, 80)],  # side view, behind a camera
    "grace_hopper": [(175, 110, 175, 215)],
    "coffee": [],
    "chelsea": [],  # a cat: not a human face
    "rocket": [],
}


@dataclass
class Photo:
    name: str
    image: np.ndarray  # BGR uint8
    faces: list[tuple[float, float, float, float]] = field(default_factory=list)


def real_photo(name: str) -> np.ndarray:
    """One of the package photos as BGR uint8."""
    if name == "grace_hopper":
        import matplotlib.cbook

        path = matplotlib.cbook.get_sample_data("grace_hopper.jpg", asfileobj=False)
        return cv2.imread(str(path), cv2.IMREAD_COLOR)
    from skimage import data

    rgb = getattr(data, name)()
    return cv2.cvtColor(rgb, cv2.COLOR_GRAY2BGR if rgb.ndim == 2 else cv2.COLOR_RGB2BGR)


def real_photos() -> list[Photo]:
    return [Photo(name, real_photo(name), [tuple(map(float, b)) for b in boxes]) for name, boxes in FACE_BOXES.items()]


def _paste(canvas: np.ndarray, image: np.ndarray, faces: list, x: int, y: int, scale: float) -> list:
    """Paste ``image`` scaled by ``scale`` at (x, y); return its face boxes moved along."""
    small = cv2.resize(image, None, fx=scale, fy=scale, interpolation=cv2.INTER_AREA)
    h, w = small.shape[:2]
    canvas[y : y + h, x : x + w] = small
    return [(x + fx * scale, y + fy * scale, fw * scale, fh * scale) for fx, fy, fw, fh in faces]


def _head(name: str, pad: float = 1.0) -> tuple[np.ndarray, list]:
    """The photo cropped to the face plus ``pad`` face sizes around it (a head-and-shoulders shot)."""
    image = real_photo(name)
    x, y, w, h = FACE_BOXES[name][0]
    x0, y0 = max(0, int(x - pad * w)), max(0, int(y - pad * h))
    x1, y1 = min(image.shape[1], int(x + w + pad * w)), min(image.shape[0], int(y + h + pad * h))
    return image[y0:y1, x0:x1].copy(), [(x - x0, y - y0, w, h)]


def group() -> Photo:
    """Five heads of different sizes on one 1024×576 canvas, like a group photo."""
    canvas = np.full((576, 1024, 3), 120, np.uint8)
    faces = []
    for name, x, y, face_w in [("astronaut", 20, 150, 110), ("grace_hopper", 330, 60, 130),
                               ("astronaut", 640, 250, 60), ("grace_hopper", 820, 300, 50),
                               ("camera", 760, 0, 70)]:  # fmt: skip
        head, boxes = _head(name)
        if name == "astronaut" and x > 600:
            head = cv2.flip(head, 1)
            boxes = [(head.shape[1] - bx - bw, by, bw, bh) for bx, by, bw, bh in boxes]
        faces += _paste(canvas, head, boxes, x, y, face_w / boxes[0][2])
    return Photo("group (5 faces)", canvas, faces)


def small_faces(face_px: int = 24) -> Photo:
    """Six ~``face_px``-pixel faces (photos scaled down) on a 640×480 canvas."""
    canvas = np.full((480, 640, 3), 150, np.uint8)
    faces = []
    for i, name in enumerate(["astronaut", "grace_hopper", "astronaut", "grace_hopper", "astronaut", "grace_hopper"]):
        head, boxes = _head(name, pad=1.5)
        faces += _paste(canvas, head, boxes, 40 + (i % 3) * 200, 60 + (i // 3) * 220, face_px / boxes[0][2])
    return Photo(f"{len(faces)} faces of {face_px} px", canvas, faces)


def rotated(name: str, degrees: float) -> Photo:
    """A real photo rotated about the face centre (positive = counter-clockwise), borders filled grey."""
    image = real_photo(name)
    x, y, w, h = FACE_BOXES[name][0]
    centre = (x + w / 2, y + h / 2)
    matrix = cv2.getRotationMatrix2D(centre, degrees, 1.0)
    out = cv2.warpAffine(image, matrix, image.shape[1::-1], borderValue=(128, 128, 128))
    return Photo(f"{name} rotated {degrees:+.0f}°", out, [(x, y, w, h)])  # rotating about the centre keeps it


def darkened(name: str, gain: float = 0.25) -> Photo:
    """Exposure cut to ``gain`` (and a little sensor noise), as in a dim room."""
    image = real_photo(name).astype(np.float32) * gain
    noise = np.random.default_rng(0).normal(0, 2.0, image.shape)
    return Photo(f"{name} dark ×{gain}", np.clip(image + noise, 0, 255).astype(np.uint8), FACE_BOXES[name])


def occluded(name: str) -> Photo:
    """The lower third of the face (mouth, chin) behind a grey bar, like a hand or a mask."""
    image = real_photo(name).copy()
    x, y, w, h = FACE_BOXES[name][0]
    cv2.rectangle(image, (x - w // 8, y + (2 * h) // 3), (x + w + w // 8, y + h + h // 8), (90, 90, 90), -1)
    return Photo(f"{name} mouth occluded", image, FACE_BOXES[name])


def phone_photo(width: int = 4000, height: int = 3000, face_px: int = 600, at: tuple[int, int] = (1700, 900)) -> Photo:
    """A phone-sized photo: grace_hopper's head with a ``face_px``-wide face at ``at`` (its box's top left) on a
    ``width``×``height`` textured background (coffee, scaled up, with sensor noise), like a 12-megapixel shot."""
    rng = np.random.default_rng(0)
    from skimage import data

    background = cv2.resize(cv2.cvtColor(data.coffee(), cv2.COLOR_RGB2BGR), (width, height))
    canvas = np.clip(background + rng.normal(0, 4.0, background.shape), 0, 255).astype(np.uint8)
    head, boxes = _head("grace_hopper", pad=0.6)
    scale = face_px / boxes[0][2]
    fx, fy = boxes[0][0] * scale, boxes[0][1] * scale
    faces = _paste(canvas, head, boxes, int(at[0] - fx), int(at[1] - fy), scale)
    return Photo(f"{width}x{height} phone photo", canvas, faces)


def composites() -> list[Photo]:
    return [group(), small_faces(), rotated("astronaut", 30), rotated("astronaut", -30),
            rotated("grace_hopper", 30), rotated("grace_hopper", -30), darkened("astronaut"),
            darkened("grace_hopper"), occluded("astronaut"), occluded("grace_hopper")]  # fmt: skip


def all_photos() -> list[Photo]:
    return real_photos() + composites()


def match(boxes: np.ndarray, faces: list) -> tuple[int, int]:
    """(faces found, false faces): each face is taken by at most one detection, see the module docstring."""
    taken = [False] * len(faces)
    false = 0
    for bx, by, bw, bh in np.asarray(boxes, dtype=np.float64).reshape(-1, 4):
        cx, cy = bx + bw / 2, by + bh / 2
        for i, (fx, fy, fw, fh) in enumerate(faces):
            inside = fx <= cx <= fx + fw and fy <= cy <= fy + fh
            if not taken[i] and inside and 0.25 <= (bw * bh) / (fw * fh) <= 4.0:
                taken[i] = True
                break
        else:
            false += 1
    return sum(taken), false
