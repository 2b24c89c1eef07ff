"""A training checkpoint rebuilt from a bundled ONNX file, for when the run folder that made it is gone.

``mien recover models/vgg_fer.onnx --out ~/mien-runs/vgg_fer/best.pt`` writes a checkpoint that ``mien train
--teacher`` (and ``--init``) load like the lost ``best.pt``: the network of the card's training config, with the
weights the file holds. The exporter folds each batch norm into the convolution before it and drops the names of
those weights, so the rebuild goes by structure: the file's Conv nodes, in graph order, are the network's
convolutions in the order a forward pass calls them, and a batch norm that followed one becomes the identity plus
the folded bias (weight 1, running mean 0, running variance 1 - eps, bias = the folded conv's bias), which computes
exactly the folded layer; test-time augmentation runs the network once per view, and the copies of the folded weights
each pass gets must be equal. Weights the file still names (e.g. a head's batch norm and last layer) are taken by
name; a linear layer whose weight lost its name is the next MatMul or Gemm. Anything that does not fit (a count,
a shape, a weight left unset) is refused.

What makes the result trustworthy is the check, not the mapping: the rebuilt network, with the file's test-time
augmentation, must give the file's uncalibrated logits (the calibration ``mien calibrate`` added is taken out) on
real faces and on random input, to the exporter's own parity tolerance, with every top label the same. The
checkpoint is the network before calibration, as ``best.pt`` was; its ``recovered_from`` says from which file.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import torch
from onnx import numpy_helper

from mien.card import card_path
from mien.export.calibrate import without_calibration
from mien.export.evaluate import eval_split
from mien.export.onnx_export import check_parity, log_parity, with_test_time_augmentation
from mien.preprocess import to_model_input
from mien.spec import PreprocessSpec
from mien.training.layers import as_served
from mien.training.models import create_model
from mien.training.run_folder import save


class RecoveryError(ValueError):
    pass


def _initializers(model: onnx.ModelProto) -> dict[str, np.ndarray]:
    """The file's weights by name, and under the names Identity nodes give them (the exporter's second pass of a
    flip-averaged network reads its weights through such aliases)."""
    weights = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    for node in model.graph.node:
        if node.op_type == "Identity" and node.input[0] in weights:
            weights[node.output[0]] = weights[node.input[0]]
    return weights


def _one_view(nodes: list[onnx.NodeProto], expected: int, weights: dict[str, np.ndarray], what: str) -> list:
    """The nodes of one pass of the network. Test-time augmentation runs it once per view, and the exporter may
    give each pass its own copy of the folded weights: then the copies must be equal, and the first is kept."""
    if expected == 0 and not nodes:
        return []
    if expected == 0 or not nodes or len(nodes) % expected:
        raise RecoveryError(f"the file has {len(nodes)} {what}, the network {expected}")
    views = [nodes[v * expected : (v + 1) * expected] for v in range(len(nodes) // expected)]
    for view in views[1:]:
        for a, b in zip(views[0], view, strict=True):
            if not np.array_equal(weights[a.input[1]], weights[b.input[1]]):
                raise RecoveryError(f"the file's passes use different weights ({a.input[1]} vs {b.input[1]})")
    return views[0]


def _call_order(network: torch.nn.Module, example: torch.Tensor, kinds: tuple[type, ...]) -> list[str]:
    """Names of ``network``'s modules of ``kinds`` in the order a forward pass calls them (each once): the order
    the exporter traced them in, which is not always the order they were registered (mini_xception's shortcut
    convolution is registered first and runs last)."""
    order: list[str] = []
    hooks = [m.register_forward_pre_hook(lambda _m, _x, name=name: order.append(name) if name not in order else None)
             for name, m in network.named_modules() if isinstance(m, kinds)]  # fmt: skip
    try:
        with torch.no_grad():
            network.eval()(example)
    finally:
        for hook in hooks:
            hook.remove()
    return order


def rebuild_state_dict(
    network: torch.nn.Module, model: onnx.ModelProto, example: torch.Tensor
) -> dict[str, torch.Tensor]:
    """``network``'s state dict with the weights of the ONNX ``model`` (see the module's docstring); ``example``
    is an input the network accepts, to find the order it runs its layers in."""
    weights = _initializers(model)
    state = {k: v.clone() for k, v in network.state_dict().items()}
    todo = {k for k in state if not k.endswith("num_batches_tracked")}

    def put(key: str, value: np.ndarray) -> None:
        if tuple(value.shape) != tuple(state[key].shape):
            raise RecoveryError(f"{key}: the file holds {tuple(value.shape)}, the network {tuple(state[key].shape)}")
        state[key] = torch.from_numpy(np.array(value, dtype=np.float32))
        todo.discard(key)

    for name, value in weights.items():  # weights the exporter kept by name ("<wrappers>.head.2.weight")
        for key in [k for k in todo if name == k or name.endswith("." + k)]:
            put(key, value)
    named = {n for n in weights if any(n == k or n.endswith("." + k) for k in state)}

    modules = list(network.named_modules())
    index = {name: i for i, (name, _) in enumerate(modules)}
    called = _call_order(network, example, (torch.nn.Conv2d, torch.nn.Linear))
    kind = dict(modules)
    torch_convs = [(index[name], name) for name in called if isinstance(kind[name], torch.nn.Conv2d)]
    convs = _one_view([n for n in model.graph.node if n.op_type == "Conv"], len(torch_convs), weights, "convolutions")
    for node, (i, name) in zip(convs, torch_convs, strict=True):
        put(f"{name}.weight", weights[node.input[1]])
        bias = weights[node.input[2]] if len(node.input) > 2 else None
        following = modules[i + 1] if i + 1 < len(modules) else (None, None)
        if isinstance(following[1], torch.nn.BatchNorm2d):  # folded into this conv: identity plus its bias
            bn = following[0]
            channels = state[f"{bn}.weight"].shape[0]
            put(f"{bn}.weight", np.ones(channels, np.float32))
            put(f"{bn}.bias", bias if bias is not None else np.zeros(channels, np.float32))
            put(f"{bn}.running_mean", np.zeros(channels, np.float32))
            put(f"{bn}.running_var", np.full(channels, 1.0 - following[1].eps, np.float32))
        elif bias is not None:
            if f"{name}.bias" not in state:
                raise RecoveryError(f"{name}: the file's convolution has a bias and no batch norm follows it")
            put(f"{name}.bias", bias)

    linears = [name for name in called if isinstance(kind[name], torch.nn.Linear) and f"{name}.weight" in todo]
    unnamed = [n for n in model.graph.node if n.op_type in ("MatMul", "Gemm") and n.input[1] in weights
               and n.input[1] not in named]  # fmt: skip
    for name, node in zip(linears, _one_view(unnamed, len(linears), weights, "unnamed products"), strict=True):
        trans_b = next((a.i for a in node.attribute if a.name == "transB"), 0)
        matrix = weights[node.input[1]]
        matrix = matrix if node.op_type == "Gemm" and trans_b else matrix.T
        put(f"{name}.weight", matrix)
        if node.op_type == "Gemm" and len(node.input) > 2 and f"{name}.bias" in todo:
            put(f"{name}.bias", weights[node.input[2]])
    if todo:
        raise RecoveryError(f"weights the file does not give: {sorted(todo)}")
    return state


def _training_record(training: dict) -> dict:
    """The checkpoint keys an export reads the training block of its card from (onnx_export.card_for), taken back
    from a card's ``training`` block: command, recipe, the kept epoch's metrics, notes, history and run totals."""
    keys = {"command": "command", "recipe": "recipe", "best": "metrics", "notes": "notes", "history": "history",
            "run": "run"}  # fmt: skip
    return {ckpt_key: training[card_key] for card_key, ckpt_key in keys.items() if training.get(card_key)}


def recover_checkpoint(onnx_path: str | Path, data: str | Path, split: str = "val", faces: int = 256,
                       atol: float = 1e-3) -> tuple[dict, object]:  # fmt: skip
    """(the checkpoint rebuilt from ``onnx_path`` and its card, the parity verdict against the file)."""
    onnx_path = Path(onnx_path)
    card = json.loads(card_path(onnx_path).read_text())
    config = (card.get("training") or {}).get("config")
    if not config:
        raise RecoveryError(f"{card_path(onnx_path)}: no training config to rebuild the network from")
    spec = PreprocessSpec.from_dict(card["spec"])  # the file's input
    # the network's own input: the file's, unless ten-crop cuts the network's input out of it (onnx_export.graph_spec)
    network_spec = (card.get("export") or {}).get("network_spec", card["spec"])
    network = create_model(config["model"], **config.get("model_kwargs", {}))
    proto = onnx.load(onnx_path)
    example = torch.zeros(1, spec.channels, *PreprocessSpec.from_dict(network_spec).input_size)
    network.load_state_dict(rebuild_state_dict(network, proto, example))
    served = as_served(network, config).eval()
    tta = {p.key: p.value for p in proto.metadata_props}.get("mien.test_time_augmentation", "none")
    served = with_test_time_augmentation(served, tta)

    split_faces = eval_split(data, split, spec.labels)
    pick = np.random.default_rng(0).permutation(len(split_faces.images))[:faces]
    real = to_model_input(list(split_faces.images[pick]), spec)
    session = ort.InferenceSession(without_calibration(proto).SerializeToString(), providers=["CPUExecutionProvider"])
    parity = check_parity(served, session, real, atol)
    ckpt = {
        "model_id": config["model"],
        "model_kwargs": config.get("model_kwargs", {}),
        "spec": network_spec,
        "state_dict": network.state_dict(),
        "train_config": config,
        # the run's record as the card kept it, so a file exported again from here says how its weights were trained
        **_training_record(card.get("training") or {}),
        "recovered_from": {"file": str(onnx_path), "model_id": card.get("model_id"), "version": card.get("version"),
                           "sha256": card.get("sha256"), "test_time_augmentation": tta,
                           "parity": {"max_abs_diff": parity.max_abs_diff, "argmax_agreement": parity.argmax_agreement,
                                      "split": split, "real_faces": parity.real_faces}},
    }  # fmt: skip
    return ckpt, parity


def recover(onnx_path: str | Path, out: str | Path, data: str | Path, split: str = "val", faces: int = 256,
            atol: float = 1e-3) -> object:  # fmt: skip
    """Rebuild, check, and write the checkpoint only when the check passes; return the parity verdict."""
    ckpt, parity = recover_checkpoint(onnx_path, data, split, faces, atol)
    log_parity(parity, "rebuilt - file")
    if parity.passed:
        out = Path(out).expanduser()
        out.parent.mkdir(parents=True, exist_ok=True)
        save(ckpt, out)
    return parity
