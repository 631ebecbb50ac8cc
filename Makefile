# fastadapt: `make demo` (the main job on the bundled models) and `make test` set everything up on a fresh machine.
VENV ?= .venv
PY ?= $(VENV)/bin/python
STAMP := $(VENV)/.installed-$(shell cat requirements.txt | sha1sum | cut -c1-12)
RESULTS ?= results
export PYTHONUNBUFFERED := 1

.PHONY: setup test test-fast lint demo serve loadtest protos bench train-omniglot train-omniglot-20w gpu-check clean

setup: $(STAMP)

$(STAMP): requirements.txt
	@test -x $(VENV)/bin/python || python3 -m venv $(VENV)
	$(VENV)/bin/pip install -q --disable-pip-version-check -r requirements.txt
	@rm -f $(VENV)/.installed-* && touch $@

test: setup
	$(PY) -m pytest -q tests

lint: setup
	$(VENV)/bin/ruff check .

protos: setup
	$(PY) -m server.protogen

demo: setup
	$(PY) -m server.demo

serve: setup
	$(PY) -m server --model-dir models/zoo --host 127.0.0.1 --port 50051

loadtest: setup
	$(PY) -m server.loadtest --out $(RESULTS)/loadtest

bench: setup
	$(PY) -m kernels.bench --out $(RESULTS)/bench

train-omniglot: setup
	$(PY) -m trainer omniglot-5w1s

train-omniglot-20w: setup
	$(PY) -m trainer omniglot-20w1s

# On a GPU box with torch/triton/grpcio already installed: `make gpu-check PY=python3 RESULTS=/some/dir`.
gpu-check:
	bash scripts/gpu_check.sh $(RESULTS)

clean:
	rm -rf $(VENV) .pytest_cache
