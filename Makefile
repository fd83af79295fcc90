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
	@echo "make reset  - forget the demo's state (closed cards, faults, lookups); keeps .venv"
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

# DEMO_ARGS: more options of server/demo.py, e.g. make demo DEMO_ARGS="--secure --person 3".
demo: install
	$(PY) -m server.demo $(DEMO_ARGS)

# make serve also installs grpcurl (.venv/bin/grpcurl), which the README's examples use.
serve: install web $(VENV)/.installed-serve
	$(PY) -m server.demo --serve $(DEMO_ARGS)

$(VENV)/.installed-serve: pyproject.toml | $(PY)
	$(PY) -m pip install --quiet -e . --group serve
	@touch $(VENV)/.installed $@

.PHONY: reset
# Back to a fresh demo (banks' closed or frozen cards, injected faults, the union's lookups and reports);
# .venv and node_modules stay. Refused while make serve or make demo runs.
reset: install
	$(PY) -m server.demo --reset

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
	$(VENV)/bin/lint-imports

typecheck: install-dev
	$(VENV)/bin/mypy

buf-lint: tools
	$(BUF) lint

# Compare the contracts with the previous commit of main (skipped when there is none).
buf-breaking: tools
	@if git rev-parse --verify --quiet HEAD~1 >/dev/null; then \
		$(BUF) breaking --against ".git#ref=HEAD~1" && echo "buf breaking: no breaking changes against HEAD~1"; \
	else echo "buf breaking: no previous commit, skipped"; fi

pytest: install-dev tools ts-tools promtool web chromium
	$(VENV)/bin/pytest $(PYTEST_ARGS)

.PHONY: promtool
# promtool checks the alert rules in ops/prometheus (tests/test_ops.py). It comes with Debian's prometheus
# package, installed here when missing and root (as in CI, like .ci/run's PostgreSQL); otherwise the
# test says it is skipped.
promtool:
	@if ! command -v promtool >/dev/null 2>&1; then \
		if [ "$$(id -u)" = "0" ] && command -v apt-get >/dev/null 2>&1; then \
			echo "promtool is missing; installing Debian's prometheus package"; \
			apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
				prometheus >/dev/null; \
		else echo "promtool is missing and this is not root: the alert rules' check is skipped"; fi; \
	fi

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
