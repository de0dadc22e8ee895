"""The DVC stages, one module each: ``python -m stages.<name> ...``, run by ``dvc repro``; every
path comes from dvc.yaml. Thin: read params, call pipeline/, write outs atomically, log to MLflow.
Commands a person runs by hand are in ``commands/``."""
