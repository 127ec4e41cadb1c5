# Two entry points for a fresh machine: `make train` and `make test`.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

.PHONY: setup ops espeak lint train test bench clean

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

# espeak-ng synthesises the built-in speech (paddle_ernie5/data/speech.py): installed when missing and
# this is root with apt-get; otherwise stop with the exact command to run.
espeak:
	@command -v espeak-ng >/dev/null 2>&1 || { \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
	    apt-get update && apt-get install -y espeak-ng; \
	  else false; fi; } || { \
	  echo "make espeak: espeak-ng is missing; install it with: sudo apt-get install -y espeak-ng" >&2; \
	  exit 1; }

train: ops
	$(VENV)/bin/ernie5 train recipes/pretrain_tiny.yaml --eval

# ruff (pinned in requirements.txt, rules in pyproject.toml): lint and format check.
lint: setup
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

# pytest exits 5 when it collects no test: that is a failure here, not a pass.
test: lint ops espeak
	@$(PY) -m pytest -q tests; rc=$$?; \
	if [ $$rc -eq 5 ]; then echo "make test: pytest collected no tests" >&2; exit 1; fi; exit $$rc

clean:
	rm -rf build runs .pytest_cache
