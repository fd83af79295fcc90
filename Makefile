# 一键查卡 — the two commands that matter: `make demo` and `make test`.
# Everything is installed into ./.venv (Python) and ./node_modules (buf) by these targets.

PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
BUF    := node_modules/.bin/buf

.PHONY: demo serve test lint typecheck buf-lint buf-breaking protos pytest install install-dev tools clean help

help:
	@echo "make demo   - start the union and 16 banks on loopback, run one lookup, print the masked report"
	@echo "make serve  - start the union and 16 banks and keep them running (Ctrl-C stops them)"
	@echo "make test   - install what tests need, then lint, type-check, buf lint and run every test"
	@echo "make protos - regenerate gen/python from protos/"

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip

# Runtime install (the demo). Re-run when pyproject.toml changes.
$(VENV)/.installed: pyproject.toml | $(PY)
	$(PY) -m pip install --quiet -e .
	@touch $@

# Development install: runtime + codegen + test + lint groups (PEP 735 dependency groups).
$(VENV)/.installed-dev: pyproject.toml | $(PY)
	$(PY) -m pip install --quiet -e . --group dev
	@touch $(VENV)/.installed $@

$(BUF): package.json package-lock.json
	npm ci --no-audit --no-fund --loglevel=error
	@touch $@

install: $(VENV)/.installed
install-dev: $(VENV)/.installed-dev
tools: $(BUF)

demo: install
	$(PY) -m server.demo

serve: install
	$(PY) -m server.demo --serve

protos: install-dev
	$(PY) scripts/generate_protos.py

lint: install-dev
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

typecheck: install-dev
	$(VENV)/bin/mypy

buf-lint: tools
	$(BUF) lint

# Compare the contracts with the previous commit of main (skipped when there is none).
buf-breaking: tools
	@if git rev-parse --verify --quiet HEAD~1 >/dev/null; then \
		$(BUF) breaking --against ".git#ref=HEAD~1" && echo "buf breaking: no breaking changes against HEAD~1"; \
	else echo "buf breaking: no previous commit, skipped"; fi

pytest: install-dev tools
	$(VENV)/bin/pytest $(PYTEST_ARGS)

test: lint typecheck buf-lint pytest

clean:
	rm -rf $(VENV) node_modules data .mypy_cache .ruff_cache .pytest_cache
