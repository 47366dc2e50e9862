# make demo: install into .venv, then the whole pipeline on the built-in demo data (CPU, minutes).
# make test: install into .venv, then lint (ruff), type check (mypy) and the whole test suite (what CI runs).
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
DEMO_DIR ?= demo_out

.PHONY: install demo lint test bench clean

$(VENV)/.installed: pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -c constraints.txt torch torchvision
	$(PY) -m pip install --quiet -c constraints.txt -e '.[test,deepspeed,cpu]'
	touch $@

install: $(VENV)/.installed

demo: install
	PATH="$(abspath $(VENV))/bin:$$PATH" bash tools/demo.sh $(DEMO_DIR)

lint: install
	$(PY) -m ruff check smog_scale tools
	$(PY) -m mypy smog_scale tools

test: lint
	$(PY) -m pytest -n 2 --durations=15

bench: install
	$(PY) benchmarks/bench_grouping.py
	$(PY) benchmarks/bench_kmeans.py
	$(PY) benchmarks/bench_data.py
	$(PY) benchmarks/bench_step.py

clean:
	rm -rf $(VENV) $(DEMO_DIR)
