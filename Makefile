# One-command entry points. Each target sets up .venv first (idempotent; re-run when pyproject.toml changes).
# libtpu goes to .aot/libtpu, not the venv: only the deviceless TPU compile checks (pallas_kernels/aot.py) load it.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python

.PHONY: setup demo test notebook bench clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e ".[test]"
	$(PY) -m pip install -q --no-deps --upgrade --target .aot/libtpu "libtpu==0.0.42.*"   # TPU compiler, off the import path
	touch $@

setup: $(VENV)/.installed

demo: setup   ## the shipped demo model (trained on Botchan) continues a prompt
	$(PY) -m launch.decode --config=demo --prompt="I was" --raw --max_new_tokens=60

test: setup   ## the whole test suite (CPU) on 2 workers; the Pallas kernel tests in a second run, to bound one process's memory (tests, not files, shared out: the kernel files are few and uneven)
	$(PY) -m pytest -q -n 2 --dist loadfile --no-loadscope-reorder --durations=25 --ignore=tests/test_pallas.py --ignore=tests/test_kernel_compressor.py --ignore=tests/test_kernel_encode.py --ignore=tests/test_pallas_aot.py
	$(PY) -m pytest -q -n 2 --dist load --durations=15 tests/test_pallas.py tests/test_kernel_compressor.py tests/test_kernel_encode.py tests/test_pallas_aot.py

notebook: setup   ## runs notebooks/quickstart.ipynb top to bottom (fails on any cell error); executed copy in build/notebooks/
	$(PY) notebooks/execute.py notebooks/quickstart.ipynb --output=build/notebooks/quickstart.ipynb

bench: setup
	$(PY) bench/compile_time.py

clean:
	rm -rf $(VENV) .pytest_cache
