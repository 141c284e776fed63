# Two set-up commands for a fresh machine: `make demo` and `make test` (each installs into .venv first).
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# CPU machines get the CPU build of PyTorch (pip finds 2.13.0 locally); GPU users: `make install TORCH_SPEC=torch`
# or install their own torch into $(VENV) first - an importable torch is never replaced.
TORCH_SPEC ?= torch==2.13.0

.PHONY: install demo lint test test-slow clean

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

clean:
	rm -rf $(VENV) runs .pytest_cache
