"""The torchvision workaround (fedpeft/_torchvision_compat.py, /work/shared ENVIRONMENT.md): a plain
`import torchvision` works in the project's venv (the .pth that `make install` writes), the shim
applies only when torchvision's import fails with the known bug, and the CLI hides its note.

The hook's two branches run against two small stand-in packages named `torchvision` (put first on
the path of a fresh `python -S`, so neither the venv's .pth nor the real torchvision is seen): one
fails exactly as torchvision 0.28.0 does beside a CPU-only torch, one imports fine."""
import os
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

from fedpeft._torchvision_compat import PTH_NAME

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
INIT = "from torchvision import _meta_registrations\nOK = 'imported'\n"
BROKEN = 'raise RuntimeError("operator torchvision::nms does not exist")\n'


def fake_torchvision(tmp_path: Path, broken: bool) -> Path:
    pkg = tmp_path / "torchvision"
    pkg.mkdir()
    (pkg / "__init__.py").write_text(INIT)
    (pkg / "_meta_registrations.py").write_text(BROKEN if broken else "REAL = True\n")
    return tmp_path


def run_isolated(code: str, path: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-S", "-c", code], capture_output=True, text=True, timeout=60,
                          env={**os.environ, "PYTHONPATH": f"{path}{os.pathsep}{ROOT}", "PYTHONWARNINGS": ""})


HOOKED = "import fedpeft._torchvision_compat as c; c.install_hook(); import torchvision; "


def test_plain_import_torchvision_works_in_the_venv():
    pth = Path(sysconfig.get_paths()["purelib"]) / PTH_NAME
    assert pth.is_file(), f"{pth} missing: run `make install` (it writes the torchvision shim's .pth)"
    proc = subprocess.run([sys.executable, "-c", "import torchvision, torchvision.models as m; "
                           "print(type(m.mobilenet_v2(num_classes=3)).__name__)"],
                          capture_output=True, text=True, timeout=300, cwd="/")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "MobileNetV2"


def test_the_stand_in_reproduces_the_bug_without_the_hook(tmp_path):
    proc = run_isolated("import torchvision", fake_torchvision(tmp_path, broken=True))
    assert proc.returncode != 0 and "operator torchvision::nms does not exist" in proc.stderr


def test_hook_applies_the_shim_when_the_import_fails(tmp_path):
    proc = run_isolated(HOOKED + "import sys; print(torchvision.OK, sys.modules['torchvision._meta_registrations'].__spec__)",
                        fake_torchvision(tmp_path, broken=True))
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == ["imported", "None"]  # the empty stand-in module, no file behind it
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "TorchvisionOpsWarning: torchvision's C++ ops do not match" in lines[0]


def test_hook_does_nothing_when_torchvision_imports_fine(tmp_path):
    proc = run_isolated(HOOKED + "print(torchvision.OK, torchvision._meta_registrations.REAL, "
                                 "type(torchvision.__loader__).__name__)", fake_torchvision(tmp_path, broken=False))
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == ["imported", "True", "SourceFileLoader"]
    assert proc.stderr == ""


@pytest.mark.parametrize("warn_option, shown", [([], False), (["-W", "default"], True)])
def test_cli_hides_the_shim_note_unless_warnings_are_asked_for(tmp_path, warn_option, shown):
    code = "from fedpeft.cli import quiet_known_warnings; quiet_known_warnings(); " + HOOKED
    proc = subprocess.run([sys.executable, "-S", *warn_option, "-c", code], capture_output=True, text=True, timeout=60,
                          env={**os.environ, "PYTHONPATH": f"{fake_torchvision(tmp_path, True)}{os.pathsep}{ROOT}",
                               "PYTHONWARNINGS": ""})
    assert proc.returncode == 0, proc.stderr
    assert ("torchvision's C++ ops" in proc.stderr) == shown
