"""Progress reporting: plain lines with rate and ETA in logs, a tqdm bar on a terminal, and the
training progress line emitted once (through logging: Ray Train's patched print wrote it twice)."""

from __future__ import annotations

import io
import logging

from lorafleet.progress import Progress, format_duration, format_progress
from lorafleet.train.loop import TrainingProgress


def test_format_progress_has_rate_and_eta():
    assert format_progress("eval", 120, 480, 60.0, unit="prompt") == "eval: 120/480 (25%) 2 prompt/s elapsed 1:00 eta 3:00"
    assert format_duration(3725) == "1:02:05" and format_duration(float("nan")) == "?"


def test_log_lines_only_for_long_work_and_a_bar_on_a_terminal(caplog, monkeypatch):
    caplog.set_level(logging.INFO, logger="lorafleet.progress")
    with Progress(10, "quick", tty=False, every_s=3600) as bar:
        bar.update(10)
    assert not caplog.records  # short work stays silent in logs

    with Progress(10, "slow", unit="example", tty=False, every_s=0.0) as bar:
        for _ in range(10):
            bar.update(1)
    lines = [r.getMessage() for r in caplog.records]
    assert lines[0].startswith("slow: 1/10 (10%)") and "example/s" in lines[0] and " eta " in lines[0]
    assert lines[-1].startswith("slow: 10/10 (100%)") and lines[-1].endswith("eta 0:00")

    stream = io.StringIO()
    monkeypatch.setattr("sys.stderr", stream)
    with Progress(4, "bar", unit="prompt", tty=True) as bar:
        bar.update(4)
    assert "bar: 100%" in stream.getvalue() and "4/4" in stream.getvalue() and "prompt/s" in stream.getvalue()


def test_training_progress_line_is_logged_once_with_an_eta(caplog, capsys):
    caplog.set_level(logging.INFO, logger="lorafleet.train.progress")
    p = TrainingProgress(total_steps=40, start_step=10)  # a resumed attempt: the ETA uses this attempt's pace
    line = p.line(20, {"epoch": 0.5, "train_loss": 2.25, "lr": 1e-4, "tokens_per_s": 900, "eval_loss": 2.5},
                  now=p.started + 30)
    assert line == "step 20/40 (50%) epoch 0.50 loss 2.2500 lr 0.0001 900 tokens/s eval_loss 2.5000 elapsed 0:30 eta 1:00"
    p.log(20, {"train_loss": 2.25})
    assert len(caplog.records) == 1 and caplog.records[0].getMessage().startswith("step 20/40")
    assert capsys.readouterr().out == ""  # not printed: Ray Train's print patch tees prints to stdout and the log
