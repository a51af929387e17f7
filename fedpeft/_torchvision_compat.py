"""Workaround for torchvision 0.28.0 (CUDA wheel) imported beside a CPU-only torch 2.13.0.

Bug: torchvision's `_meta_registrations` registers fake kernels for its C++ ops at import
time; with a torch build that lacks them, `import torchvision` (and so `import peft`, via
transformers) raises `RuntimeError: operator torchvision::nms does not exist`. Putting an empty
module in its place lets models, transforms.v2 and datasets work; only the C++ ops (nms,
roi_pool, jpeg io) stay unavailable. On a machine where the import works this does nothing.

The shim is applied lazily, by an import hook, so that importing fedpeft (or starting any
Python of the venv, see `install_pth`) costs no torch import: the first `import torchvision`,
wherever it comes from, runs torchvision's own `__init__` and, only if that fails with the bug
above, runs it again with the empty module in place.

    install_hook()   # what `import fedpeft` does
    install_pth()    # what `make install` does: a plain `import torchvision` works too

This module imports nothing heavy: the venv's `.pth` file imports it at every interpreter start.
"""
from __future__ import annotations

import importlib.abc
import sys
import types
import warnings

_MARKER = "operator torchvision::"
PTH_NAME = "fedpeft_torchvision_shim.pth"
# One line (site.py runs a .pth line that starts with "import"); guarded so that an interpreter
# of this venv still starts when fedpeft is uninstalled or broken.
PTH_LINE = ("import sys; exec('try:\\n import fedpeft._torchvision_compat as _c; _c.install_hook()\\n"
            "except Exception:\\n pass')\n")


class TorchvisionOpsWarning(RuntimeWarning):
    """The shim was needed: torchvision runs without its C++ ops. The CLI hides it (one known,
    harmless condition); `python -W default` or PYTHONWARNINGS shows it."""


def _apply_shim_and_retry(loader, module: types.ModuleType, exc: RuntimeError) -> None:
    if _MARKER not in str(exc):
        raise exc
    # Drop the half-imported submodules so the second run starts clean.
    for name in [n for n in sys.modules if n.startswith("torchvision.")]:
        del sys.modules[name]
    sys.modules["torchvision._meta_registrations"] = types.ModuleType("torchvision._meta_registrations")
    # warn_explicit with no source file to quote keeps the warning to one line.
    warnings.warn_explicit(
        "torchvision's C++ ops do not match this torch build; running without them "
        "(models, transforms and datasets work; nms/roi ops do not)",
        TorchvisionOpsWarning, filename="fedpeft", lineno=0,
    )
    loader.exec_module(module)


class _ShimLoader(importlib.abc.Loader):
    """torchvision's own loader, with one retry under the shim."""

    def __init__(self, loader) -> None:
        self._loader = loader

    def create_module(self, spec):
        return self._loader.create_module(spec)

    def exec_module(self, module) -> None:
        module.__loader__ = self._loader  # torchvision sees its own loader, as without the hook
        module.__spec__.loader = self._loader
        try:
            self._loader.exec_module(module)
        except RuntimeError as exc:
            _apply_shim_and_retry(self._loader, module, exc)


class _ShimFinder(importlib.abc.MetaPathFinder):
    """Finds torchvision with the finders after it and wraps its loader in _ShimLoader."""

    def find_spec(self, fullname, path=None, target=None):
        if fullname != "torchvision":
            return None
        for finder in sys.meta_path:
            if finder is self or not hasattr(finder, "find_spec"):
                continue
            spec = finder.find_spec(fullname, path, target)
            if spec is not None:
                if spec.loader is not None and hasattr(spec.loader, "exec_module"):
                    spec.loader = _ShimLoader(spec.loader)
                return spec
        return None


def install_hook() -> None:
    """Apply the shim, where needed, at the first `import torchvision` of this process."""
    if any(isinstance(f, _ShimFinder) for f in sys.meta_path):
        return
    sys.meta_path.insert(0, _ShimFinder())


def ensure_torchvision() -> None:
    """Import torchvision now, with the shim if it is needed."""
    install_hook()
    import torchvision  # noqa: F401


def install_pth(site_packages=None):
    """Write the `.pth` file that installs the hook at every start of this environment's Python,
    so a plain `python -c "import torchvision"` works as well as fedpeft's own imports.
    `site_packages`: default this interpreter's (the venv's) site-packages."""
    import sysconfig
    from pathlib import Path

    path = Path(site_packages or sysconfig.get_paths()["purelib"]) / PTH_NAME
    path.write_text(PTH_LINE)
    return path
