# make demo  : QAT int4 on the embedded model, before/after table (sets itself up)
# make test  : the test suite (sets itself up)
# make setup : virtual environment in .venv with everything installed
# make notebooks-outputs : run every notebook on the real model and store its outputs in it
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
RUN    := tools/with-blas $(BIN)/python

.PHONY: setup demo test notebooks notebooks-outputs bench clean

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	@bash tools/install-blas
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e ".[test]"
	@touch $@

demo: setup
	$(RUN) -m mlxqat.train

test: setup
	$(RUN) -m pytest -q

notebooks: setup
	$(BIN)/pip install -q jupyter
	tools/with-blas $(BIN)/jupyter notebook notebooks/

notebooks-outputs: setup
	@test -f .models/SmolLM2-135M-Instruct.Q4_1.gguf || tools/fetch-models
	$(RUN) tools/notebook_outputs.py

bench: setup
	$(RUN) benchmarks/quality.py

clean:
	rm -rf $(VENV) .pytest_cache build *.egg-info
