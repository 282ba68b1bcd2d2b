"""Fixtures shared by the step tests."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest


@pytest.fixture()
def in_tmp(tmp_path: Path) -> Iterator[Path]:
    """Run the test from ``tmp_path``: the sqlite store's run artifacts land there."""
    cwd = os.getcwd()
    os.chdir(tmp_path)
    try:
        yield tmp_path
    finally:
        os.chdir(cwd)
