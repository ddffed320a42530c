# Both targets set themselves up on a fresh machine: a .venv, the CPU torch wheel when torch is
# absent, and the project with its test extra.
PY ?= python3
VENV := .venv
VPY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: demo test bench setup clean

# torch's OpenMP threads busy-wait by default; on shared cores (Ray workers, Serve replicas, tests
# side by side) that made steps up to 10x slower. Passive waiting costs nothing measurable alone.
export OMP_WAIT_POLICY ?= PASSIVE

setup: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(VPY) || $(PY) -m venv $(VENV)
	$(VPY) -m pip install -q --upgrade pip
	$(VPY) -c "import torch" 2>/dev/null || $(VPY) -m pip install -q torch==2.13.0
	$(VPY) -m pip install -q -e ".[test]"
	touch $(STAMP)

demo: $(STAMP)
	$(VPY) -m student.train

test: $(STAMP)
	$(VPY) -m pytest -q tests

bench: $(STAMP)
	$(VPY) bench/run_all.py

clean:
	rm -rf $(VENV) *.egg-info .pytest_cache
