"""The error of every file that passes between pipeline steps.

Kept in a module of its own so that ``weights_file`` (torch) and the JSON records (pydantic
only) raise the same class without importing each other.
"""

from __future__ import annotations

from kd_lib.errors import KdflowError


class ArtifactError(KdflowError, ValueError):
    """A file passed between steps (a saved model directory, a prepared dataset directory, a
    step's JSON record) is missing, corrupt, or does not hold what it should; the message names
    the file and, for a malformed record, the field."""
