"""Commands a person runs from a checkout, not DVC stages (they write no pipeline outputs):

    python -m commands.serve      the inference service on models/model.onnx (params.yaml ``serve``)
    python -m commands.predict    image files in, digits out; --info: what the model file is
    python -m commands.compare    runs side by side: params that differ, metrics, deltas
    python -m commands.promote    candidate -> champion, only if its test accuracy is not worse
    python -m commands.sync       replay what was logged while the tracking store was down
"""
