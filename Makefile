# The two commands a newcomer types:  make run   and   make test
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
PORT   ?= 8000
HOST   ?= 127.0.0.1
# CPU machines take torch from the pinned wheel; a GPU box can set TORCH_SPEC=torch.
TORCH_SPEC ?= torch==2.13.0

.PHONY: install run test lint bench clean

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q "$(TORCH_SPEC)"
	$(BIN)/python -m pip install -q -e ".[dev]"
	touch $@

run: install
	$(BIN)/spillway weights ensure
	$(BIN)/spillway serve --host $(HOST) --port $(PORT)

test: install
	$(BIN)/ruff check server pipelines scripts tests
	$(BIN)/python -m pytest -q

lint: install
	$(BIN)/ruff check server pipelines scripts tests
	$(BIN)/mypy

bench: install
	$(BIN)/spillway weights ensure
	$(BIN)/spillway bench

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache .mypy_cache
