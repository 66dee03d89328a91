"""Line-by-line checks of an uploaded training file, with the rules training reads it by.

A fine-tuning file is JSON lines, one example per line, in one of the two formats OpenAI's
fine-tuning API takes and ``lorafleet.data.formats`` reads:

* chat: ``{"messages": [{"role": "system"|"user"|"assistant", "content": ...}, ...]}`` with at
  least one trained assistant turn after some context;
* prompt/completion: ``{"prompt": ..., "completion": ...}``.

:class:`LineChecker` is fed the upload as it streams in, so a file is never held in memory
whole, and a line longer than ``max_line_bytes`` is skipped rather than buffered. Lines are
numbered as the training loader numbers them (``\\n``-separated; blank lines are skipped by both
but still counted).

Example::

    >>> checker = LineChecker(max_line_bytes=4096)
    >>> checker.feed(b'{"prompt": "2+2", "completion": "4"}\\n{"messages": 3}\\n')
    >>> checker.finish()
    >>> checker.problems
    ['line 2: `messages` must be a list of {role, content} messages, got int']
"""

from __future__ import annotations

import json
from typing import Optional

from lorafleet.data.formats import conversation_segments, to_messages
from lorafleet.data.rows import BadRow

MAX_PROBLEMS = 20  # lines listed in a refusal; the rest are counted
_FORMAT_NAMES = {"openai": "chat `messages`", "prompt_completion": "`prompt`/`completion`"}


def example_format(row: dict) -> str:
    """The format of one example (``openai`` or ``prompt_completion``) once training could use it; ``BadRow`` saying why not."""
    if "messages" in row:
        fmt = "openai"
        if not isinstance(row["messages"], list):
            raise BadRow("bad_messages", f"`messages` must be a list of {{role, content}} messages, got {type(row['messages']).__name__}")
    elif "prompt" in row and "completion" in row:
        fmt = "prompt_completion"
    else:
        raise BadRow("unknown_format", f"expected `messages` (chat) or `prompt` and `completion`; got fields {sorted(row)[:10]}")
    # The training side's own reader, and its rule that a conversation ends in a trained assistant turn after some context.
    conversation_segments(to_messages(fmt, row), None, "all_assistant_turns")
    return fmt


class LineChecker:
    """Checks a JSON-lines upload fed in chunks of any size; ``problems`` lists the first ``MAX_PROBLEMS`` as ``line N: reason``."""

    def __init__(self, max_line_bytes: int):
        self.max_line_bytes = max_line_bytes
        self.lines = 0  # lines ended so far
        self.examples = 0
        self.bad_lines = 0
        self.problems: list[str] = []
        self.format: Optional[str] = None
        self._line = bytearray()
        self._too_long = False

    @property
    def ok(self) -> bool:
        return self.bad_lines == 0

    def feed(self, data: bytes) -> None:
        start = 0
        while True:
            end = data.find(b"\n", start)
            piece = data[start:] if end < 0 else data[start:end]
            if not self._too_long:
                if len(self._line) + len(piece) > self.max_line_bytes:
                    self._too_long, self._line = True, bytearray()
                else:
                    self._line += piece
            if end < 0:
                return
            self._end_line()
            start = end + 1

    def finish(self) -> None:
        """The last line (without a final newline), and the rule that a file holds at least one example."""
        if self._line or self._too_long:
            self._end_line()
        if self.examples == 0 and self.bad_lines == 0:
            self._problem(max(self.lines, 1), "no training examples: the file is empty or holds only blank lines")

    def _end_line(self) -> None:
        self.lines += 1
        raw, too_long = bytes(self._line), self._too_long
        self._line, self._too_long = bytearray(), False
        if too_long:
            return self._problem(self.lines, f"longer than {self.max_line_bytes} bytes (files.max_line_bytes)")
        try:
            reason = self._check(raw)
        except BadRow as exc:
            reason = str(exc)
        if reason:
            self._problem(self.lines, reason)

    def _check(self, raw: bytes) -> Optional[str]:
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as exc:
            return f"not UTF-8 text (byte 0x{raw[exc.start]:02x} at column {exc.start + 1})"
        if not text.strip():
            return None  # a blank line: the training loader skips it too
        if "\r" in (text[:-1] if text.endswith("\r") else text):
            return "a carriage return (\\r) inside the line, which training reads as a line break; end lines with \\n or \\r\\n"
        try:
            row = json.loads(text)
        except json.JSONDecodeError as exc:
            return f"not valid JSON ({exc.msg}, column {exc.colno}); expected one JSON object per line"
        except RecursionError:
            return "JSON nested too deeply to read"
        if not isinstance(row, dict):
            return f"a JSON {type(row).__name__}, expected an object such as {{\"messages\": [...]}}"
        fmt = example_format(row)
        if self.format is None:
            self.format = fmt
        elif fmt != self.format:
            return f"{_FORMAT_NAMES[fmt]} but earlier lines are {_FORMAT_NAMES[self.format]}: training reads one format per file"
        self.examples += 1
        return None

    def _problem(self, line: int, reason: str) -> None:
        self.bad_lines += 1
        if len(self.problems) < MAX_PROBLEMS:
            self.problems.append(f"line {line}: {reason[:300]}")

    def summary(self) -> str:
        """The refusal's message: every listed problem on its own line."""
        more = f"\n(and {self.bad_lines - len(self.problems)} more lines with problems)" if self.bad_lines > len(self.problems) else ""
        return (f"The file is not valid fine-tuning data: {self.bad_lines} of its {max(self.lines, 1)} lines cannot be trained on. "
                "Each line must be a JSON object with chat `messages` or `prompt` and `completion` (docs/finetuning-api.md).\n"
                + "\n".join(self.problems) + more)
