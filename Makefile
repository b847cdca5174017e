# dreamq: `make dev` runs the whole stack here; `make test` runs lint, types and every test.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
PORT ?= 8000
STAMP := $(VENV)/.installed-stamp
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)

.PHONY: dev test lint typecheck unit integration e2e install redis-server clean

# torch is pinned in pyproject (extra `worker`): pip takes the local CPU wheel here and the
# matching CUDA build on a GPU host. Never torchvision.
$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet -e '.[worker,dev]'
	touch $(STAMP)

redis-server:
	@command -v redis-server >/dev/null 2>&1 || { \
		echo "installing redis-server"; \
		$(SUDO) apt-get update -qq && $(SUDO) apt-get install -y -qq redis-server >/dev/null; }

install: $(STAMP) redis-server

dev: install
	$(BIN)/dreamq dev --port $(PORT)

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

typecheck: $(STAMP)
	$(BIN)/mypy

unit: install
	$(BIN)/python -m pytest tests/unit -q

integration: install
	$(BIN)/python -m pytest tests/integration -q

e2e: install
	$(BIN)/python -m pytest tests/e2e -q

test: install lint typecheck
	$(BIN)/python -m pytest -q

clean:
	rm -rf $(VENV) .dreamq-dev .mypy_cache .ruff_cache
