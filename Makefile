# Two set-up commands for a fresh machine: `make demo` and `make test`.
# Each creates or updates the virtual environment itself.
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
SHIM := $(VENV)/.torchvision-shim

.PHONY: demo test install clean

$(STAMP): pyproject.toml constraints.txt
	python3 -m venv $(VENV)
	$(VENV)/bin/pip install -q "torch==2.13.0"
	$(VENV)/bin/pip install -q -c constraints.txt -e ".[test]"
	touch $(STAMP)

# The torchvision workaround (fedpeft/_torchvision_compat.py) as a .pth file in the venv's
# site-packages: a plain `python -c "import torchvision"` works there, not only fedpeft's imports.
$(SHIM): $(STAMP) fedpeft/_torchvision_compat.py
	$(PY) -c "from fedpeft._torchvision_compat import install_pth; print('wrote', install_pth())"
	touch $(SHIM)

install: $(SHIM)

demo: $(SHIM)
	$(VENV)/bin/fedpeft demo $(DEMO_ARGS)

test: $(SHIM)
	$(PY) -m pytest -q -rs --durations=12

clean:
	rm -rf $(VENV) .fedpeft-cache runs
