# Set-up and entry points. `make demo` and `make test` each create the virtualenv on first use.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
DEMO_WORKDIR ?= runs/digits_l2p

.PHONY: install demo test test-quick bench clean

install: $(VENV)/.installed

$(VENV)/.installed: requirements.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -r requirements.txt
	touch $@

# The embedded default: L2P on scikit-learn's digits from the shipped pretrained ViT-demo (CPU, no download).
demo: install
	rm -rf $(DEMO_WORKDIR)
	$(PY) main.py --my_config configs/digits_l2p.py --workdir $(DEMO_WORKDIR)

# The whole suite (17-18 CPU-minutes: 8 min 41 s to 9 min 22 s measured on 2 idle CPU cores); the slow tests are sent to the workers first,
# one test at a time (tests/conftest.py), so that none of them starts last.
test: install
	$(PY) -m pytest -q -n 3 --maxschedchunk=1 tests

# Skips the tests marked slow (kill/resume, multi-process).
test-quick: install
	$(PY) -m pytest -q -n 3 --maxschedchunk=1 -m "not slow" tests

# Train/eval step throughput on generated data (tiny model on CPU; see README for GPU).
bench: install
	$(PY) bench/step_benchmark.py --config cifar100_l2p --model_name ViT-test --input_size 32 --global_batch 16

clean:
	rm -rf $(VENV) runs .pytest_cache
