"""What a person sees: a progress bar in a terminal, none in a pipe."""
import os
import pty
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def simulate_argv(tmp_path, name: str) -> list[str]:
    return [sys.executable, "-m", "fedpeft", "simulate", "--model", "mobilenet_v2_035", "--num-clients", "2",
            "--rounds", "2", "--pretrain-epochs", "1", "--trace", "off", "--out", str(tmp_path / name)]


@pytest.mark.slow
def test_simulate_in_a_terminal_shows_a_progress_bar_and_in_a_pipe_does_not(tmp_path):
    env = {**os.environ, "FEDPEFT_CACHE": str(tmp_path.parent / "fleet-cache"), "COLUMNS": "120"}
    master, slave = pty.openpty()
    proc = subprocess.Popen(simulate_argv(tmp_path, "tty"), stdin=slave, stdout=slave, stderr=slave, cwd=ROOT,
                            env=env, close_fds=True)
    os.close(slave)
    chunks = []
    while True:
        try:
            chunk = os.read(master, 65536)
        except OSError:  # EIO: the child closed the terminal
            break
        if not chunk:
            break
        chunks.append(chunk)
    os.close(master)
    assert proc.wait(timeout=900) == 0
    text = b"".join(chunks).decode(errors="replace")
    assert "lora fleet" in text and "2/2" in text and "\r" in text, text[-3000:]  # tqdm redraws in place
    assert "acc=" in text and "up=" in text  # accuracy and bytes in the bar

    piped = subprocess.run(simulate_argv(tmp_path, "pipe"), cwd=ROOT, env=env, capture_output=True, text=True,
                           timeout=900)
    assert piped.returncode == 0, piped.stderr[-3000:]
    assert "lora fleet" not in piped.stderr and "\r" not in piped.stderr  # quiet when nobody watches
