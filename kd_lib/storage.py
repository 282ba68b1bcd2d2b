"""URI -> local file. (Placeholder until the S3 implementation lands: local paths only.)"""

from __future__ import annotations

from pathlib import Path
from typing import Any


class StorageError(ValueError):
    """A file or object cannot be read; the message names the URI and the fix."""


def fetch(uri: str, dest_dir: str | Path, retry: Any = None) -> Path:
    path = Path(uri).expanduser()
    if uri.startswith("s3://"):
        raise StorageError(f"{uri}: s3:// is not supported yet")
    if not path.is_file():
        raise StorageError(f"{uri}: no such file")
    return path
