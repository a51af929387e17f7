"""experiments/paper_costs.py runs and writes its outputs; README's cost-model figures come from
its committed run."""
import csv
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
COMMITTED = ROOT / "experiments" / "results" / "paper_costs"


def test_paper_costs_writes_csv_plots_and_the_comparison_table(tmp_path):
    out = tmp_path / "costs"
    proc = subprocess.run(
        [sys.executable, str(ROOT / "experiments" / "paper_costs.py"), "--out", str(out), "--quick",
         "--input-size", "32", "--batch-size", "2", "--num-classes", "10", "--methods", "fft,lora", "--cache-dir", str(tmp_path)],
        capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-2000:]
    rows = list(csv.DictReader(open(out / "costs.csv")))
    assert {(r["model"], r["method"]) for r in rows} == {(m, x) for m in ("mobilenet_v2", "resnet18")
                                                          for x in ("fft", "lora")}
    for name in ("memory.png", "flops.png"):
        assert (out / name).stat().st_size > 0
    summary = (out / "summary.md").read_text()
    assert "| claim | seed paper reports |" in summary and "lora memory saved vs fft" in summary
    assert "--input-size 32 --batch-size 2" in summary  # the command that made it


def test_readme_cost_figures_are_in_the_committed_summary():
    readme = (ROOT / "README.md").read_text()
    section = readme[readme.index("## Cost model"):readme.index("## Benchmarks")]
    summary = (COMMITTED / "summary.md").read_text()
    figures = re.findall(r"\d+\.\d+(?:%|:1| MiB)", section)
    assert len(figures) >= 10, figures
    missing = [f for f in figures if f.replace(" MiB", "") not in summary]
    assert not missing, f"README cost figures not in {COMMITTED / 'summary.md'}: {missing}"
