# The two commands: `make demo` and `make test`. Both build .venv themselves.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
PLUGIN_PROJECTS := $(wildcard devices/*/pyproject.toml storage_plugins/*/pyproject.toml backends/*/pyproject.toml kernels/pyproject.toml conformance/pyproject.toml conformance/testing_plugins/*/pyproject.toml)

.PHONY: demo test install install-test lint clean

demo: $(VENV)/.demo-installed
	$(BIN)/lmcache demo

test: $(VENV)/.test-installed
	scripts/test-deps.sh
	$(BIN)/python -m pytest -q -ra $(PYTEST_ARGS)

install: $(VENV)/.demo-installed
install-test: $(VENV)/.test-installed

$(VENV)/.demo-installed: pyproject.toml scripts/install.sh
	PYTHON=$(PYTHON) scripts/install.sh $(VENV) demo
	touch $@

$(VENV)/.test-installed: pyproject.toml scripts/install.sh $(PLUGIN_PROJECTS)
	PYTHON=$(PYTHON) scripts/install.sh $(VENV) test
	touch $@ $(VENV)/.demo-installed

clean:
	rm -rf $(VENV) build *.egg-info
