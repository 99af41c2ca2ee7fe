"""Progress where stderr is not a terminal (CI logs, cluster jobs): plain lines, never a silent stage."""
import subprocess
import sys

from clipshield import ui


def test_plain_progress_lines_when_stderr_is_not_a_terminal(monkeypatch, capsys):
    monkeypatch.setattr(ui, "PLAIN_EVERY_S", 0.0)  # a line at every advance
    assert not ui.console.is_terminal
    with ui.progress_bar("pretrain", total=3) as advance:
        for step in range(3):
            advance(loss=1.0 / (step + 1))
    lines = capsys.readouterr().err.strip().splitlines()
    assert lines[0].startswith("pretrain: 1/3 loss=1 (") and "s left)" in lines[0]
    assert lines[-1].startswith("pretrain: 3/3 loss=0.3333 (")
    assert all("\x1b[" not in line for line in lines)  # no terminal escape codes in a log file


def test_a_long_stage_prints_at_least_every_interval_in_a_pipe():
    code = ("import time; from clipshield import ui; ui.PLAIN_EVERY_S = 0.2\n"
            "with ui.progress_bar('work', total=10) as advance:\n"
            "    for _ in range(10): time.sleep(0.1); advance()\n")
    err = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stderr
    lines = [line for line in err.splitlines() if line.startswith("work: ")]
    assert 4 <= len(lines) <= 7, err  # one every 0.2 s over 1 s, plus the final line
    assert lines[-1].startswith("work: 10/10")
