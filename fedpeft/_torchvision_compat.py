"""Workaround for torchvision 0.28.0 (CUDA wheel) imported beside a CPU-only torch 2.13.0.

Bug: torchvision's `_meta_registrations` registers fake kernels for its C++ ops at import
time; with a torch build that lacks them, `import torchvision` (and so `import peft`, via
transformers) raises `RuntimeError: operator torchvision::nms does not exist`. Putting an empty
module in its place lets models, transforms.v2 and datasets work; only the C++ ops (nms,
roi_pool, jpeg io) stay unavailable. On a machine where the import works this does nothing.
"""
import sys
import types
import warnings

_MARKER = "operator torchvision::"


def ensure_torchvision() -> None:
    if "torchvision" in sys.modules and hasattr(sys.modules["torchvision"], "models"):
        return
    try:
        import torchvision  # noqa: F401
        return
    except RuntimeError as exc:
        if _MARKER not in str(exc):
            raise
    # Drop the half-imported package so the second import starts clean.
    for name in [n for n in sys.modules if n == "torchvision" or n.startswith("torchvision.")]:
        del sys.modules[name]
    sys.modules["torchvision._meta_registrations"] = types.ModuleType("torchvision._meta_registrations")
    # warn_explicit with no source file to quote keeps the warning to one line.
    warnings.warn_explicit(
        "torchvision's C++ ops do not match this torch build; running without them "
        "(models, transforms and datasets work; nms/roi ops do not)",
        RuntimeWarning, filename="fedpeft", lineno=0,
    )
    import torchvision  # noqa: F401,F811
