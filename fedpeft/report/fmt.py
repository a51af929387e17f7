"""Formatting shared by fedpeft's tables and plots: units, numbers that may be missing, text tables."""
from __future__ import annotations

import math
from typing import Any

MiB = 2**20


def _fmt_scaled(n: float | None, base: int, base_unit: str, units: tuple[str, ...]) -> str:
    if n is None:
        return "-"
    n = float(n)
    if abs(n) < base:
        return f"{n:.0f} {base_unit}"
    for unit in units:
        n /= base
        if abs(n) < base or unit == units[-1]:
            return f"{n:.1f} {unit}" if abs(n) >= 100 else f"{n:.2f} {unit}"
    raise AssertionError("unreachable")


def fmt_bytes(n: float | None) -> str:
    """Binary units: 512 B, 1.5 KiB, 3.25 MiB, 1.10 GiB; '-' for None."""
    return _fmt_scaled(n, 1024, "B", ("KiB", "MiB", "GiB", "TiB"))


def fmt_flops(n: float | None) -> str:
    """Decimal units: 950 FLOP, 1.23 MFLOP, 45.6 GFLOP, 1.20 TFLOP; '-' for None."""
    return _fmt_scaled(n, 1000, "FLOP", ("kFLOP", "MFLOP", "GFLOP", "TFLOP", "PFLOP"))


def fmt_mib(n: float | None, digits: int = 1) -> str:
    return "-" if n is None else f"{float(n) / MiB:,.{digits}f}"


def fmt_float(x: float | None, spec: str = ".3f") -> str:
    return "-" if x is None else format(float(x), spec)


def fmt_ratio(r: float | None) -> str:
    return "-" if r is None else f"{r:.3g}x"



def _num(x: Any) -> float | None:
    """A finite number, else None (null, NaN, inf, strings and bools are not numbers here)."""
    if isinstance(x, bool) or not isinstance(x, (int, float)):
        return None
    x = float(x)
    return x if math.isfinite(x) else None


def _int(x: Any) -> int | None:
    v = _num(x)
    return None if v is None else int(round(v))


def _sum(values) -> float:
    return sum(v for v in (_num(x) for x in values) if v is not None)


def _isum(values) -> int:
    return int(round(_sum(values)))


def _mean(values) -> float | None:
    nums = [v for v in (_num(x) for x in values) if v is not None]
    return sum(nums) / len(nums) if nums else None


def _max(values) -> float | None:
    nums = [v for v in (_num(x) for x in values) if v is not None]
    return max(nums) if nums else None


def _flops_total(record: dict, key: str = "total") -> float | None:
    flops = record.get("flops")
    return _num(flops.get(key)) if isinstance(flops, dict) else None


def _status(record: dict) -> str:
    return str(record.get("status") or "unknown")


def _peak(record: dict) -> float | None:
    """Peak memory of a record, None when not measured (null or 0, e.g. an unavailable client)."""
    v = _num(record.get("peak_memory_bytes"))
    return v if v else None


def _as_int_or_none(x: float | None) -> int | None:
    return None if x is None else int(round(x))


def _table(headers: list[str], rows: list[list[str]], left_cols: int = 1) -> str:
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(headers)]

    def line(cells):
        return "  ".join(c.ljust(w) if i < left_cols else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths)))

    out = [line(headers), "  ".join("-" * w for w in widths)]
    out += [line(r) for r in rows]
    return "\n".join(out)


def _acc(x: float | None) -> str:
    return "-" if x is None else f"{x:.4f}"

