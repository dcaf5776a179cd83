# The two set-up commands of the README: `make demo` and `make test`.
# Both create .venv on first use and install only what is missing (with the serve and ray extras,
# so the HTTP service and the Ray build are tested too).

PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
# The torch/torchvision pair this project is tested with (timm imports torchvision; the two
# must match). On a GPU machine use `make install FAISS=gpu`.
TORCH_PINS ?= torch==2.14.1 torchvision==0.29.1
FAISS  ?= cpu
STAMP  := $(VENV)/.installed-$(FAISS)
PYTEST_ARGS ?=

.PHONY: install test test-all demo bench clean

install: $(STAMP)

$(STAMP): pyproject.toml
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --disable-pip-version-check $(TORCH_PINS)
	$(BIN)/python -m pip install -q --disable-pip-version-check -e ".[$(FAISS),dev,ray]"
	@touch $@

test: install
	$(BIN)/python -m pytest $(PYTEST_ARGS)

test-all: install
	$(BIN)/python -m pytest -m "" $(PYTEST_ARGS)

demo: install
	$(BIN)/python -m geoloc.demo

bench: install
	$(BIN)/python benchmarks/latency.py --out runs/bench/latency.json
	$(BIN)/python benchmarks/cell_scoring.py --bundle indexes/demo --out runs/bench/cell_scoring.json
	$(BIN)/python benchmarks/accuracy.py --out runs/bench/accuracy.json

clean:
	rm -rf runs .pytest_cache .hypothesis
