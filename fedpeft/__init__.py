"""fedpeft: a federated edge fine-tuning simulator (core, importable without Flower or Ray).

Importing fedpeft is cheap (no torch): the CLI's `--help` and argument errors rely on it."""
import logging

from fedpeft._torchvision_compat import install_hook

# galore-torch and peft import bitsandbytes, whose CPU backend logs a warning on every import
# when the optional `kernels` package is absent; fedpeft uses none of its 4-bit kernels.
logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)

# The torchvision shim (fedpeft/_torchvision_compat.py), applied at the first `import torchvision`.
install_hook()

__version__ = "0.1.0"
