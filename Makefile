# Two entry points (see README): `make demo` and `make test`. Both set up .venv from nothing.
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.slimformer-installed

.PHONY: demo test test-slow test-all bench peers llamacpp llamacpp-tools

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

# the slow tier (tests marked `slow`: whole-model GPTQ/AWQ/mixed/static runs, the recipe end to end);
# CI runs it after `make test`
test-slow: $(STAMP)
	$(PY) -m pytest -q -m slow --durations=15

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
# --no-deps keeps pip off torch; of its requirements only diskcache is not already installed;
# --no-cache-dir: a wheel cached on another day's CPU (AVX-512) would not run on this one.
LLAMACPP_VERSION := 0.3.36
# AMX off: on this VM's Sapphire Rapids CPU, -march=native compiles ggml's AMX matmul, whose first
# ldtilecfg faults (general protection fault in ggml_backend_amx_mul_mat, every Q4_0/Q8_0 file);
# gcc's -mno-amx-* win over -march=native whatever their order, and are harmless without AMX.
LLAMACPP_NO_AMX := -mno-amx-tile -mno-amx-int8 -mno-amx-bf16
LLAMACPP_CMAKE_ARGS ?= -DGGML_NATIVE=ON -DGGML_BLAS=OFF -DGGML_CUDA=OFF -DGGML_METAL=OFF -DGGML_VULKAN=OFF \
	-DCMAKE_C_FLAGS='$(LLAMACPP_NO_AMX)' -DCMAKE_CXX_FLAGS='$(LLAMACPP_NO_AMX)'
llamacpp: $(STAMP)
	$(PY) -m pip install -q --no-deps diskcache==5.6.3
	CMAKE_ARGS="$(LLAMACPP_CMAKE_ARGS)" $(PY) -m pip install --no-deps --no-cache-dir --no-binary llama-cpp-python \
		llama-cpp-python==$(LLAMACPP_VERSION)
	$(PY) -c "import torch, llama_cpp, numpy, jinja2, diskcache, typing_extensions; \
		assert torch.__version__.startswith('2.13.0'), torch.__version__; print('llama_cpp', llama_cpp.__version__)"

# llama.cpp's own converter (convert_hf_to_gguf.py) and its llama-quantize / llama-imatrix tools, from
# the same pinned sdist, into .venv/llama.cpp/{src,bin}: what benchmarks/llamacpp.py compares against.
# sentencepiece: the converter imports it for Llama-family vocabularies.
LLAMACPP_TOOLS := $(VENV)/llama.cpp
llamacpp-tools: $(STAMP)
	$(PY) -m pip install -q --no-deps sentencepiece==0.2.3
	rm -rf $(LLAMACPP_TOOLS) && mkdir -p $(LLAMACPP_TOOLS)/bin
	$(PY) -m pip download -q --no-deps --no-binary :all: llama-cpp-python==$(LLAMACPP_VERSION) -d $(LLAMACPP_TOOLS)/dl
	tar xzf $(LLAMACPP_TOOLS)/dl/llama_cpp_python-$(LLAMACPP_VERSION).tar.gz -C $(LLAMACPP_TOOLS)/dl
	ln -s dl/llama_cpp_python-$(LLAMACPP_VERSION)/vendor/llama.cpp $(LLAMACPP_TOOLS)/src
	cmake -S $(LLAMACPP_TOOLS)/src -B $(LLAMACPP_TOOLS)/build -DCMAKE_BUILD_TYPE=Release -DBUILD_SHARED_LIBS=OFF \
		-DLLAMA_CURL=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_SERVER=OFF $(LLAMACPP_CMAKE_ARGS)
	cmake --build $(LLAMACPP_TOOLS)/build --target llama-quantize llama-imatrix -j2
	cp $(LLAMACPP_TOOLS)/build/bin/llama-quantize $(LLAMACPP_TOOLS)/build/bin/llama-imatrix $(LLAMACPP_TOOLS)/bin/
