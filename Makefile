# Two set-up commands for a fresh machine: `make demo` and `make test`.
# Each creates or updates the virtual environment itself.
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: demo test install clean

$(STAMP): pyproject.toml constraints.txt
	python3 -m venv $(VENV)
	$(VENV)/bin/pip install -q "torch==2.13.0"
	$(VENV)/bin/pip install -q -c constraints.txt -e ".[test]"
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/fedpeft demo $(DEMO_ARGS)

test: $(STAMP)
	$(PY) -m pytest -q -rs

clean:
	rm -rf $(VENV) .fedpeft-cache runs
