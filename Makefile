# The two commands a newcomer types:  make run   and   make test
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
PORT   ?= 8000
HOST   ?= 127.0.0.1
# CPU machines take torch from the pinned wheel; a GPU box can set TORCH_SPEC=torch.
TORCH_SPEC ?= torch==2.13.0

.PHONY: install browser run test lint bench clean

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

# Debian's Chromium drives tests/browser (Playwright never downloads a browser here).
# Without apt (non-Debian dev boxes) the browser test skips itself and says why.
browser:
	@if [ -x /usr/bin/chromium ]; then :; \
	elif command -v apt-get >/dev/null 2>&1; then \
	  SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
	  echo "installing Debian chromium for tests/browser"; \
	  $$SUDO apt-get update -q && \
	  $$SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends chromium \
	    || { echo "error: apt-get could not install chromium (needed by tests/browser)" >&2; exit 1; }; \
	  [ -x /usr/bin/chromium ] || { echo "error: chromium installed but /usr/bin/chromium is missing" >&2; exit 1; }; \
	else echo "no apt-get: tests/browser will be skipped (no /usr/bin/chromium)"; fi

test: install browser
	$(BIN)/ruff check server pipelines scripts tests
	$(BIN)/mypy
	$(BIN)/python -m pytest -q

lint: install
	$(BIN)/ruff check server pipelines scripts tests
	$(BIN)/mypy

bench: install
	$(BIN)/spillway weights ensure
	$(BIN)/spillway bench

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache .mypy_cache
