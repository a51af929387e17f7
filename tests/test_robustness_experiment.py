"""experiments/robustness.py end to end (quick mode, real simulations): 2 of 10 clients poisoned
(sign-flipped x10) drag plain FedAvg far below the clean run, while the median and norm clipping
stays within 5 points of it; clipping to the median norm bounds the damage."""
import csv
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
@pytest.mark.timeout(2400)
def test_poisoned_fedavg_collapses_median_holds_clipping_bounds_it(tmp_path):
    out = tmp_path / "robustness"
    proc = subprocess.run([sys.executable, str(ROOT / "experiments" / "robustness.py"), "--quick", "--out", str(out),
                           "--cases", "clean,fedavg,median,clip"], capture_output=True, text=True, cwd=ROOT, timeout=2300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = {r["case"]: r for r in csv.DictReader(open(out / "results.csv"))}
    final = {name: float(r["accuracy_final"]) for name, r in rows.items()}
    assert final["fedavg"] < final["clean"] - 0.10, final  # poisoned FedAvg collapses
    assert final["median"] >= final["clean"] - 0.05, final
    assert final["clip"] > final["fedavg"] + 0.10, final  # bounded, but sign-flipped updates still pull back
    summary = (out / "summary.md").read_text()
    assert "| median |" in summary and "--quick" in summary


def test_readme_robustness_figures_are_in_the_committed_summary():
    import re

    readme = (ROOT / "README.md").read_text()
    section = readme[readme.index("## Robustness against poisoned clients"):readme.index("## Layout")]
    summary = (ROOT / "experiments" / "results" / "robustness" / "summary.md").read_text()
    figures = re.findall(r"\d\.\d{4}|\d+\.\d pts", section.replace("−", "-"))
    assert len(figures) >= 10, figures
    missing = [f for f in figures if f not in summary]
    assert not missing, f"README robustness figures not in the committed summary: {missing}"
