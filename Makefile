# Developer shortcuts. Every target runs in the current Python environment.
#   make test        the test suite (slow tests excluded, as in pyproject.toml; what CI runs)
#   make test-slow   the tests marked slow (about 15 minutes on 2 cores; run with the benchmarks)
#   make lint        ruff check + format check
#   make bench       benchmarks 1-3 with small rounds (several minutes on 2 loaded CPU cores);
#                    outputs in benchmarks/results/*.txt
#   make bench-overhead | bench-throughput | bench-memory   one of them

PYTHON ?= python
RESULTS := benchmarks/results
SHELL := /bin/bash
.SHELLFLAGS := -o pipefail -ec

# Small defaults: ratios are medians of interleaved rounds, so few rounds are enough to see them;
# raise ROUNDS for tighter numbers.
ROUNDS ?= 3
ENSEMBLE_SIZES ?= 3 6 10 21 55

.PHONY: test test-slow lint format bench bench-overhead bench-throughput bench-memory

test:
	$(PYTHON) -m pytest -q

test-slow:
	$(PYTHON) -m pytest -q -m slow

lint:
	ruff check .
	ruff format --check .

format:
	ruff format .

bench: bench-overhead bench-throughput bench-memory

$(RESULTS):
	mkdir -p $@

# 1. SPQR overhead per update against N (package SAC-N; SPQR on data pairs and on Q(s', a'~pi))
bench-overhead: | $(RESULTS)
	cd benchmarks && $(PYTHON) bench_spqr_overhead.py --bases sacn \
		--ensemble-sizes $(ENSEMBLE_SIZES) --variants bare data next_policy \
		--rounds $(ROUNDS) --inner 1 --warmup 1 | tee ../$(RESULTS)/spqr_overhead_vs_N.txt

# 2. Update throughput against TorchRL's losses and a Python-loop ensemble (SAC-N, REDQ), without
#    and with SPQR
bench-throughput: | $(RESULTS)
	cd benchmarks && $(PYTHON) bench_throughput.py --rounds $(ROUNDS) --units 1 \
		| tee ../$(RESULTS)/throughput.txt
	cd benchmarks && $(PYTHON) bench_throughput.py --rounds $(ROUNDS) --units 1 --spqr \
		| tee ../$(RESULTS)/throughput_spqr.txt

# 3. Peak RSS of a short training process and of a 1M-transition Hopper buffer
bench-memory: | $(RESULTS)
	cd benchmarks && $(PYTHON) bench_memory.py | tee ../$(RESULTS)/memory.txt
