"""fedpeft: a federated edge fine-tuning simulator (core, importable without Flower or Ray)."""
from fedpeft._torchvision_compat import ensure_torchvision

ensure_torchvision()

__version__ = "0.1.0"
