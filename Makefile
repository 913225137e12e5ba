# Two commands do all the set-up on a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
TORCH_PINS := torch==2.14.1 torchvision==0.29.1

.PHONY: demo test lint bench clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip

$(VENV)/.installed-base: $(BIN)/python pyproject.toml
	$(BIN)/pip install --quiet $(TORCH_PINS)
	$(BIN)/pip install --quiet -e ".[vision,arviz]"
	touch $@

$(VENV)/.installed-test: $(VENV)/.installed-base
	$(BIN)/pip install --quiet -e ".[vision,arviz,test,dev]"
	$(BIN)/python -m ipykernel install --sys-prefix --name python3 > /dev/null
	touch $@

demo: $(VENV)/.installed-base
	$(BIN)/pyro-sparse demo --out runs/demo

test: $(VENV)/.installed-test
	$(BIN)/ruff check .
	PYRO_SPARSE_SMOKE=1 OMP_NUM_THREADS=1 $(BIN)/python -m pytest -q -n 2 tests

lint: $(VENV)/.installed-test
	$(BIN)/ruff check .

clean:
	rm -rf $(VENV) runs
