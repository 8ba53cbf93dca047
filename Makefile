# Two commands on a fresh machine: `make demo` and `make test`. Each sets itself up.
PYTHON ?= python3
VENV ?= .venv
TORCH_SPEC ?= torch==2.13.0
# e.g. https://download.pytorch.org/whl/cpu for the CPU-only build on any machine (README, "Installing")
TORCH_INDEX ?=
BIN := $(VENV)/bin

.PHONY: setup demo test
setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q "$(TORCH_SPEC)" $(if $(TORCH_INDEX),--index-url "$(TORCH_INDEX)")
	$(BIN)/python -m pip install -q -e '.[test,onnx,tensorboard]'
	$(PYTHON) -m venv $(VENV)/mlflow-server
	$(VENV)/mlflow-server/bin/python -m pip install -q "mlflow>=3"
	touch $@

demo: setup
	$(BIN)/python jobs/train.py

test: setup
	$(BIN)/python -m pytest -q
