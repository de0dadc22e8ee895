"""The one base class of the errors whose message is the whole story.

Each module raises its own kind (``IDXError``, ``VerifyError``, ...), also a ValueError or a
RuntimeError as before; the commands catch ``PipelineError`` and print its message alone,
with no traceback. Anything else is a bug, and keeps its traceback.
"""
from __future__ import annotations


class PipelineError(Exception):
    """A failure the user can act on: bad input, bad params, a model that does not verify."""
