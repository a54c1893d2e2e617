# Every target installs what it needs into .venv first, so a fresh clone needs only `make X`.
PYTHON ?= python3.11
VENV   := .venv
BIN    := $(VENV)/bin
# The stamp changes when the pins change, so `make` reinstalls exactly then.
STAMP  := $(VENV)/.installed-$(shell cat pyproject.toml Makefile | sha256sum | cut -c1-12)
EXTRA  ?= cpu
TORCHREC := torchrec==1.8.0
DATA   ?= .data/movielens-1m

.PHONY: venv run lint test test-fast bench data clean

venv: $(STAMP)

$(STAMP): pyproject.toml Makefile
	@command -v $(PYTHON) >/dev/null || { echo "need $(PYTHON) (set PYTHON=...)"; exit 1; }
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[$(EXTRA),dev]'
	# --no-deps: torchrec's metadata would pull the CUDA fbgemm-gpu over the CPU build.
	$(BIN)/pip install -q --no-deps $(TORCHREC)
	rm -f $(VENV)/.installed-*
	touch $@

data: venv
	$(BIN)/morec prepare movielens-1m --out $(DATA)

run: venv
	$(BIN)/morec run --config configs/quickstart.toml

# ruff (lint + format) and mypy over the whole tree, as pyproject.toml configures them.
lint: venv
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy

# the tests not marked slow: for iteration (no pretraining, containers, Prometheus or MovieLens download)
test-fast: venv
	bash tests/run.sh -m "not slow"

# lint first: `.ci/run` only calls `make test`, and a lint or type error must fail it
test: venv lint
	bash tests/tools/install_prometheus.sh
	bash tests/tools/install_containers.sh
	bash tests/run.sh

bench: venv
	$(BIN)/python -m benchmarks.run_all

clean:
	rm -rf $(VENV) .data runs
