"""Default locations the commands share, written once."""

from __future__ import annotations

#: FER2013 as the project's npz (Training + PublicTest), relative to the checkout: the data lives in a
#: folder shared beside it, never inside it (see ../shared/data/README). The text also appears as-is in
#: the commands a model card records, so it stays a relative string, not a resolved Path.
DEFAULT_DATA = "../shared/data/fer2013.npz"

#: The folder beside the served models that holds the face detector's ONNX files (``mien export detector``
#: writes it, the service reads it).
DETECTOR_FOLDER = "detector"
