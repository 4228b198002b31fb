# `make demo` and `make test` set themselves up: a virtualenv in .venv with pinned installs.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.kiln-installed
DEMO_STAMP := $(VENV)/.kiln-demo-installed
# The demo needs the core and two extras; the tests need every extra.
DEMO_EXTRAS := metrics,plots
ALL_EXTRAS  := dev,bench,lora,data,metrics,tensorboard,wandb,mlflow,plots,sweep,postgres,export,serve,ray
PIP := $(BIN)/python -m pip install --quiet --disable-pip-version-check -c constraints.txt

.PHONY: setup demo test lint format bench clean image

setup: $(STAMP)

# On a GPU machine: make setup TORCH_INDEX_URL=https://download.pytorch.org/whl/cu128
# installs the CUDA build of the pinned torch first (2.13.0+cu128 satisfies torch==2.13.0).
TORCH_INDEX_URL ?=

# Reinstall only when the package metadata or the pins change. `make demo` on a new machine
# installs only what the demo needs (half the time and size of everything); the full install
# covers the demo too.
define venv
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(if $(TORCH_INDEX_URL),$(PIP) torch --index-url $(TORCH_INDEX_URL))
endef

$(DEMO_STAMP): pyproject.toml constraints.txt
	$(venv)
	$(PIP) -e ".[$(DEMO_EXTRAS)]"
	@touch $(DEMO_STAMP)

$(STAMP): pyproject.toml constraints.txt
	$(venv)
	$(PIP) -e ".[$(ALL_EXTRAS)]"
	@touch $(DEMO_STAMP) $(STAMP)

demo: $(DEMO_STAMP)
	$(BIN)/kiln train configs/quickstart.yaml --overwrite

# Two workers (2 cores); the rank-starting modules share one xdist group (tests/conftest.py).
test: setup lint
	$(BIN)/python -m pytest -q -n 2 --dist loadgroup

lint: setup
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

format: setup
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

bench: setup
	$(BIN)/python benchmarks/step_overhead.py

# The container image (Dockerfile, docs/deploy.md), with podman if it is here, else docker.
# A GPU image: make image BASE=nvidia/cuda:12.8.1-runtime-ubuntu24.04 TORCH_INDEX_URL=...cu128
# IMAGE_FLAGS: more `build` flags (a pip.conf for the build: docs/deploy.md).
CONTAINER ?= $(if $(shell command -v podman),podman,docker)
IMAGE ?= kiln
BASE ?=
IMAGE_FLAGS ?=
IMAGE_ARGS = $(if $(findstring podman,$(CONTAINER)),--format docker) $(if $(BASE),--build-arg \
	BASE=$(BASE)) $(if $(TORCH_INDEX_URL),--build-arg TORCH_INDEX_URL=$(TORCH_INDEX_URL))
image:
	$(CONTAINER) build $(strip $(IMAGE_ARGS) $(IMAGE_FLAGS)) -t $(IMAGE) .

clean:
	rm -rf $(VENV) runs .pytest_cache .ruff_cache
