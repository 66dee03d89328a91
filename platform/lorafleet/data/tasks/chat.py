"""Chat: conversations in any common format (:mod:`lorafleet.data.formats`), trained on their assistant
turns. No generation metric: loss and perplexity come from training."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

from lorafleet.data.formats import FORMAT_FIELDS, conversation_segments, detect_format, renders_with_template, to_messages
from lorafleet.data.rows import Example
from lorafleet.data.tasks.base import ReadContext, TaskSpec, register_kind, register_task


@register_kind
@dataclass(frozen=True)
class ChatTask(TaskSpec):
    kind: ClassVar[str] = "chat"

    def _parts(self, row: dict, tokenizer: Any) -> tuple[str, str, str]:
        """(prompt, completion, input) of the last trained assistant turn of a ``messages`` list
        (OpenAI or ShareGPT items) or of guanaco ``### Human/### Assistant`` text."""
        value = self.value(row, "messages")
        conversation = to_messages("openai", {"messages": value if value is not None else row.get("text")})
        return conversation_segments(conversation, tokenizer, "all_assistant_turns")[:3]

    def format_prompt(self, row: dict, tokenizer: Any = None) -> str:
        return self._parts(row, tokenizer)[0]

    def format_completion(self, row: dict, tokenizer: Any = None) -> str:
        """The reply (a chat template's reply follows its generation prompt with no leading space)."""
        return self._parts(row, tokenizer)[1]

    def format_input(self, row: dict) -> str:
        return self._parts(row, None)[2]

    def format_example(self, row: dict, tokenizer: Any = None) -> tuple[str, str, str, str]:
        prompt, completion, shown = self._parts(row, tokenizer)  # parse the conversation once
        return prompt, completion, shown, completion.strip()

    def resolve_format(self, found: list[str], columns: dict[str, str], fmt: str) -> str:
        return detect_format(found, columns) if fmt == "auto" else fmt

    def column_fields(self, found: list[str], columns: dict[str, str], fmt: str):
        fmt = self.resolve_format(found, columns, fmt)
        required, optional = FORMAT_FIELDS[fmt]
        defaults = self.default_columns if fmt == "openai" else {}
        return required, optional, defaults, f"format {fmt!r} of task {self.name!r}"

    def make_example(self, row: dict, tokenizer: Any, ctx: ReadContext) -> Example:
        fmt = self.resolve_format(list(row), {}, ctx.fmt)
        conversation = to_messages(fmt, row)
        prompt, completion, shown, segments = conversation_segments(conversation, tokenizer, ctx.loss_on)
        return Example(prompt, completion, shown, completion.strip(), segments,
                       bos=not renders_with_template(conversation, tokenizer))


register_task(ChatTask(
    name="chat",
    description="Instruction/chat tuning: OpenAI `messages`, ShareGPT `conversations`, Alpaca, prompt/completion or "
                "guanaco-style `text` (### Human: ... ### Assistant: ...), with the base's chat template; loss on "
                "every assistant turn (timdettmers/openassistant-guanaco).",
    hub_name="timdettmers/openassistant-guanaco", hub_config=None, fields=("messages",),
    default_columns={"messages": "text"}, metrics=(), max_new_tokens=256,
))
