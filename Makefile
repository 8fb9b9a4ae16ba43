# Two commands on a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: demo test setup frontend frontend-check screenshot bench clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e ".[dev]"
	touch $(STAMP)

setup: $(STAMP)

demo: $(STAMP)
	$(PY) examples/demo.py --logdir runs/demo $(DEMO_ARGS)

test: $(STAMP)
	$(MAKE) frontend-check
	$(PY) -m pytest -q tests

# Rebuild the panel bundle into tb_stability/plugin/static/.
frontend:
	cd frontend && npm ci --no-audit --no-fund && npm run build

# Rebuild and fail if the committed bundle differs from the source.
frontend-check:
	@if [ -f frontend/package.json ]; then \
	  $(MAKE) frontend && git diff --exit-code --stat -- tb_stability/plugin/static/ \
	  || { echo "ERROR: committed bundle in tb_stability/plugin/static/ differs from frontend/ source; run 'make frontend' and commit"; exit 1; }; \
	fi

clean:
	rm -rf $(VENV) runs build dist *.egg-info frontend/node_modules
