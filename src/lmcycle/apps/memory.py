"""Conversation memory that stays within a token budget (a share of the model's context window).

- :class:`BufferMemory` keeps the newest messages that fit in ``max_tokens`` and drops the oldest; a single
  message longer than the whole budget keeps its last part (the end of a long message is what a reply answers).
- :class:`SummaryMemory` does the same, but folds what falls out of the buffer into a running summary written by
  an LLM, kept at most ``summary_tokens`` long, and shown first.

Tokens are counted by the backend (``LLM.count_tokens``), so the budget means the model's own tokens. A message
is counted as it is rendered, ``"<role>: <content>\\n"``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from lmcycle.errors import LmcycleError
from lmcycle.models.generate import DecodingConfig


@dataclass(frozen=True)
class Message:
    role: str
    content: str

    def render(self) -> str:
        return f"{self.role}: {self.content}\n"


def _fit_tail(text: str, budget: int, count: Callable[[str], int]) -> str:
    """The longest suffix of ``text`` (cut at a character) that ``count`` puts within ``budget``."""
    lo, hi = 0, len(text)  # binary search on the cut point: counts grow as the suffix grows
    while lo < hi:
        mid = (lo + hi) // 2
        if count(text[mid:]) <= budget:
            hi = mid
        else:
            lo = mid + 1
    return text[lo:]


@dataclass
class BufferMemory:
    """The newest messages within ``max_tokens`` tokens."""

    max_tokens: int
    count_tokens: Callable[[str], int]
    history: list[Message] = field(default_factory=list)

    def __post_init__(self) -> None:
        if self.max_tokens < 1:
            raise LmcycleError(f"memory max_tokens must be at least 1, got {self.max_tokens}", field="max_tokens")

    def add(self, role: str, content: str) -> None:
        self.history.append(Message(role, content))

    def messages(self) -> list[Message]:
        """The messages the next prompt shows, oldest first, within the budget together."""
        return self._newest_within(self.history, self.max_tokens)

    def render(self) -> str:
        return "".join(m.render() for m in self.messages())

    def _newest_within(self, history: list[Message], budget: int) -> list[Message]:
        kept: list[Message] = []
        used = 0
        for m in reversed(history):
            cost = self.count_tokens(m.render())
            if used + cost > budget:
                if not kept:  # the newest message alone is too long: keep its end
                    prefix = f"{m.role}: "
                    room = budget - self.count_tokens(prefix + "\n")
                    if room > 0:
                        kept.append(Message(m.role, _fit_tail(m.content, room, self.count_tokens)))
                break
            kept.append(m)
            used += cost
        return kept[::-1]


SUMMARY_PROMPT = ("Progressively summarize the conversation, adding onto the previous summary. Keep facts, "
                  "names and numbers.\n\nPrevious summary:\n{summary}\n\nNew lines of conversation:\n{lines}\n"
                  "New summary:")


@dataclass
class SummaryMemory(BufferMemory):
    """A buffer whose dropped messages are summarised by ``llm`` (any :class:`lmcycle.apps.llm.LLM`)."""

    llm: object = None
    summary_tokens: int = 128
    summary: str = ""
    summarised: int = 0  # messages of history already folded into the summary
    prompt: str = SUMMARY_PROMPT

    def messages(self) -> list[Message]:
        """A system message with the summary (when there is one), then the newest messages that fit with it."""
        self._fold()
        shown = self._summary_message()
        return shown + self._newest_within(self.history[self.summarised:], max(self._room(), 0))

    def _summary_message(self) -> list[Message]:
        return [Message("system", f"Summary of the earlier conversation: {self.summary}")] if self.summary else []

    def _room(self) -> int:
        """Tokens left for recent messages beside the summary."""
        return self.max_tokens - sum(self.count_tokens(m.render()) for m in self._summary_message())

    def _fold(self) -> None:
        """Summarise every message that no longer fits beside the current summary."""
        while True:
            recent = self.history[self.summarised:]
            dropped = len(recent) - len(self._newest_within(recent, self._room()))
            if dropped == 0 or self.llm is None:
                return
            lines = "".join(m.render() for m in recent[:dropped])
            cfg = DecodingConfig(max_new_tokens=self.summary_tokens)
            self.summary = self.llm.complete([self.prompt.format(summary=self.summary or "(none)", lines=lines)],
                                             cfg)[0].strip()
            self.summarised += dropped
