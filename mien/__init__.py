"""mien: facial expression recognition, trained in PyTorch, exported to ONNX, served with FastAPI.

The top-level packages are `training` (models, data, training loop; needs the `train` extra),
`export` (PyTorch -> ONNX with a parity check) and `service` (FastAPI + onnxruntime; no torch).
This package holds only what all three share without pulling in heavy dependencies: the
preprocessing spec and the command line.
"""

__version__ = "0.1.0"
