"""PyTorch checkpoint → ONNX file carrying its preprocessing spec, checked for parity, with a model card."""
