# The two commands of the README. Each sets up (or reuses) ./.venv with the pinned stack first.
VENV ?= .venv
PY := $(VENV)/bin/python
export MMTWINS_VENV := $(abspath $(VENV))

.PHONY: setup demo test
setup:
	bash tools/setup_env.sh

demo: setup
	$(PY) tools/demo.py

test: setup
	$(PY) -m pytest tests
