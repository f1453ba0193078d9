import pytest

from lmcycle.apps.rag.ingest import html_to_text, load_document, load_documents
from lmcycle.errors import LmcycleError

MARKDOWN = "# Title\n\nSome *emphasis* and `code`.\n\n- item one\n- item two\n"
HTML = """<!DOCTYPE html><html><head><title>Page title</title><style>p {color: red}</style>
<script>var hidden = "script text";</script></head>
<body><h1>Heading</h1><p>First <b>bold</b> paragraph.<br>Second line.</p><!-- a comment -->
<noscript>no script text</noscript><ul><li>alpha</li><li>beta</li></ul></body></html>"""


def test_directory_is_read_recursively_in_order_with_text_kept_and_html_made_visible(tmp_path):
    (tmp_path / "b").mkdir()
    (tmp_path / "a.txt").write_text("plain text\nsecond line\n", encoding="utf-8")
    (tmp_path / "b" / "c.md").write_text(MARKDOWN, encoding="utf-8")
    (tmp_path / "b" / "d.html").write_text(HTML, encoding="utf-8")
    (tmp_path / "b" / "skip.bin").write_bytes(b"\x00\x01")
    (tmp_path / ".hidden").mkdir()
    (tmp_path / ".hidden" / "e.txt").write_text("hidden", encoding="utf-8")
    docs = load_documents(tmp_path)
    assert [d.source for d in docs] == [(tmp_path / p).as_posix() for p in ("a.txt", "b/c.md", "b/d.html")]
    assert docs[0].text == "plain text\nsecond line\n"
    assert docs[1].text == MARKDOWN  # markdown is kept verbatim
    html = docs[2].text
    for visible in ("Page title", "Heading", "First bold paragraph.", "Second line.", "alpha", "beta"):
        assert visible in html
    for invisible in ("script text", "color: red", "a comment", "no script text", "<"):
        assert invisible not in html
    assert html.index("alpha") < html.index("beta")
    assert "paragraph.\nSecond line." in html  # <br> is a line break
    assert "\n\n\n" not in html


def test_single_file_and_its_errors_name_the_file(tmp_path):
    good = tmp_path / "x.md"
    good.write_text("hello", encoding="utf-8")
    assert load_documents(good)[0].text == "hello"
    bad = tmp_path / "latin.txt"
    bad.write_bytes("caf\xe9".encode("latin-1"))
    with pytest.raises(LmcycleError, match="latin.txt.*UTF-8"):
        load_document(bad)
    other = tmp_path / "data.pdf"
    other.write_bytes(b"%PDF")
    with pytest.raises(LmcycleError, match="data.pdf.*unsupported"):
        load_documents(other)
    with pytest.raises(LmcycleError, match="missing"):
        load_documents(tmp_path / "missing")


def test_html_with_xml_declaration_and_empty_html():
    assert html_to_text('<?xml version="1.0" encoding="utf-8"?><html><body><p>Hi</p></body></html>') == "Hi"
    assert html_to_text("   ") == ""
