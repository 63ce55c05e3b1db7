# The two quick-start commands: `make demo` and `make test`. Each one sets up what it needs.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
BIN := $(VENV)/bin
INSTALLED := $(VENV)/.installed
# Ultralytics needs torchvision, which needs another torch than the main venv's CPU wheel: the
# Ultralytics integration's test runs its example in a venv of its own, with the SDK's
# dependencies only (no server code).
ULTRALYTICS_VENV := .venv-ultralytics
ULTRALYTICS_INSTALLED := $(ULTRALYTICS_VENV)/.installed

.PHONY: demo serve test lint typecheck unit system-deps bench soak clean

$(INSTALLED): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --constraint constraints.txt --editable '.[dev]'
	touch $(INSTALLED)

$(ULTRALYTICS_INSTALLED): pyproject.toml constraints-ultralytics.txt
	$(PYTHON) -m venv $(ULTRALYTICS_VENV)
	$(ULTRALYTICS_VENV)/bin/pip install --quiet --constraint constraints-ultralytics.txt \
		torch torchvision ultralytics anyio httpx websockets orjson
	$(ULTRALYTICS_VENV)/bin/pip install --quiet --no-deps --editable .
	touch $(ULTRALYTICS_INSTALLED)

## Install, then start the service on the embedded default with a demo job to watch.
demo: $(INSTALLED)
	$(BIN)/trainbus demo

serve: $(INSTALLED)
	$(BIN)/trainbus serve

## Install (Python packages, and Debian's prometheus for promtool and chromium for the dashboard's
## browser tests when run as root), then lint, type-check and run the whole test suite.
test: $(INSTALLED) system-deps lint typecheck unit

lint: $(INSTALLED)
	$(BIN)/ruff check .

typecheck: $(INSTALLED)
	$(BIN)/mypy

unit: $(INSTALLED) $(ULTRALYTICS_INSTALLED)
	$(BIN)/python -m pytest

system-deps:
	@if ! command -v promtool >/dev/null 2>&1; then \
		if [ "$$(id -u)" = 0 ]; then \
			apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq prometheus >/dev/null; \
		else \
			echo "promtool is missing: run 'sudo apt-get install prometheus' (Debian/Ubuntu)"; exit 1; \
		fi; \
	fi
	@if [ ! -x /usr/bin/chromium ]; then \
		if [ "$$(id -u)" = 0 ]; then \
			apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null; \
		else \
			echo "chromium is missing (the dashboard's browser tests skip): run 'sudo apt-get install chromium'"; \
		fi; \
	fi

bench: $(INSTALLED)
	$(BIN)/python bench/bus.py
	$(BIN)/python bench/overhead.py
	$(BIN)/python bench/checkpoint.py
	$(BIN)/python bench/store.py
	$(BIN)/python bench/fanout.py
	$(BIN)/python bench/interference.py
	$(BIN)/python bench/dashboard.py
	$(BIN)/python bench/distributed.py

## The reliability suite at soak size (more kills, reconnects, schemathesis cases); figures are
## appended to reliability-report.jsonl for docs/RELIABILITY.md.
soak: $(INSTALLED) system-deps
	TRAINBUS_SOAK=1 TRAINBUS_RELIABILITY_REPORT=$(CURDIR)/reliability-report.jsonl \
		$(BIN)/python -m pytest tests/reliability --timeout 3600 -v

clean:
	rm -rf $(VENV) $(ULTRALYTICS_VENV) *.egg-info .mypy_cache .ruff_cache
