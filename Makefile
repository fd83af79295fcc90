# 一键查卡 — the two commands that matter: `make demo` and `make test`.
# Everything is installed into ./.venv (Python) and ./node_modules (buf) by these targets.

PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
BUF    := node_modules/.bin/buf
TS     := clients/typescript
WEB    := clients/web

.PHONY: bench demo serve test lint typecheck buf-lint buf-breaking protos ts-tools ts-protos ts-check pytest fuzz \
	install install-dev tools clean help web web-tools chromium

help:
	@echo "make demo   - start the union and 16 banks on loopback, run one lookup, print the masked report"
	@echo "make serve  - start the union and 16 banks and keep them running (Ctrl-C stops them);"
	@echo "              the web page and Connect API on http://127.0.0.1:8080/"
	@echo "make test   - install what tests need, then lint, type-check, buf lint and run every test"
	@echo "make protos - regenerate gen/python and the TypeScript stubs from protos/"
	@echo "make fuzz   - the long property-based fuzz run (100x the examples of make test)"
	@echo "make bench  - end-to-end benchmark against a bare fan-out baseline (BENCH_ARGS=--help for options)"

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

# TypeScript client tools (buf, protoc-gen-es, Connect, tsx, tsc), pinned in clients/typescript/package-lock.json.
$(TS)/node_modules/.package-lock.json: $(TS)/package.json $(TS)/package-lock.json
	cd $(TS) && npm ci --no-audit --no-fund --loglevel=error
	@touch $@

# The person's web page (clients/web): esbuild, Connect-Web and the protobuf runtime, pinned in its lock file;
# the bundle (clients/web/dist, not checked in) is rebuilt when a source or the TypeScript stubs change.
$(WEB)/node_modules/.package-lock.json: $(WEB)/package.json $(WEB)/package-lock.json
	cd $(WEB) && npm ci --prefer-offline --no-audit --no-fund --loglevel=error
	@touch $@

$(WEB)/dist/index.html: $(WEB)/node_modules/.package-lock.json $(WEB)/build.mjs $(WEB)/index.html $(WEB)/app.css $(WEB)/favicon.svg \
		$(wildcard $(WEB)/src/*.ts) $(wildcard $(TS)/src/gen/cardlookup/v1/*.ts)
	cd $(WEB) && npm run -s build

web-tools: $(WEB)/node_modules/.package-lock.json
web: $(WEB)/dist/index.html

# The browser test drives Debian's chromium, never a downloaded browser, with a CJK font for the page's
# Chinese (its screenshots): as root, apt installs them when missing.
CJK_FONT := /usr/share/fonts/truetype/wqy/wqy-microhei.ttc
chromium:
	@if [ ! -x /usr/bin/chromium ] || [ ! -f $(CJK_FONT) ]; then \
		if [ "$$(id -u)" = "0" ]; then \
			echo "chromium: installing Debian's chromium and fonts-wqy-microhei for the browser test"; \
			apt-get update -qq && \
			DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium fonts-wqy-microhei >/dev/null; \
		else echo "chromium: chromium or its CJK font is missing and this is not root; see make chromium"; fi; \
	fi

install: $(VENV)/.installed
install-dev: $(VENV)/.installed-dev
tools: $(BUF)
ts-tools: $(TS)/node_modules/.package-lock.json

demo: install
	$(PY) -m server.demo

serve: install web
	$(PY) -m server.demo --serve

protos: install-dev ts-tools
	$(PY) scripts/generate_protos.py
	cd $(TS) && npm run -s generate

# Regenerate only the TypeScript stubs (clients/typescript/src/gen, checked in like gen/python).
ts-protos: ts-tools
	cd $(TS) && npm run -s generate

# The TypeScript client type-checks (its stubs' drift is checked by tests/clients/test_typescript.py).
ts-check: ts-tools web-tools
	cd $(TS) && npm run -s typecheck
	cd $(WEB) && npm run -s typecheck

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

pytest: install-dev tools ts-tools web chromium
	$(VENV)/bin/pytest $(PYTEST_ARGS)

# Benchmarks are not tests: they print figures and ratios, and never fail on a timing.
$(VENV)/.installed-bench: pyproject.toml | $(PY)
	$(PY) -m pip install --quiet -e . --group bench
	@touch $@

bench: install $(VENV)/.installed-bench
	$(PY) -m bench.run $(BENCH_ARGS)

# Nightly-style: the property-based fuzz tests with 100x the examples.
fuzz: install-dev tools
	CARDLOOKUP_FUZZ_EXAMPLES=100 $(VENV)/bin/pytest tests/fuzz $(PYTEST_ARGS)

test: lint typecheck buf-lint ts-check pytest

clean:
	rm -rf $(VENV) node_modules $(TS)/node_modules $(WEB)/node_modules $(WEB)/dist data .mypy_cache .ruff_cache .pytest_cache
