"""The data layer's error: the dataset (or its tokenizer) is missing, corrupt or mislabeled."""

from __future__ import annotations

from kd_lib.errors import KdflowError


class DataError(KdflowError, ValueError):
    """The dataset is missing, corrupt or mislabeled; the message names the file and the fix."""

    default_fix = "fix the data named above, or point data.source at another dataset"
