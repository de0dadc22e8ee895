"""The MNIST ONNX pipeline as a library: pure functions over plain values.

Nothing here reads params.yaml, chooses output paths or talks to MLflow; the thin entry
points in ``stages/`` do that. One concept per module.
"""
