# Benchmark targets only (the build and tests are `pip install .` and `pytest`, see README.md).
# The harness is benches/run.py (standard library only); results land in benches/results/, the page in
# docs/benchmarks.md. Extra options go through BENCH_ARGS, e.g.
#   make bench BENCH_ARGS='--servers fastws,node-ws --scenarios fanout-1k --repeat 1'

PYTHON ?= python3
BENCH_ARGS ?=

.DEFAULT_GOAL := help
.PHONY: help bench bench-quick bench-docs bench-smoke bench-cluster bench-profile

help: ## List the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-12s %s\n", $$1, $$2}'

bench: ## Full benchmark: every scenario x server, twice (~25 min); writes benches/results/<date>.json + docs/benchmarks.md
	BENCH_COMMAND='make bench' $(PYTHON) benches/run.py $(BENCH_ARGS)

bench-quick: ## Quick check: fanout S=1000 W=16, 3 s, fastws + websockets; writes benches/results/<date>-quick.json
	BENCH_COMMAND='make bench-quick' $(PYTHON) benches/run.py --quick $(BENCH_ARGS)

bench-docs: ## Regenerate docs/benchmarks.md and docs/img/bench-*.png from benches/results/*.json
	benches/.venv/bin/python benches/report.py

bench-smoke: ## Build the load generator and run `loadgen smoke` against a fresh fastws server
	$(PYTHON) benches/run.py --smoke $(BENCH_ARGS)

bench-cluster: ## Cross-node fan-out: 10,000 subscribers on 1 node vs 3 nodes + Redis, twice (~8 min); benches/results/<date>-cluster.json
	BENCH_COMMAND='make bench-cluster' $(PYTHON) benches/cluster.py $(BENCH_ARGS)

bench-profile: ## perf on fastws and socketify during fan-out, per delivery (~1 min; needs linux-perf); benches/results/<date>-profile.json
	$(PYTHON) benches/profile.py $(BENCH_ARGS)
