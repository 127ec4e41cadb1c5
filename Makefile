# Two entry points for a fresh machine: `make train` and `make test`.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

.PHONY: setup ops espeak lint train vision long-context test bench clean

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

# The vision stages in order (recipes/multimodal_tiny.yaml's header): judge, tokenizer, merger
# pre-training, backbone. A stage whose result file exists is skipped; an interrupted one resumes
# from its newest checkpoint (train.resume=auto). Each stage prints its wall-clock time.
VISION_THREADS ?= 0
VISION_SET := train.threads=$(VISION_THREADS)
vision: runs/multimodal_tiny/eval.json

define timed
	@start=$$(date +%s); $(1) || exit 1; echo "make: $(2) took $$(( $$(date +%s) - start )) s"
endef

runs/vision_judge/metrics.json: | ops
	$(call timed,$(VENV)/bin/ernie5 train recipes/vision_judge.yaml $(VISION_SET),vision judge)

runs/visual_tokenizer/metrics.json: | runs/vision_judge/metrics.json
	$(call timed,$(VENV)/bin/ernie5 train recipes/visual_tokenizer.yaml $(VISION_SET) \
	  visual_tokenizer.judge=runs/vision_judge,visual tokenizer)

runs/vision_merger/merger.safetensors: | runs/visual_tokenizer/metrics.json
	$(call timed,$(VENV)/bin/ernie5 train recipes/vision_merger.yaml $(VISION_SET),merger pre-training)

runs/multimodal_tiny/eval.json: | runs/vision_merger/merger.safetensors
	$(call timed,$(VENV)/bin/ernie5 train recipes/multimodal_tiny.yaml $(VISION_SET) --eval,backbone)

# The long-context passkey model (recipes/long_context_tiny.yaml's header): pretrain_tiny, then
# the two long-context stages, each evaluated (`--eval`, passkey retrieval included). A stage whose
# eval.json exists is skipped; an interrupted one resumes from its newest checkpoint.
LC_THREADS ?= 0
LC_SET := train.threads=$(LC_THREADS)
long-context: runs/long_context_tiny/eval.json

runs/pretrain_tiny/eval.json: | ops
	$(call timed,$(VENV)/bin/ernie5 train recipes/pretrain_tiny.yaml $(LC_SET) --eval,pretrain_tiny)

runs/long_context_tiny_stage1/eval.json: | runs/pretrain_tiny/eval.json
	$(call timed,$(VENV)/bin/ernie5 train recipes/long_context_tiny_stage1.yaml $(LC_SET) \
	  --eval,long-context stage 1)

runs/long_context_tiny/eval.json: | runs/long_context_tiny_stage1/eval.json
	$(call timed,$(VENV)/bin/ernie5 train recipes/long_context_tiny.yaml $(LC_SET) \
	  --eval,long-context stage 2)

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
