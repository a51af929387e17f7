"""fedpeft: a federated edge fine-tuning simulator (core, importable without Flower or Ray)."""
import logging

from fedpeft._torchvision_compat import ensure_torchvision

# galore-torch and peft import bitsandbytes, whose CPU backend logs a warning on every import
# when the optional `kernels` package is absent; fedpeft uses none of its 4-bit kernels.
logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)

ensure_torchvision()

__version__ = "0.1.0"
