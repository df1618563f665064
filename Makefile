# Two commands a newcomer needs (both set up .venv first, idempotently):
#   make train [DATA=cifar10|DIR] [ARGS="--epochs 2"]   train the tutorial recipe
#   make test                                          run the test suite
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
DATA   ?= cifar10
RECIPE ?= tutorial
ARGS   ?=
# The real-data tests read the shared CIFAR-10 JPEG folder when it is there.
REAL_DATA ?= $(abspath ../shared/data/cifar10-jpeg)
PYTEST_ARGS ?=

.PHONY: setup train test mutate coverage bench bench-env clean

setup: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e ".[dev]"
	touch $(STAMP)

train: $(STAMP)
	$(BIN)/cifarkit train --recipe $(RECIPE) --data $(DATA) $(ARGS)

test: $(STAMP)
	CIFARKIT_REAL_DATA=$(REAL_DATA) $(BIN)/python -m pytest -q -m "not slow" $(PYTEST_ARGS)

# Mutation testing (docs/testing.md): atomic writes, checkpoint safety, resume (the training
# state and loader), evaluation, export parity, the kernel chooser, data splits. Not in `make test`.
MUTATE ?= 'cifarkit.atomic.*' 'cifarkit.training.state.*' \
          'cifarkit.training.loader.x*Loader*__init__*' 'cifarkit.training.loader.x*Loader*start_epoch*' \
          'cifarkit.training.loader.x*Loader*end_epoch*' 'cifarkit.training.loader.x*Loader*batch__*' \
          'cifarkit.training.loader.x*Loader*state_dict*' \
          'cifarkit.checkpoint.x__torch_load*' 'cifarkit.checkpoint.x_load_weights*' \
          'cifarkit.checkpoint.x_save_checkpoint*' 'cifarkit.checkpoint.x__network_for*' \
          'cifarkit.checkpoint.x_strip_prefixes*' 'cifarkit.checkpoint.x__find_state_dict*' \
          'cifarkit.evaluate.x_class_metrics*' 'cifarkit.evaluate.x_evaluate__*' \
          'cifarkit.data.tensors.x_stratified_split*' 'cifarkit.export.x__finish*' \
          'cifarkit.kernels.x_choose*' 'cifarkit.kernels.x__best_ms*'
mutate: $(STAMP)
	rm -rf mutants
	$(BIN)/mutmut run --max-children 2 $(MUTATE)
	$(BIN)/mutmut results

# Line coverage per module, subprocess runs included (docs/testing.md): the default test run.
coverage: $(STAMP)
	rm -f .coverage .coverage.*
	CIFARKIT_REAL_DATA=$(REAL_DATA) $(BIN)/python -m pytest -q -m "not slow" --cov=cifarkit --cov-report= $(PYTEST_ARGS)
	$(BIN)/python -m coverage combine -q || true
	$(BIN)/python -m coverage report

bench: $(STAMP)
	$(BIN)/python benchmarks/throughput.py --data $(REAL_DATA)
	$(BIN)/python benchmarks/fast_recipe.py --data $(REAL_DATA) --seeds 3

# A separate environment for comparing against airbench (never a cifarkit dependency).
bench-env: .venv-bench/.installed
.venv-bench/.installed: pyproject.toml
	test -x .venv-bench/bin/python || $(PYTHON) -m venv .venv-bench
	.venv-bench/bin/python -m pip install -q -e . airbench
	touch $@

clean:
	rm -rf $(VENV) .venv-bench runs .pytest_cache
