"""A scripted LLM for tests about the plumbing around a model (the real backends have their own tests)."""

from __future__ import annotations

from collections.abc import Callable


class ScriptedLLM:
    """Answers from a list of replies (in order) or a function of the prompt; records every prompt."""

    def __init__(self, replies: list[str] | Callable[[str], str], context_window: int = 100_000):
        self.replies, self.prompts, self.configs = replies, [], []
        self.name, self.context_window = "scripted", context_window

    def complete(self, prompts, cfg):
        out = []
        for p in prompts:
            self.prompts.append(p)
            self.configs.append(cfg)
            out.append(self.replies(p) if callable(self.replies) else self.replies.pop(0))
        return out

    def count_tokens(self, text: str) -> int:
        return len(text.split())
