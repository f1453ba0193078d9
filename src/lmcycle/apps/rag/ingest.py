"""Load text, markdown and HTML files into :class:`Document` objects (source path, text).

A path is one file or a directory, read recursively in sorted order (hidden files and folders skipped; files of
other suffixes skipped when walking a directory, an error when named directly). Text and markdown are kept
exactly as written (markdown syntax is meaningful text for retrieval). HTML becomes its visible text: ``script``,
``style``, ``noscript``, ``template`` and comments are dropped, block elements and ``<br>`` become line breaks,
the ``<title>`` is kept as the first line, and runs of blank lines collapse to one. Files must be UTF-8.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from lmcycle.errors import LmcycleError

TEXT_SUFFIXES = (".txt", ".text", ".md", ".markdown", ".rst")
HTML_SUFFIXES = (".html", ".htm", ".xhtml")
INVISIBLE_TAGS = ("script", "style", "noscript", "template", "head")
BLOCK_TAGS = ("p", "div", "section", "article", "header", "footer", "nav", "aside", "main", "li", "ul", "ol",
              "table", "tr", "h1", "h2", "h3", "h4", "h5", "h6", "pre", "blockquote", "dd", "dt", "dl",
              "figure", "figcaption", "hr", "form", "fieldset", "address", "details", "summary", "title")


@dataclass(frozen=True)
class Document:
    """One loaded file: ``source`` is its path as found (POSIX form), ``text`` its (visible) text."""

    source: str
    text: str


def load_documents(path: str | Path) -> list[Document]:
    """The documents of ``path`` (a file, or a directory walked recursively in sorted order)."""
    path = Path(path)
    if path.is_file():
        if path.suffix.lower() not in TEXT_SUFFIXES + HTML_SUFFIXES:
            raise LmcycleError(f"unsupported file type '{path.suffix}' (known: "
                               f"{', '.join(TEXT_SUFFIXES + HTML_SUFFIXES)})", file=path)
        return [load_document(path)]
    if not path.is_dir():
        raise LmcycleError("no such file or directory", file=path)
    files = sorted(p for p in path.rglob("*") if p.is_file() and _wanted(p.relative_to(path)))
    return [load_document(p) for p in files]


def load_document(path: str | Path) -> Document:
    """One file as a :class:`Document` (HTML by suffix, everything else as plain text)."""
    path = Path(path)
    try:
        raw = path.read_bytes()
    except OSError as e:
        raise LmcycleError(f"cannot read file: {e.strerror or e}", file=path) from e
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise LmcycleError(f"not UTF-8 text (byte {e.start}): convert it to UTF-8", file=path) from e
    if path.suffix.lower() in HTML_SUFFIXES:
        text = html_to_text(text, file=path)
    return Document(source=path.as_posix(), text=text)


def html_to_text(html: str, file: str | Path | None = None) -> str:
    """The visible text of an HTML page: blocks on their own lines, at most one blank line in a row."""
    if not html.strip():
        return ""
    try:
        import lxml.etree
        import lxml.html
    except ImportError:
        raise LmcycleError("reading HTML needs lxml: pip install 'lmcycle[apps]'", file=file) from None
    try:
        root = lxml.html.document_fromstring(_drop_xml_declaration(html))
    except (lxml.etree.ParserError, ValueError) as e:
        raise LmcycleError(f"cannot parse HTML: {e}", file=file) from e
    title = root.findtext(".//title") or ""
    for el in list(root.iter(*INVISIBLE_TAGS, lxml.etree.Comment)):
        el.drop_tree()
    for el in root.iter("br"):
        el.tail = "\n" + (el.tail or "")
    for el in root.iter(*BLOCK_TAGS):
        el.text = "\n" + (el.text or "")
        el.tail = "\n" + (el.tail or "")
    body = root.text_content()
    lines = [" ".join(line.split()) for line in (title + "\n" + body).splitlines()]
    return re.sub(r"\n{3,}", "\n\n", "\n".join(lines)).strip()


def _drop_xml_declaration(html: str) -> str:
    # lxml refuses str input that carries an encoding declaration; the text is already decoded.
    return re.sub(r"^\s*<\?xml[^>]*\?>", "", html)


def _wanted(relative: Path) -> bool:
    if any(part.startswith(".") for part in relative.parts):
        return False
    return relative.suffix.lower() in TEXT_SUFFIXES + HTML_SUFFIXES
