# Two commands for a fresh machine: `make demo` trains the embedded digits demo, `make test` runs the test suite.
# Both create .venv and install everything first (torch from this machine's wheel cache or PyPI, then requirements.txt).
VENV ?= .venv
PY := $(VENV)/bin/python
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1

.PHONY: install demo test test-all
install: $(VENV)/.installed

$(VENV)/.installed: requirements.txt
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.14.1 torchvision==0.29.1
	$(PY) -m pip install -q -r requirements.txt
	touch $@

demo: install
	$(PY) main.py -t --base configs/demo/digits.yaml

test: install
	$(PY) -m pytest -q tests

test-all: install
	$(PY) -m pytest -q -m "" tests
