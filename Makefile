# Everything a newcomer needs: `make setup`, `make demo`, `make test`.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
# CPU torch by default (what CI and the tests use); `make setup TORCH_SPEC=torch` on a GPU machine
# with a CUDA build of pip's default index, or install your CUDA torch into $(VENV) first.
TORCH_SPEC ?= torch==2.13.0

.PHONY: setup test demo bench bench-gpu clean

$(VENV)/.installed: requirements.txt requirements-dev.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# A torch already in the venv (e.g. a CUDA build installed by hand) is kept.
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q "$(TORCH_SPEC)"
	$(PY) -m pip install -q -r requirements.txt -r requirements-dev.txt
	touch $@

setup: $(VENV)/.installed

test: setup
	$(PY) -m pytest -q

demo: setup
	$(PY) demo.py

bench: setup
	$(PY) bench/bench_validate_only.py

clean:
	rm -rf $(VENV) demo_output .pytest_cache
