"""The agent's standard tools: a calculator and Python (both sandboxed), search and lookup over a RAG store.

Each is a :func:`lmcycle.apps.tool.tool` built around its resources, so an agent gets exactly the tools it is
given. Tool output is text for the model; failures come back as :class:`ToolError` messages.
"""

from __future__ import annotations

from lmcycle.apps.rag.cite import defuse, one_line
from lmcycle.apps.rag.retrieve import Retriever
from lmcycle.apps.sandbox import SandboxConfig, calculate, run_snippet
from lmcycle.apps.tool import Tool, ToolError, tool


def calculator_tool() -> Tool:
    @tool(name="calculator")
    def calculator(expression: str) -> str:
        """Evaluate an arithmetic expression (+ - * / // % **, parentheses, numbers), e.g. 12 * (3 + 4).

        Args:
            expression: the arithmetic expression
        """
        try:
            return str(calculate(expression))
        except Exception as e:  # the calculator's own message says what it refused
            raise ToolError(f"calculator: {e}") from None

    return calculator


def python_tool(cfg: SandboxConfig | None = None) -> Tool:
    cfg = cfg or SandboxConfig(timeout_s=5)

    @tool(name="python")
    def python(code: str) -> str:
        """Run a short Python program in a sandbox and return what it prints (math, statistics, fractions,
        itertools, re, datetime and similar modules only; no files, network or processes).

        Args:
            code: the program; print the result
        """
        result = run_snippet(code, cfg)
        if not result.ok:
            raise ToolError(f"python: {result.error.kind}: {result.error.message}")
        return result.stdout.strip() or "(the program printed nothing; print the result)"

    return python


def search_tool(retriever: Retriever, k: int = 3, mode: str = "hybrid") -> Tool:
    @tool(name="search")
    def search(query: str) -> str:
        """Search the document collection; returns the best passages with their sources.

        Args:
            query: what to look for
        """
        hits = retriever.retrieve(query, k, mode)
        if not hits:
            return "no passages found"
        return "\n\n".join(f"[{one_line(h.metadata.get('source', h.key))}] {defuse(h.metadata.get('text', ''))}"
                           for h in hits)

    return search


def lookup_tool(retriever: Retriever, max_sentences: int = 5) -> Tool:
    @tool(name="lookup")
    def lookup(term: str) -> str:
        """Find the sentences of the document collection that contain an exact term (case-insensitive).

        Args:
            term: the word or phrase to find
        """
        needle = term.strip().lower()
        if not needle:
            raise ToolError("lookup: give a non-empty term")
        found = []
        for key, _ in retriever.bm25.search(term, 20):
            text = retriever.store.get(key).get("text", "")
            found += [s.strip() for s in text.replace("\n", " ").split(". ") if needle in s.lower()]
            if len(found) >= max_sentences:
                break
        found = list(dict.fromkeys(found))[:max_sentences]
        return "\n".join(defuse(s) for s in found) if found else f"'{term}' does not occur in the collection"

    return lookup
