"""Progress of long work: a tqdm bar (rate, ETA) in a terminal, plain log lines otherwise.

A bar is right for a person at a terminal and wrong in a log file (Ray job logs, CI):
carriage-return redraws become thousands of lines. So the same :class:`Progress` draws a
tqdm bar when stderr is a TTY and otherwise logs one line per ``every_s`` seconds (none
at all for work that finishes sooner), each with the rate and the ETA.

Example::

    with Progress(total=len(prompts), desc="generating", unit="prompt") as bar:
        for chunk in chunks:
            ...
            bar.update(len(chunk))
"""

from __future__ import annotations

import logging
import sys
import time

log = logging.getLogger("lorafleet.progress")


def format_duration(seconds: float) -> str:
    """``3725`` -> ``1:02:05``; ``65`` -> ``1:05``; unknown (``nan``/``inf``) -> ``?``."""
    if seconds != seconds or seconds in (float("inf"), float("-inf")) or seconds < 0:
        return "?"
    s = int(round(seconds))
    h, rem = divmod(s, 3600)
    m, s = divmod(rem, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m}:{s:02d}"


def eta_seconds(done: float, total: float, elapsed_s: float) -> float:
    """Seconds left at the average rate so far (``nan`` before any progress)."""
    if done <= 0 or elapsed_s <= 0:
        return float("nan")
    return max(total - done, 0) * elapsed_s / done


def format_progress(desc: str, done: float, total: float, elapsed_s: float, unit: str = "it") -> str:
    """One plain progress line: ``desc: 120/500 (24%) 3.2 it/s elapsed 0:37 eta 1:58``."""
    rate = done / elapsed_s if elapsed_s > 0 else float("nan")
    pct = f" ({100 * done / total:.0f}%)" if total else ""
    return (f"{desc}: {done:g}/{total:g}{pct} {rate:.3g} {unit}/s elapsed {format_duration(elapsed_s)} "
            f"eta {format_duration(eta_seconds(done, total, elapsed_s))}")


class Progress:
    """Progress of ``total`` units of work (see the module docstring).

    ``enabled=False`` makes every call a no-op (ranks other than 0 of a distributed job).
    ``tty`` forces the bar (True) or the log lines (False); by default it follows
    ``sys.stderr.isatty()``.
    """

    def __init__(self, total: int, desc: str, unit: str = "it", *, enabled: bool = True, every_s: float = 30.0,
                 tty: bool | None = None, logger: logging.Logger | None = None):
        self.total, self.desc, self.unit, self.every_s = total, desc, unit, every_s
        self.enabled = enabled and total > 0
        self.done = 0
        self.logger = logger or log
        self._start = self._last_line = time.perf_counter()
        self._lines = 0
        self._bar = None
        if self.enabled and (sys.stderr.isatty() if tty is None else tty):
            from tqdm.auto import tqdm

            self._bar = tqdm(total=total, desc=desc, unit=unit, dynamic_ncols=True)

    def update(self, n: int = 1) -> None:
        if not self.enabled:
            return
        self.done += n
        if self._bar is not None:
            self._bar.update(n)
            return
        now = time.perf_counter()
        if now - self._last_line >= self.every_s and self.done < self.total:
            self._last_line = now
            self._lines += 1
            self.logger.info(format_progress(self.desc, self.done, self.total, now - self._start, self.unit))

    def close(self) -> None:
        if not self.enabled:
            return
        if self._bar is not None:
            self._bar.close()
        elif self._lines:
            # Close a series of lines with the final count; short work stays silent.
            self.logger.info(format_progress(self.desc, self.done, self.total, time.perf_counter() - self._start, self.unit))
        self.enabled = False

    def __enter__(self) -> "Progress":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
