"""mien's HTTP service: finds every face in an uploaded photo and returns a probability per expression.

It reads ``*.onnx`` files exported by ``mien export`` and trusts only their metadata; it never imports
torch or the ``training``/``export`` packages. Build an app with :func:`mien.service.main.create_app`.
"""
