"""The inference service: a deployable of its own, on onnxruntime alone.

    config      ServeConfig (params.yaml ``serve``) and the command line made from it
    server      the HTTP service on uvicorn + Starlette: health, metadata, infer, /digit, /metrics, the page
    batcher     joins requests that queue up into one onnxruntime run
    protocol    the KServe / Open Inference Protocol v2 requests and responses
    admission   what the service lets in: bodies within a memory budget and a deadline, inference places
    metrics     the Prometheus metrics (Triton's names where Triton has one)
    static/     the drawing page

It runs as ``python -m serving`` (in the container image, or anywhere the model file is) and
from a checkout as ``python -m commands.serve`` (params.yaml, and the registry version). Its
dependencies are its own: onnxruntime, numpy, Pillow, uvicorn, Starlette, orjson,
prometheus-client, and the few torch-free modules of ``pipeline/`` it imports (contract,
digits, evaluate, runtime, params, errors). Never PyTorch, MLflow or DVC: a test checks its
imports.
"""
