# fastadapt: `make demo` (the main job on the bundled models) and `make test` set everything up on a fresh machine.
VENV ?= .venv
PY ?= $(VENV)/bin/python
STAMP := $(VENV)/.installed-$(shell cat requirements.txt | sha1sum | cut -c1-12)
# `make bench`, `make loadtest` and `make demo` write their files under $(RESULTS)/ (results/ is gitignored; the runs
# the README quotes are copied into docs/results/ with the command that produced them).
RESULTS ?= results
# Omniglot: $FASTADAPT_OMNIGLOT when set, else ../shared/data/omniglot where it exists, else data/omniglot (gitignored),
# where `make data` fetches the official archives once. Exported: the demo, the tests and the trainer read the same one.
OMNIGLOT_SHARED := ../shared/data/omniglot
OMNIGLOT := $(or $(FASTADAPT_OMNIGLOT),$(if $(wildcard $(OMNIGLOT_SHARED)/images_background*),$(OMNIGLOT_SHARED),data/omniglot))
export FASTADAPT_OMNIGLOT := $(abspath $(OMNIGLOT))
export PYTHONUNBUFFERED := 1
# Extra arguments for `make serve` / `make demo`, e.g. `make serve ARGS="--port 50052 --backend triton"`.
ARGS ?=

.PHONY: setup data test test-fast lint demo serve loadtest protos bench bench-recipes bench-workspace predict-cost train-omniglot train-omniglot-20w gpu-check clean

setup: $(STAMP)

$(STAMP): requirements.txt
	@test -x $(VENV)/bin/python || python3 -m venv $(VENV)
	$(VENV)/bin/pip install -q --disable-pip-version-check -r requirements.txt
	@rm -f $(VENV)/.installed-* && touch $@

# A no-op where the data is; otherwise downloads images_{background,evaluation}.zip (md5-checked, progress bar).
data: setup
	@$(PY) -m trainer.data.fetch "$(FASTADAPT_OMNIGLOT)"

test: setup data
	$(PY) -m pytest -q tests

# Everything but the tests marked slow (8-33 s each on 2 cores: server processes, the demo and load test end to end,
# two-rank training, meta-training on Omniglot).
test-fast: setup data
	$(PY) -m pytest -q -m "not slow" tests

lint: setup
	$(VENV)/bin/ruff check .

protos: setup
	$(PY) -m server.protogen

demo: setup data
	$(PY) -m server.demo --out $(RESULTS)/demo $(ARGS)

# A client adapts the bundled 2D-navigation policy through the wire (server/rl_demo.py): returns per step beside the
# paper and the trainer's evaluation, and a plot of the trajectories (docs/results/rl-demo/ holds a run).
.PHONY: rl-demo
rl-demo: setup
	$(PY) -m server.rl_demo --out $(RESULTS)/rl-demo $(ARGS)

# The same loop with the bundled half-cheetah policy on MuJoCo (docs/results/rl-demo-halfcheetah-vel/: about 75 s).
.PHONY: rl-demo-cheetah
rl-demo-cheetah: setup
	$(PY) -m server.rl_demo --model halfcheetah-vel --out $(RESULTS)/rl-demo-halfcheetah-vel $(ARGS)

# The bundled half-cheetah direction policy (forward / backward) the same way (docs/results/rl-demo-halfcheetah-dir/).
.PHONY: rl-demo-cheetah-dir
rl-demo-cheetah-dir: setup
	$(PY) -m server.rl_demo --model halfcheetah-dir --out $(RESULTS)/rl-demo-halfcheetah-dir $(ARGS)

serve: setup
	$(PY) -m server --model-dir models/zoo --host 127.0.0.1 --port 50051 $(ARGS)

loadtest: setup
	$(PY) -m server.loadtest --out $(RESULTS)/loadtest

# Through Envoy to 1 and 3 replicas sharing a redis-server (installed by .ci/run), beside one replica served directly
# and the engine in-process: requests/s and p50/p99 (server/loadtest_cluster.py). Extra flags: ARGS="--duration 20".
.PHONY: loadtest-cluster
loadtest-cluster: setup
	$(PY) -m server.loadtest_cluster --out $(RESULTS)/loadtest-cluster $(ARGS)

bench: setup
	$(PY) -m kernels.bench --out $(RESULTS)/bench

# Serving cost of a recipe: the earlier MAML 20-way model against the bundled ANIL one (same architecture).
MAML_20W ?= docs/results/omniglot-20w1s-background/maml.pt
bench-recipes: setup
	$(PY) -m kernels.bench.recipes $(MAML_20W) models/zoo/omniglot-20w1s.pt --out $(RESULTS)/bench-recipes

# The CPU reference backend's AdaptAndPredict at several workspace budgets (the chunk size; kernels/engine/chunking.py).
bench-workspace: setup
	$(PY) -m kernels.bench.workspace models/zoo/omniglot-5w1s.pt --out $(RESULTS)/bench-workspace $(ARGS)

# One-image Predict on 1-shot vs 5-shot adaptations: stored support statistics vs the support rows re-forwarded.
predict-cost: setup
	$(PY) -m server.predict_cost --out $(RESULTS)/predict-cost

train-omniglot: setup data
	$(PY) -m trainer omniglot-5w1s

train-omniglot-20w: setup data
	$(PY) -m trainer omniglot-20w1s

# On a GPU box with torch/triton/grpcio already installed: `make gpu-check PY=python3 RESULTS=/some/dir`.
gpu-check:
	bash scripts/gpu_check.sh $(RESULTS)

clean:
	rm -rf $(VENV) .pytest_cache
