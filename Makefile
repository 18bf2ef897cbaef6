# The README's two commands: `make demo` and `make test`. Each sets up .venv first.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
export TF_CPP_MIN_LOG_LEVEL ?= 2
export PYTHONDONTWRITEBYTECODE := 1

.PHONY: venv demo test test-fast lint format bench bench-quick bench-detection lock images clean

venv: $(STAMP)

# Everything, at the versions locked in requirements/dev.txt (hash-checked), then this package itself.
$(STAMP): pyproject.toml requirements/dev.txt
	@$(PYTHON) -c 'import sys; sys.exit(sys.version_info < (3, 11))' || { echo "Python 3.11+ is required, found $$($(PYTHON) --version)"; exit 1; }
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet --require-hashes -r requirements/dev.txt
	@# setuptools warns about same-named folders on every editable install: this tree is the package.
	PYTHONWARNINGS="ignore:Editable installation" $(PY) -m pip install --quiet --no-deps -e .
	@touch $(STAMP)

demo: $(STAMP)
	$(PY) -m tools.demo

test: $(STAMP)
	$(PY) -m pytest

test-fast: $(STAMP)
	$(PY) -m pytest -m "not slow and not chaos and not e2e"

lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/mypy
	$(VENV)/bin/lint-imports

format: $(STAMP)
	$(VENV)/bin/ruff format .
	$(VENV)/bin/ruff check --fix .

bench: $(STAMP)
	$(PY) -m benchmarks.throughput
	$(PY) -m benchmarks.commit_cost

bench-quick: $(STAMP)
	$(PY) -m benchmarks.throughput --quick

# Every detector trained, scored on the anomaly kinds, served, and run one-class: the Pareto table.
bench-detection: $(STAMP)
	$(PY) -m benchmarks.detection

# Every image of deploy/Dockerfile, built with buildah (no Docker daemon, no registry: the base is a
# local stand-in made with debootstrap when absent), then a table of their sizes. Up-to-date images
# are not built again. Needs only the standard library: no venv.
images:
	$(PYTHON) deploy/images.py build

# Re-resolve the lock files from pyproject.toml: the newest releases that fit its ranges, one file
# per install profile. Upgrade one package only: make lock LOCK_ARGS="--upgrade-package keras".
LOCK_ARGS ?= --upgrade
LOCK := $(VENV)/bin/uv pip compile pyproject.toml --universal --generate-hashes --python-version 3.11 --quiet $(LOCK_ARGS)
lock: $(STAMP)
	$(LOCK) -o requirements/worker.txt
	$(LOCK) --extra tensorflow -o requirements/tensorflow.txt
	$(LOCK) --extra train -o requirements/train.txt
	$(LOCK) --extra viewer -o requirements/viewer.txt
	$(LOCK) --extra dev -o requirements/dev.txt

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache build *.egg-info
