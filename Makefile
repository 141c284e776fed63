# Two set-up commands for a fresh machine: `make demo` and `make test` (each installs into .venv first).
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# CPU machines get the CPU build of PyTorch (pip finds 2.13.0 locally); GPU users: `make install TORCH_SPEC=torch`
# or install their own torch into $(VENV) first - an importable torch is never replaced.
TORCH_SPEC ?= torch==2.13.0

.PHONY: install demo lint test test-slow test-peers mutation clean

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q "$(TORCH_SPEC)"
	$(PY) -m pip install -q -e ".[test]"
	touch $@

demo: install
	$(VENV)/bin/fewstep demo

lint: install
	$(VENV)/bin/ruff check src tests
	$(VENV)/bin/pydoclint --config pyproject.toml --quiet src

test: install
	$(PY) -m pytest -q -p no:cacheprovider

test-slow: install
	$(PY) -m pytest -q -p no:cacheprovider -m slow

# peers side by side (fewstep.benchmarks.peers); CPU torch stays pinned (see the peers extra in pyproject.toml)
test-peers: install
	$(PY) -c "import torch; print('torch==' + torch.__version__.split('+')[0])" > $(VENV)/torch-pin.txt
	$(PY) -m pip install -q -c $(VENV)/torch-pin.txt -e ".[peers]"
	@# the PyPI torchvision does not load next to a CPU torch: remove it (fewstep.benchmarks.peers stubs it)
	$(PY) -c "import torchvision" 2>/dev/null || $(PY) -m pip uninstall -q -y torchvision
	$(PY) -m pytest -q -p no:cacheprovider -m peers

# mutation score per module (tools/mutation.py; docs/mutation.md); MODULES="core/paths.py ..." for a subset
MODULES ?= --all
mutation: install
	$(PY) -m pip install -q "mutmut==3.8.1"
	$(PY) tools/mutation.py $(MODULES)

clean:
	rm -rf $(VENV) runs .pytest_cache
