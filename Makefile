# Two entry points for a fresh machine: `make quickstart` and `make test` (both create .venv on first use).
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# constraints.txt pins the CPU torch build found on this machine; on a CUDA box use CONSTRAINTS= to keep yours.
CONSTRAINTS ?= constraints.txt
PIP_FLAGS := $(if $(CONSTRAINTS),-c $(CONSTRAINTS),)

.PHONY: quickstart test test-slow lint bench screenshot

$(BIN)/eri: pyproject.toml $(CONSTRAINTS)
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --disable-pip-version-check $(PIP_FLAGS) -e ".[dev]"
	touch $@

quickstart: $(BIN)/eri
	$(BIN)/eri quickstart

test: $(BIN)/eri
	$(BIN)/python -m pytest -q

# the multi-process and other slow end-to-end tests (CI runs them after `make test`)
test-slow: $(BIN)/eri
	$(BIN)/python -m pytest -q -m slow

# rewrites docs/ui.png (the README's eri ui picture) from the browser test; needs chromium + chromedriver
screenshot: $(BIN)/eri
	ERI_UI_SCREENSHOT=docs/ui.png $(BIN)/python -m pytest -q tests/ui/test_ui_browser.py

lint: $(BIN)/eri
	$(BIN)/ruff check src tests bench
