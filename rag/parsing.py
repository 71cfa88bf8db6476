"""What a stored file is (from its content, not only its name) and its text,
page by page.

Two steps with one vocabulary of human reasons: `sniff()` is cheap (the first
bytes) and runs at upload, so a wrong file is refused at once; `parse()` reads
the whole file in the ingestion worker and fails with a reason a person can act
on ("encrypted PDF: remove the password and upload again").
"""

from __future__ import annotations

import re
import zipfile
from dataclasses import dataclass
from html.parser import HTMLParser
from pathlib import Path
from typing import Any

EXTENSIONS: dict[str, str] = {
    ".txt": "text",
    ".text": "text",
    ".md": "markdown",
    ".markdown": "markdown",
    ".pdf": "pdf",
    ".html": "html",
    ".htm": "html",
    ".docx": "docx",
}
MIME_TYPES: dict[str, str] = {
    "text": "text/plain",
    "markdown": "text/markdown",
    "pdf": "application/pdf",
    "html": "text/html",
    "docx": "application/vnd.openxmlformats-officedocument.wordprocessingml.document",
}
KIND_BY_MIME = {mime: kind for kind, mime in MIME_TYPES.items()}
SUPPORTED = ".txt, .md, .pdf, .html, .docx"
SNIFF_BYTES = 64 * 1024

NO_TEXT = "no text found: scanned PDF? BreezeWeb does not OCR"
ENCRYPTED = "encrypted PDF: remove the password and upload again"
DAMAGED_PDF = "the PDF is damaged or truncated"


class FileRejected(Exception):
    """A file that cannot be stored or indexed (the one refusal of rag, also
    `rag.uploads.UploadRejected`): `code` is stable for APIs, `message` is for
    people, `status` the HTTP status it means, `extra` details for the client."""

    def __init__(self, code: str, message: str, status: int = 415, **extra: Any) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.status = status
        self.extra = extra


@dataclass(frozen=True)
class Page:
    """Text of one page (`number` is 1-based, None for formats without pages)."""

    number: int | None
    text: str


@dataclass(frozen=True)
class ParsedDocument:
    kind: str
    pages: tuple[Page, ...]
    page_count: int | None


def kind_for_name(filename: str) -> str:
    """The kind that the file's extension claims, or FileRejected (415)."""
    suffix = Path(filename).suffix.lower()
    kind = EXTENSIONS.get(suffix)
    if kind is None:
        shown = suffix or "no extension"
        raise FileRejected(
            "unsupported_type", f"unsupported file type ({shown}): BreezeWeb reads {SUPPORTED}"
        )
    return kind


