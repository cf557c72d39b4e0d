# `make demo` and `make test` build .venv on a fresh machine when it is missing, then run.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test venv clean benchmarks

$(STAMP): setup.cfg constraints.txt pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -c constraints.txt -e '.[dev,faiss]'
	touch $(STAMP)

venv: $(STAMP)

demo: $(STAMP)
	$(BIN)/retrieval-lightning finetune --config experiments/demo.yaml

test: $(STAMP)
	$(BIN)/python -m pytest -q -n auto --dist loadfile

clean:
	rm -rf $(VENV) build *.egg-info
