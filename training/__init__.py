"""Training side of mien: data readers, the model registry, the training loop and evaluation."""
