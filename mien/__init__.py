"""mien: facial expression recognition, trained in PyTorch, exported to ONNX, served with FastAPI.

One import name for the whole distribution. Its parts are `mien.training` (models, data, training loop;
needs the `train` extra), `mien.export` (PyTorch -> ONNX with a parity check) and `mien.service` (FastAPI +
onnxruntime; no torch). Their sources stay in the repository's top-level folders `training/`, `export/` and
`service/` (pyproject.toml maps them under `mien`). This folder holds what all three share without pulling in
heavy dependencies (the preprocessing spec, the onnxruntime wrapper) and the command line.
"""

__version__ = "0.1.0"
