# The two commands: `make up` starts the mesh, `make test` runs every check.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
SITE = $(shell $(BIN)/python -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')

.PHONY: up test install protos protos-check lint typecheck unit bench clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)

up: $(STAMP)
	$(BIN)/scoremesh up

test: $(STAMP) protos-check lint typecheck
	$(BIN)/pytest

# Regenerate the committed stubs in gen/ from protos/.
protos: $(STAMP)
	$(BIN)/python -m services.mesh.protogen gen

# Fails when the committed stubs differ from what protos/ generates.
protos-check: $(STAMP)
	$(BIN)/python -m services.mesh.protogen check

lint: $(STAMP)
	$(BIN)/ruff check services tests bench
	$(BIN)/ruff format --check services tests bench

typecheck: $(STAMP)
	$(BIN)/mypy

bench: $(STAMP)
	$(BIN)/python -m bench.registry
	$(BIN)/python -m bench.scoring
	$(BIN)/python -m bench.gateway
	$(BIN)/python -m bench.training
	$(BIN)/python -m bench.tracing
	$(BIN)/python -m bench.spans

clean:
	rm -rf $(VENV)
