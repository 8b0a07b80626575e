# Every target makes or refreshes the virtual environment itself: on a fresh clone
# `make test` and `make demo` are the only commands needed.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

.PHONY: venv test demo bench ablations models clean

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[test]'
	touch $(STAMP)

venv: $(STAMP)

# Two workers (the 2-core CI machine; most of the time is XLA compilation, one thread each);
# a file's tests stay in one worker so its module fixtures are built once.
test: $(STAMP)
	$(PY) -m pytest -q -n 2 --dist loadfile tests

demo: $(STAMP)
	$(PY) -m swiftjax.cli demo configs/demo.yaml

ablations: $(STAMP)
	$(PY) -m swiftjax.cli ablate configs/ablations

# Real checkpoints (GGUF files converted to HF folders) in ~/.cache/swiftjax/models, or in $SWIFTJAX_MODELS.
models: $(STAMP)
	$(PY) -m swiftjax.cli models fetch

bench: $(STAMP)
	$(PY) bench/run_all.py

clean:
	rm -rf $(VENV) runs build *.egg-info .pytest_cache
