# Two entry points for a fresh machine: `make train` and `make test`.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

.PHONY: setup ops train test bench clean

$(STAMP): requirements.txt setup.py
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -r requirements.txt
	$(PY) -m pip install -q --no-deps -e .
	touch $(STAMP)

setup: $(STAMP)

# Custom C++ operators; cached under build/ and rebuilt only when their sources change.
ops: setup
	$(PY) -m paddle_ernie5.ops.build

train: ops
	$(VENV)/bin/ernie5 train recipes/pretrain_tiny.yaml

# pytest exits 5 when it collects no test: that is a failure here, not a pass.
test: ops
	@$(PY) -m pytest -q tests; rc=$$?; \
	if [ $$rc -eq 5 ]; then echo "make test: pytest collected no tests" >&2; exit 1; fi; exit $$rc

clean:
	rm -rf build runs .pytest_cache
