# nanogdrt: the commands a user needs. `make setup` once, then `make test`.
PY      ?= .venv/bin/python
VENV    := .venv
STAMP   := $(VENV)/.installed
CKPT    := checkpoints/smollm2-135m-instruct/model.safetensors

.PHONY: setup test train tutorials tutorials-check repro controlled gpu-payload gpu-status bench bench-train bench-beam bench-attribution bench-gdrt clean

setup: $(STAMP) $(CKPT)

# The CPU wheel of torch is pinned first so that nothing pulls a multi-GB CUDA build.
$(STAMP): pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e ".[test]"
	touch $(STAMP)

$(CKPT): $(STAMP)
	$(PY) -m nanogdrt.checkpoint

test: setup
	$(PY) -m pytest -q

train: setup
	$(PY) train.py

# Reproduction on the real Toy and Books splits (docs/results.md, generated): stages of <= ~1 h whose outputs
# are committed in docs/repro/<row>/; finished stages are skipped, so any machine continues the run.
# A subset or a time budget: make repro REPRO_ARGS="--only 'train:sft-s0,test:sft-s0' --max-minutes 170"
# A session's share, one git commit per finished stage: make repro REPRO_ARGS="--max-minutes 170 --commit"
# Books beside Toy (docs/repro_v3_plan.md, registered before its runs): the same budget, outputs in
# docs/repro-book/; its stages run first so that Toy's report (docs/results.md, whose primary family
# spans both datasets) reads them. Books' GDRT for the family is fixed at G 5 tau 0.5; its grid is exploratory.
TOY ?= ../shared/data/toy
BOOK ?= ../shared/data/book
REPRO_ARGS ?=
BOOK_PLAN = --dataset book --data-dir $(BOOK) --train-file train.csv --skip-bad --docs docs/repro-book \
	--runs runs/repro-book --figures docs/figures/repro-book --results docs/repro-book/results.md \
	--grid 2:0.2,2:0.5,2:1,5:0.2,5:0.5,5:1 --msl-taus 1 --stages data,robust,sweep,baselines,sweeptest,figures,report
repro: setup
	$(PY) -m experiments.repro $(BOOK_PLAN) $(REPRO_ARGS)
	$(PY) -m experiments.repro --data-dir $(TOY) $(REPRO_ARGS)

# The controlled world's pre-registered sweep (docs/controlled/plan.md; report: docs/controlled/results.md):
# stages of minutes, outputs committed in docs/controlled/s<S>/<row>/, finished stages skipped.
# The gate first: make controlled CONTROLLED_ARGS="--only 'pilot:*'"
# A session's share: make controlled CONTROLLED_ARGS="--max-minutes 170 --commit"
CONTROLLED_ARGS ?=
controlled: setup
	$(PY) -m experiments.controlled $(CONTROLLED_ARGS)

# The paper's protocol on a lent GPU (docs/gpu_protocol.md): the carried folders .devpayload/1..n
# (model, gguf wheel, Toy files) and the device calls to make, in order; then what is done.
gpu-payload: setup
	$(PY) -m experiments.gpu.transfer prepare --data-dir $(TOY)

gpu-status:
	$(PY) -m experiments.gpu status

# Re-executes every notebook in tutorials/ in place: they are committed with their outputs (and
# assert what they teach). `make tutorials-check` runs them in memory only, as CI does.
tutorials: setup
	$(PY) -m tools.execute_tutorials

tutorials-check: setup
	$(PY) -m pytest -q tests/test_tutorials.py tests/test_tutorial_exercises.py

# Benchmarks print nanogdrt and the reference library side by side; run them on an idle machine.
bench: bench-train bench-beam bench-attribution bench-gdrt

bench-train: setup
	$(PY) -m bench.bench_train

bench-beam: setup
	$(PY) -m bench.bench_beam

bench-attribution: setup
	$(PY) -m bench.bench_attribution

bench-gdrt: setup
	$(PY) -m bench.bench_gdrt

clean:
	rm -rf $(VENV) checkpoints .pytest_cache
