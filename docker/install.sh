#!/bin/sh
# The image's recipe for Python packages: kdflow and its pinned dependencies, nothing else.
# The Dockerfile runs it at build time; tests/e2e/test_image_smoke.py runs this same script
# into a fresh venv. Usage: docker/install.sh PYTHON [SOURCE_DIR]
#   PYTHON      the interpreter of the environment to fill (a venv's bin/python)
#   SOURCE_DIR  directory holding pyproject.toml, the packages and requirements/ (default: .)
# TORCH_INDEX_URL, when set, is an extra index for the torch build named in the lock.
set -eu
python=$1
src=${2:-.}

if [ -n "${TORCH_INDEX_URL:-}" ]; then
    set -- --extra-index-url "$TORCH_INDEX_URL"
else
    set --
fi
# Every dependency is pinned in the lock, so no resolution happens (--no-deps) and what is
# installed is exactly what the lock says.
"$python" -m pip install --no-cache-dir --no-deps "$@" -r "$src/requirements/image.txt"
# kdflow itself, built with the setuptools the lock just installed.
"$python" -m pip install --no-cache-dir --no-deps --no-build-isolation "$src"
# Fails if the lock misses or mis-pins a requirement of kdflow or of any locked package.
"$python" -m pip check
