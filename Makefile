# Two entry points (README "Quick start"): `make run` and `make test`. Both install what is
# missing: Debian packages (DCMTK, Orthanc, dicom3tools, chromium for the browser test) for
# the tests, and a virtualenv with the package and its Python dependencies for both.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
SUDO   := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
# DCMTK tools wait ~40 ms per instance (Nagle + delayed ACK) unless this is set.
export TCP_NODELAY := 1

.PHONY: run test test-all system-deps venv clean

$(STAMP): pyproject.toml
	@$(PYTHON) -m venv --help >/dev/null 2>&1 || { $(SUDO) apt-get update -qq && $(SUDO) env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq python3-venv; }
	@[ -x $(BIN)/python ] || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	# the CPU build of torch first: an open range would pull a multi-GB CUDA build
	$(BIN)/python -m pip install -q torch==2.13.0
	$(BIN)/python -m pip install -q -e '.[test]'
	@touch $(STAMP)

venv: $(STAMP)

system-deps:
	@missing=""; \
	command -v storescu >/dev/null 2>&1 || missing="$$missing dcmtk"; \
	{ command -v Orthanc >/dev/null 2>&1 || [ -x /usr/sbin/Orthanc ]; } || missing="$$missing orthanc"; \
	command -v dciodvfy >/dev/null 2>&1 || missing="$$missing dicom3tools"; \
	[ -x /usr/bin/chromium ] || missing="$$missing chromium"; \
	if [ -n "$$missing" ]; then \
	  echo "installing Debian packages:$$missing"; \
	  $(SUDO) apt-get update -qq && $(SUDO) env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing; \
	fi

## start the node on the embedded default (SQLite, local disk) with config.toml
run: $(STAMP)
	$(BIN)/pacs-node serve --config config.toml

## the whole test suite, with real DCMTK, Orthanc, dciodvfy and PostgreSQL peers
test: system-deps $(STAMP)
	$(BIN)/python -m pytest $(PYTEST_ARGS)

## also the slow checks (long fuzz and soak runs)
test-all: system-deps $(STAMP)
	$(BIN)/python -m pytest -m '' $(PYTEST_ARGS)

clean:
	rm -rf $(VENV) var .pytest_cache
