# One-command entry points. Each target sets up .venv first (idempotent; re-run when pyproject.toml changes).
# libtpu goes to .aot/libtpu, not the venv: only the deviceless TPU compile checks (pallas_kernels/aot.py) load it.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python

.PHONY: setup demo test bench clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e ".[test]"
	$(PY) -m pip install -q --no-deps --upgrade --target .aot/libtpu "libtpu==0.0.42.*"   # TPU compiler, off the import path
	touch $@

setup: $(VENV)/.installed

demo: setup   ## generate with the tiny config on random weights
	$(PY) -m launch.decode --config=tiny --prompt_ids=5,17,300 --max_new_tokens=32

test: setup   ## the whole test suite (CPU, a few minutes)
	$(PY) -m pytest -q

bench: setup
	$(PY) bench/compile_time.py

clean:
	rm -rf $(VENV) .pytest_cache
