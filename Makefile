# One venv, two commands: `make serve` and `make test`. Everything else is optional.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# MOBILEVIT_HOST / MOBILEVIT_PORT in the environment apply to make serve as to python -m app;
# `make serve HOST=... PORT=...` overrides them. `:=` so that a shell's own HOST is not read.
HOST := $(or $(MOBILEVIT_HOST),127.0.0.1)
PORT := $(or $(MOBILEVIT_PORT),8000)
DATA ?= ../shared/datasets/flower_photos
RUN ?= runs/flowers-xxs-128
MODEL ?= models/flowers-mobilevit-xxs
EXPORT_DIR ?= models/$(notdir $(RUN))

.PHONY: serve test test-slow lint format train export evaluate bench install install-dev lock clean browser

# Serving dependencies only: numpy, Pillow, FastAPI, LiteRT (no TensorFlow). Every package at
# the version in constraints.txt (`make lock`), the set the tests last passed with.
$(VENV)/.serve: pyproject.toml constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -c constraints.txt -e .
	touch $@

# Training, export and test tools on top (TensorFlow, Keras, pytest, ruff, ...).
$(VENV)/.dev: pyproject.toml constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -c constraints.txt -e '.[dev]'
	touch $@ $(VENV)/.serve

install: $(VENV)/.serve
install-dev: $(VENV)/.dev

# Processes and threads are derived from the CPUs this process may use (app/topology.py);
# /model-info reports them. Every MOBILEVIT_* setting in the environment applies.
serve: $(VENV)/.serve
	MOBILEVIT_HOST=$(HOST) MOBILEVIT_PORT=$(PORT) $(PY) -m app

# The demo page's tests drive Debian's Chromium; installed here when possible (root), else they
# skip and say why.
browser:
	@command -v chromium >/dev/null && command -v chromedriver >/dev/null || \
	  { [ "$$(id -u)" = 0 ] && apt-get update -qq && \
	    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium chromium-driver >/dev/null; } || \
	  echo "chromium not installed: the browser tests will skip"

test: $(VENV)/.dev browser
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .
	$(PY) -m pytest -m "not slow"

test-slow: $(VENV)/.dev
	$(PY) -m pytest -m slow

lint: $(VENV)/.dev
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .
	$(VENV)/bin/hadolint Dockerfile

format: $(VENV)/.dev
	$(PY) -m ruff format .
	$(PY) -m ruff check --fix .

train: $(VENV)/.dev
	$(PY) -m training.train --data $(DATA) --run-dir $(RUN)

# Into models/<run name>; refuses an existing directory, so the shipped model is never replaced.
export: $(VENV)/.dev
	$(PY) -m training.export $(RUN) --out $(EXPORT_DIR)

evaluate: $(VENV)/.dev
	$(PY) -m training.evaluate $(MODEL) $(DATA) --format tflite --split validation --out runs/evaluation

# Needs wrk and haproxy (apt-get install wrk haproxy); prints the tables quoted in docs/benchmarks.md.
bench: $(VENV)/.dev
	$(PY) -m bench.inference --model $(MODEL) --seconds 1.5
	$(PY) -m bench.batch_cost --model $(MODEL)
	$(PY) -m bench.serve --model $(MODEL) --modes service,2x1,peer --clients 1,4,16,64 --rounds 2 --passes 3
	$(PY) -m bench.serve --model $(MODEL) --modes batch32 --clients 64 --rounds 1 --passes 1
	$(PY) -m bench.serve --model $(MODEL) --modes service,v2-uint8,v2-bytes --clients 1,4,16 --rounds 2 --passes 2
	$(PY) -m bench.http_floor
	$(PY) -m bench.rollout --model $(MODEL)
	$(PY) -m bench.soak --model $(MODEL)
	$(PY) -m bench.upload_burst --model $(MODEL)
	$(PY) -m bench.train_speed --sizes 192,256 --steps 4
	$(PY) -m bench.train_memory --photos 1000 --image-size 256

# Re-pin constraints.txt to the newest versions that pyproject.toml allows, from a fresh venv
# with every extra; then run `make test` (CI installs exactly this set).
LOCK_VENV ?= /tmp/mobilevit-lock-venv
lock:
	rm -rf $(LOCK_VENV)
	$(PYTHON) -m venv $(LOCK_VENV)
	$(LOCK_VENV)/bin/python -m pip install -q --upgrade pip
	$(LOCK_VENV)/bin/python -m pip install -q -e '.[dev,savedmodel]'
	{ echo "# The version of every package that make serve, make test and the Docker image install"; \
	  echo "# (pip -c). Written by make lock with $$($(LOCK_VENV)/bin/python -V) on $$(uname -sm):"; \
	  echo "# change dependencies in pyproject.toml, then re-run make lock."; \
	  $(LOCK_VENV)/bin/python -m pip freeze --exclude-editable; } > constraints.txt
	rm -rf $(LOCK_VENV)

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache .hypothesis
