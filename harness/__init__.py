"""What the tests and the benchmarks both start and stop for real: our service, static and MLflow
servers, PostgreSQL-backed team servers, sshd (``harness.services``), and the service's image
under podman (``harness.containers``).

A package of its own, so that a benchmark imports no test module; nothing in the pipeline, the
stages or the service imports it.
"""
