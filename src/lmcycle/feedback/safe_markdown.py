"""Guidelines Markdown as HTML that can carry no markup of its own.

Every character of the text is HTML-escaped first; only then is a tiny subset of Markdown turned into tags:
ATX headings (``#`` .. ``######``, shown one level down so that the page keeps its own ``<h1>``), paragraphs
(separated by blank lines), unordered (``-``, ``*``, ``+``) and ordered (``1.``) lists, ``**bold**``,
``*em*`` / ``_em_`` and ```code```. Everything else, raw HTML, links and images included, stays visible as
text. The tags are added around text that is already escaped and never carry attributes, so no input can open
a tag, an attribute or a URL: guidelines are written by admins, but a pasted snippet must not run either.
"""

from __future__ import annotations

import html
import re

_HEADING = re.compile(r"(#{1,6})\s+(.*?)(?:\s+#+)?\s*")
_BULLET = re.compile(r"\s{0,3}[-*+]\s+(.*)")
_NUMBERED = re.compile(r"\s{0,3}\d{1,9}[.)]\s+(.*)")
_CODE = re.compile(r"`([^`]+)`")
_BOLD = re.compile(r"\*\*(?=\S)(.+?)(?<=\S)\*\*")
_EM = re.compile(r"(?<![\w*])\*(?=[^\s*])(.+?)(?<=[^\s*])\*(?![\w*])|(?<!\w)_(?=\S)(.+?)(?<=\S)_(?!\w)")


def _inline(escaped: str) -> str:
    """Code spans, bold and emphasis in one block's already escaped text (code spans keep their content)."""
    parts = _CODE.split(escaped)  # odd positions: the insides of `code` spans
    out = []
    for i, part in enumerate(parts):
        if i % 2:
            out.append(f"<code>{part}</code>")
        else:
            part = _BOLD.sub(r"<strong>\1</strong>", part)
            out.append(_EM.sub(lambda m: f"<em>{m.group(1) or m.group(2)}</em>", part))
    return "".join(out)


def render_markdown(text: str) -> str:
    """``text`` (Markdown) as HTML that is safe to insert as it is (a template marks it ``|safe``): escaped
    first, then the subset of the module docstring."""
    blocks: list[str] = []
    paragraph: list[str] = []
    list_tag: str | None = None
    items: list[str] = []

    def close_paragraph() -> None:
        if paragraph:
            blocks.append(f"<p>{_inline(' '.join(paragraph))}</p>")
            paragraph.clear()

    def close_list() -> None:
        nonlocal list_tag
        if list_tag:
            blocks.append(f"<{list_tag}>" + "".join(f"<li>{_inline(i)}</li>" for i in items) + f"</{list_tag}>")
            items.clear()
            list_tag = None

    for raw in html.escape(text, quote=True).splitlines():
        line = raw.rstrip()
        heading = _HEADING.fullmatch(line)
        listed = [(tag, m) for tag, m in (("ul", _BULLET.fullmatch(line)), ("ol", _NUMBERED.fullmatch(line))) if m]
        if not line.strip():
            close_paragraph()
            close_list()
        elif heading:
            close_paragraph()
            close_list()
            level = min(len(heading.group(1)) + 1, 6)
            blocks.append(f"<h{level}>{_inline(heading.group(2))}</h{level}>")
        elif listed:
            tag, m = listed[0]
            close_paragraph()
            if list_tag != tag:
                close_list()
                list_tag = tag
            items.append(m.group(1))
        elif list_tag and raw[:1] in (" ", "\t"):  # an indented line continues the list item above
            items[-1] += " " + line.strip()
        else:
            close_list()
            paragraph.append(line.strip())
    close_paragraph()
    close_list()
    return "\n".join(blocks)