def _looks_binary(head: bytes) -> bool:
    if b"\x00" in head:
        return True
    controls = sum(1 for b in head if b < 32 and b not in (9, 10, 12, 13, 27))
    return controls > max(4, len(head) // 100)


def _decode_text(data: bytes, *, complete: bool) -> str:
    """UTF-8 (a BOM is fine). A cut-off multi-byte character at the end of a
    partial read is not an error."""
    if data.startswith(b"\xef\xbb\xbf"):
        data = data[3:]
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        if not complete and exc.start >= len(data) - 3:
            return data[: exc.start].decode("utf-8")
        raise


def sniff(path: Path, filename: str) -> str:
    """The file's kind, checked against its content. Raises FileRejected."""
    claimed = kind_for_name(filename)
    size = path.stat().st_size
    if size == 0:
        raise FileRejected("empty_file", "empty file: there is nothing to index", status=400)
    with path.open("rb") as fh:
        head = fh.read(SNIFF_BYTES)
    ext = Path(filename).suffix.lower()
    if claimed == "pdf":
        if b"%PDF-" not in head[:1024]:
            raise FileRejected("not_a_pdf", f"not a PDF although named {ext}")
        return claimed
    if claimed == "docx":
        if not head.startswith(b"PK\x03\x04"):
            raise FileRejected("not_a_docx", f"not a Word document although named {ext}")
        try:
            with zipfile.ZipFile(path) as archive:
                names = set(archive.namelist())
        except (zipfile.BadZipFile, OSError):
            raise FileRejected(
                "damaged_docx", "the .docx file is damaged (not a readable zip archive)"
            ) from None
        if "word/document.xml" not in names:
            raise FileRejected("not_a_docx", f"not a Word document although named {ext}")
        return claimed
    # Text kinds: a PDF or zip named .txt is caught here too.
    if head.startswith((b"%PDF-", b"PK\x03\x04")) or _looks_binary(head):
        raise FileRejected(
            "binary_content", f"not a text file although named {ext}: binary content"
        )
    try:
        _decode_text(head, complete=size <= SNIFF_BYTES)
    except UnicodeDecodeError:
        raise FileRejected(
            "not_utf8", f"not UTF-8 text although named {ext}: save it as UTF-8 and upload again"
        ) from None
    return claimed


# --- parsers ------------------------------------------------------------------


def _parse_text(path: Path) -> tuple[Page, ...]:
    try:
        text = _decode_text(path.read_bytes(), complete=True)
    except UnicodeDecodeError:
        raise FileRejected(
            "not_utf8", "not UTF-8 text: save it as UTF-8 and upload again"
        ) from None
    return (Page(None, text.replace("\r\n", "\n").replace("\r", "\n")),)


def _parse_pdf(path: Path) -> tuple[tuple[Page, ...], int]:
    from pypdf import PdfReader
    from pypdf.errors import FileNotDecryptedError, PdfReadError, PdfStreamError

    # A file cut short usually loses its trailer; pypdf would quietly rebuild
    # what it can, and the user would get half a document indexed.
    with path.open("rb") as fh:
        fh.seek(max(0, path.stat().st_size - 2048))
        tail = fh.read()
    if b"%%EOF" not in tail:
        raise FileRejected("damaged_pdf", DAMAGED_PDF)
    try:
        reader = PdfReader(str(path))
        if reader.is_encrypted:
            # An owner password alone (empty user password) still allows reading.
            try:
                opened = reader.decrypt("")
            except (FileNotDecryptedError, NotImplementedError, PdfReadError):
                opened = 0
            if not opened:
                raise FileRejected("encrypted_pdf", ENCRYPTED)
        pages = []
        for number, page in enumerate(reader.pages, start=1):
            pages.append(Page(number, page.extract_text() or ""))
    except FileRejected:
        raise
    except FileNotDecryptedError:
        raise FileRejected("encrypted_pdf", ENCRYPTED) from None
    except (PdfReadError, PdfStreamError, ValueError, KeyError, TypeError, AttributeError,
            IndexError, EOFError, OSError, RecursionError, ZeroDivisionError):  # fmt: skip
        # pypdf surfaces broken structures as any of these.
        raise FileRejected("damaged_pdf", DAMAGED_PDF) from None
    if not pages:
        raise FileRejected("damaged_pdf", DAMAGED_PDF)
    return tuple(pages), len(pages)


_BLOCK_TAGS = {
    "p", "div", "section", "article", "main", "header", "footer", "aside", "nav", "li", "ul",
    "ol", "table", "tr", "br", "hr", "blockquote", "pre", "dd", "dt", "dl", "figure",
    "figcaption", "form", "h1", "h2", "h3", "h4", "h5", "h6", "td", "th",
}  # fmt: skip
_SKIP_TAGS = {"script", "style", "noscript", "template", "svg", "head", "iframe", "object"}


class _HTMLText(HTMLParser):
    """Visible text; headings become markdown headings so chunking sees them."""

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.parts: list[str] = []
        self.skip_depth = 0
        self.title = ""
        self._in_title = False

    def handle_starttag(self, tag, attrs):
        if tag in _SKIP_TAGS:
            self.skip_depth += 1
        if tag == "title":
            self._in_title = True
        if self.skip_depth:
            return
        if tag in _BLOCK_TAGS:
            self.parts.append("\n\n")
        if len(tag) == 2 and tag[0] == "h" and tag[1] in "123456":
            self.parts.append("#" * int(tag[1]) + " ")

    def handle_endtag(self, tag):
        if tag == "title":
            self._in_title = False
        if tag in _SKIP_TAGS and self.skip_depth:
            self.skip_depth -= 1
            return
        if not self.skip_depth and tag in _BLOCK_TAGS:
            self.parts.append("\n\n")

    def handle_data(self, data):
        if self._in_title:
            self.title += data
        if not self.skip_depth:
            self.parts.append(data)

    def text(self) -> str:
        raw = "".join(self.parts)
        lines = [re.sub(r"[ \t\f\v\u00a0]+", " ", line).strip() for line in raw.split("\n")]
        return re.sub(r"\n{3,}", "\n\n", "\n".join(lines)).strip()


def html_to_text(markup: str) -> str:
    """The visible text of an HTML page, without scripts and styles."""
    parser = _HTMLText()
    parser.feed(markup)
    parser.close()
    return parser.text()


def _parse_html(path: Path) -> tuple[Page, ...]:
    (page,) = _parse_text(path)
    return (Page(None, html_to_text(page.text)),)


def _parse_docx(path: Path) -> tuple[Page, ...]:
    import docx
    from docx.oxml.ns import qn
    from docx.table import Table
    from docx.text.paragraph import Paragraph

    try:
        document = docx.Document(str(path))
        blocks: list[str] = []
        # Paragraphs and tables in body order: iterate the XML children.
        for child in document.element.body.iterchildren():
            if child.tag == qn("w:p"):
                paragraph = Paragraph(child, document)
                text = paragraph.text.strip()
                if not text:
                    continue
                style = (paragraph.style.name if paragraph.style is not None else "") or ""
                level = 0
                if style == "Title":
                    level = 1
                elif style.startswith("Heading "):
                    suffix = style.removeprefix("Heading ").strip()
                    level = int(suffix) if suffix.isdigit() else 1
                blocks.append(("#" * min(level, 6) + " " + text) if level else text)
            elif child.tag == qn("w:tbl"):
                table = Table(child, document)
                for row in table.rows:
                    cells = [cell.text.strip() for cell in row.cells]
                    if any(cells):
                        blocks.append(" | ".join(cells))
    except (zipfile.BadZipFile, KeyError, ValueError, AttributeError, OSError) as exc:
        raise FileRejected(
            "damaged_docx", f"the .docx file is damaged ({type(exc).__name__})"
        ) from None
    except Exception as exc:  # lxml raises its own XMLSyntaxError for broken parts
        if type(exc).__module__.startswith("lxml") or "docx" in type(exc).__module__:
            raise FileRejected("damaged_docx", "the .docx file is damaged") from None
        raise
    return (Page(None, "\n\n".join(blocks)),)


def parse(path: Path, filename: str) -> ParsedDocument:
    """Text of the stored file, pages kept. Raises FileRejected with a reason."""
    kind = sniff(path, filename)
    page_count: int | None = None
    if kind == "pdf":
        pages, page_count = _parse_pdf(path)
    elif kind == "docx":
        pages = _parse_docx(path)
    elif kind == "html":
        pages = _parse_html(path)
    else:
        pages = _parse_text(path)
    if not any(p.text.strip() for p in pages):
        reason = NO_TEXT if kind == "pdf" else "no text found: the file holds no readable text"
        raise FileRejected("no_text", reason, status=422)
    return ParsedDocument(kind=kind, pages=pages, page_count=page_count)
