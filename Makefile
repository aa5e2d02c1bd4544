# zsad — two commands set everything up on a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.zsad-installed
BACKBONE ?= tiny
DEMO_DIR ?= runs/demo
PYTEST_ARGS ?=

export WANDB_MODE ?= disabled
export HF_HUB_OFFLINE ?= 1
export TRANSFORMERS_OFFLINE ?= 1
export TOKENIZERS_PARALLELISM ?= false

.PHONY: setup test demo lint benchmark clean

setup: $(STAMP)

# Re-install only when the project metadata changes, so `make test` is idempotent and quick.
$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip setuptools wheel
	$(PY) -m pip install -q -e '.[test]'
	touch $(STAMP)

test: setup
	OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 ZSAD_NUM_THREADS=1 $(PY) -m pytest -q -n 2 --dist loadfile $(PYTEST_ARGS)

demo: setup
	OMP_NUM_THREADS=2 $(VENV)/bin/zsad demo --backbone $(BACKBONE) --output $(DEMO_DIR)

benchmark: setup
	$(VENV)/bin/zsad benchmark --config configs/learnable_vectors/visa_to_mvtec.yaml --weights random --batches 2

lint: setup
	$(VENV)/bin/ruff check zsad tests

clean:
	rm -rf runs lightning_logs wandb .pytest_cache
