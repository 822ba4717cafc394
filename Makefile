# Two commands for a fresh machine: `make demo` trains the embedded digits demo, `make test` runs the test suite.
# Both create .venv and install everything first (torch from this machine's wheel cache or PyPI, then requirements.txt).
VENV ?= .venv
PY := $(VENV)/bin/python
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1

.PHONY: install demo demo-variations demo-dreambooth test test-all
install: $(VENV)/.installed

$(VENV)/.installed: requirements.txt
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.14.1 torchvision==0.29.1
	$(PY) -m pip install -q -r requirements.txt
	touch $@

demo: install
	$(PY) main.py -t --base configs/demo/digits.yaml

demo-variations: install
	$(PY) main.py -t --base configs/demo/digits-variations.yaml -n digits-variations

# DreamBooth on the digits model: the base (reused if a finished one exists), the subject's photos, then a full
# fine-tune and a LoRA run; each prints its closeness figure.
demo-dreambooth: install
	@base=$$(ls -d logs/*_digits-base 2>/dev/null | while read d; do [ -f $$d/checkpoints/last.ckpt ] && echo $$d; done | tail -1); \
	if [ -z "$$base" ]; then $(PY) main.py -t --base configs/demo/digits.yaml -n digits-base || exit 1; \
	  base=$$(ls -d logs/*_digits-base | tail -1); fi; \
	echo "base model: $$base"; \
	$(PY) scripts/digit_subject.py data/sks-digit && \
	$(PY) main.py -t --base configs/demo/digits.yaml configs/demo/digits-dreambooth.yaml \
	  --finetune_from $$base --finetune_ema -n sks-digit && \
	$(PY) main.py -t --base configs/demo/digits.yaml configs/demo/digits-dreambooth.yaml \
	  configs/demo/digits-dreambooth-lora.yaml --finetune_from $$base --finetune_ema -n sks-digit-lora

test: install
	$(PY) -m pytest -q tests

test-all: install
	$(PY) -m pytest -q -m "" tests
