# kdflow: `make demo` and `make test` work on a fresh machine with only Python 3 and pip.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
# The CPU wheel: an unpinned torch pulls a multi-GB CUDA build.
TORCH  ?= torch==2.13.0
STAMP  := $(VENV)/.kdflow-installed

.PHONY: demo test test-fast bench install clean

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip

$(STAMP): $(PY) pyproject.toml
	$(PY) -m pip install --quiet "$(TORCH)"
	$(PY) -m pip install --quiet -e ".[test]"
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/kdflow run --local configs/demo.yaml

test: $(STAMP)
	$(PY) -m pytest -q

test-fast: $(STAMP)
	$(PY) -m pytest -q -m "not e2e"

# Not part of `make test`: trains on mnist5k and times every quantization scheme (~5 min).
bench: $(STAMP)
	$(PY) bench/quantization.py --data $(or $(DATA),/work/shared/datasets/mnist5k.npz)

clean:
	rm -rf .kdflow mlflow.db mlruns build
