"""compactdeploy: prune a PyTorch model, export it to ONNX, compile it with TVM and ship it to a device.

The stages, in the order data flows through them:
zoo (load) -> prune -> export -> compile -> bench -> bundle; ``pipeline.build`` runs them all.
"""

__version__ = "0.1.0"
