# The two commands: `make train` and `make test`. Both create .venv and install the project
# on first use; later calls find the stamp file and skip the install (near 0 s).
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
ARGS ?=

.PHONY: install train test test-fast lint bench clean

install: $(STAMP)

$(STAMP): pyproject.toml
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	@# These two wheels lie on the build machines' disk; naming them avoids a multi-GB download.
	$(BIN)/python -m pip install --quiet torch==2.14.1 torchvision==0.29.1
	$(BIN)/python -m pip install --quiet -e ".[dev,slurm]"
	@touch $(STAMP)

train: $(STAMP)
	$(BIN)/vae-train $(ARGS)

# Two pytest workers on two cores: one intra-op thread each. With the default (all cores per
# process) the OpenMP threads of both workers spin against each other and small models train
# up to 10x slower.
test: $(STAMP)
	OMP_NUM_THREADS=1 $(BIN)/python -m pytest -q -n 2 --durations=15 --nbmake notebooks tests $(ARGS)

test-fast: $(STAMP)
	OMP_NUM_THREADS=1 $(BIN)/python -m pytest -q -n 2 -m "not slow" $(ARGS)

lint: $(STAMP)
	$(BIN)/ruff check vae experiments tests benchmarks

bench: $(STAMP)
	$(BIN)/python benchmarks/run_all.py

clean:
	rm -rf logs multirun outputs .pytest_cache
