"""MLflow for the stages: one run per training, continued by every later stage, never lost.

    store       where runs go: $MLFLOW_TRACKING_URI or the repository's sqlite file; the client
    registry    the ONNX model in the run and in the model registry (versions, aliases)
    ops         a logging call as a small JSON-able operation, and how one is applied
    spool       operations MLflow could not take, kept on disk in order, and their replay
    run         Tracker, the handle a stage logs through
    provenance  the git commit and package versions a run records

The stages call this package; ``pipeline/`` never imports it.
"""
