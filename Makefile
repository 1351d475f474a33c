# Everything a newcomer needs: `make setup`, `make demo`, `make test`.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
# torch is installed before everything else, from TORCH_SPEC (CI machines hold a CPU wheel of 2.13.0 on disk);
# a torch already in $(VENV), e.g. a CUDA build installed by hand, is kept. Extra pip arguments are allowed:
#   make setup TORCH_SPEC="torch==2.13.0 --index-url https://download.pytorch.org/whl/cpu"
TORCH_SPEC ?= torch==2.13.0

.PHONY: setup test demo bench clean

$(VENV)/.installed: requirements.txt requirements-dev.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q $(TORCH_SPEC)
	$(PY) -m pip install -q -r requirements.txt -r requirements-dev.txt
	touch $@

setup: $(VENV)/.installed

# Two workers: most tests (and the trainers they start) use one thread each, so two cores run two at a time.
JOBS ?= 2
test: setup
	$(PY) -m pytest -q -n $(JOBS)

FAMILY ?= sdxl
demo: setup
	$(PY) demo.py --family $(FAMILY)

bench: setup
	$(PY) bench/bench_validate_only.py

clean:
	rm -rf $(VENV) demo_output .pytest_cache
