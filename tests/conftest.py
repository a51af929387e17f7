import os

import pytest

os.environ.setdefault("FEDPEFT_CACHE", os.path.join(os.path.dirname(__file__), "..", ".fedpeft-cache", "tests"))

import fedpeft  # noqa: E402,F401  (torchvision shim before any test imports torchvision)
import torch  # noqa: E402

torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


@pytest.fixture
def batch():
    generator = torch.Generator().manual_seed(0)
    return torch.rand(8, 3, 32, 32, generator=generator), torch.arange(8) % 10
