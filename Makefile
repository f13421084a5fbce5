# Quick start: `make debug` (train a tiny GPT on this machine) and `make test`.
SHELL := /bin/bash
VENV ?= .venv
PY := $(VENV)/bin/python
# A cluster keeps the CUDA torch it already has: `make install VENV_FLAGS=--system-site-packages`.
VENV_FLAGS ?=
TORCH_CPU := torch==2.13.0
DEBUG_DATA ?= data/debug
DEBUG_RUN ?= runs/debug
PYTEST_ARGS ?=

export OMP_NUM_THREADS ?= 2
export DS_ACCELERATOR ?= cpu
export WANDB_MODE ?= offline
export TOKENIZERS_PARALLELISM ?= false
# The venv's tools (ninja for DeepSpeed's JIT ops) last, so a system ninja, when present, is the
# one every process uses: two ninja versions make DeepSpeed rebuild its ops over and over.
export PATH := $(PATH):$(abspath $(VENV))/bin
# DeepSpeed compiles its C++ ops just in time; one cache per venv, so that two environments on
# one machine (or a shared home on a cluster) never invalidate each other's builds.
export TORCH_EXTENSIONS_DIR ?= $(abspath $(VENV))/torch_extensions

.PHONY: install debug debug-data test bench clean

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV_FLAGS) $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# torch first: any other spec would pull a multi-GB CUDA build on a CPU machine.
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q $(TORCH_CPU)
	$(PY) -c "import torch; print('torch==' + torch.__version__)" > $(VENV)/constraints.txt
	$(PY) -m pip install -q -c $(VENV)/constraints.txt -e '.[dev]'
	# Build DeepSpeed's CPU communication op now (~30-60 s once) rather than in the first run.
	DS_ACCELERATOR=cpu $(PY) -c "from deepspeed.ops.op_builder.cpu import ShareMemCommBuilder as B; B().load()" \
	    || echo "note: DeepSpeed's shm op did not prebuild; it builds on first use"
	touch $@

# A small real corpus: the Python standard library's own source ships on every machine.
$(DEBUG_DATA)/manifest.json: | install
	$(VENV)/bin/pretrain-data --input $$($(PY) -c "import sysconfig; print(sysconfig.get_paths()['stdlib'])") \
	    --output $(DEBUG_DATA) --vocab-size 4096 --seq-len 128 --max-input-mb 24 --shard-size-mb 8 --overwrite

debug-data: $(DEBUG_DATA)/manifest.json

debug: install debug-data
	$(VENV)/bin/pretrain-train experiment=debug data.path=$(DEBUG_DATA) run.dir=$(DEBUG_RUN)
	$(VENV)/bin/pretrain-report $(DEBUG_RUN)

test: install
	$(PY) -m pytest -q -rs $(PYTEST_ARGS)

bench: install
	$(PY) -m bench.all

clean:
	rm -rf $(VENV) $(DEBUG_DATA) $(DEBUG_RUN)
