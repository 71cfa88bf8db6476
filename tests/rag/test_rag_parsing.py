"""Parsing and chunking: type checks from content, human reasons, structure-
following chunks that fit the embedding model's window (its own tokenizer)."""

from __future__ import annotations

import itertools

import pytest

from rag.chunking import chunk_pages
from rag.embeddings import get_embedder
from rag.parsing import FileRejected, Page, html_to_text, parse, sniff
from rag.uploads import sanitize_filename
from tests.support import documents as docs


@pytest.fixture(scope="module")
def embedder():
    return get_embedder()


def _write(tmp_path, name, data):
    path = tmp_path / "stored"
    path.write_bytes(data)
    return path, name


@pytest.mark.parametrize(
    ("name", "data", "code", "message"),
    [
        (
            "notes.txt",
            docs.binary_named_txt(),
            "binary_content",
            "not a text file although named .txt",
        ),
        (
            "report.pdf",
            b"Just some words, not a PDF.",
            "not_a_pdf",
            "not a PDF although named .pdf",
        ),
        ("empty.md", b"", "empty_file", "empty file"),
        ("letter.docx", b"PK\x03\x04 not really a zip", "damaged_docx", "damaged"),
        ("tool.exe", b"MZ\x90\x00", "unsupported_type", "unsupported file type (.exe)"),
        ("latin.txt", "café crème".encode("latin-1"), "not_utf8", "not UTF-8"),
    ],
)
def test_it_refuses_content_that_is_not_what_the_name_says(tmp_path, name, data, code, message):
    path, name = _write(tmp_path, name, data)
    with pytest.raises(FileRejected) as caught:
        sniff(path, name)
    assert caught.value.code == code
    assert message in caught.value.message


@pytest.mark.parametrize(
    ("data", "code", "message"),
    [
        (
            docs.encrypted_pdf(),
            "encrypted_pdf",
            "encrypted PDF: remove the password and upload again",
        ),
        (docs.truncated_pdf(), "damaged_pdf", "the PDF is damaged or truncated"),
        (docs.scanned_pdf(), "no_text", "no text found: scanned PDF? BreezeWeb does not OCR"),
    ],
)
def test_bad_pdfs_fail_with_a_reason_a_person_can_act_on(tmp_path, data, code, message):
    path, name = _write(tmp_path, "file.pdf", data)
    assert sniff(path, name) == "pdf"  # they look like PDFs at upload time
    with pytest.raises(FileRejected) as caught:
        parse(path, name)
    assert (caught.value.code, caught.value.message) == (code, message)


def test_a_multi_page_pdf_keeps_its_pages(tmp_path):
    path, name = _write(tmp_path, "lighthouse.pdf", docs.lighthouse_pdf())
    parsed = parse(path, name)
    assert parsed.page_count == 3
    assert [p.number for p in parsed.pages] == [1, 2, 3]
    assert "Thomas Vell" in parsed.pages[0].text
    assert "forty thousand litres" in parsed.pages[1].text
    assert "silver gull" in parsed.pages[2].text


def test_html_text_leaves_out_scripts_and_styles_and_keeps_headings():
    text = html_to_text(docs.HTML_PAGE)
    assert docs.SCRIPT_SECRET not in text
    assert "font-family" not in text and "hidden-style-marker" not in text
    assert "Enable JavaScript" not in text
    assert "## Opening hours" in text
    assert "harbour master's office is open from 7 am" in text


def test_docx_paragraphs_headings_and_tables_are_read(tmp_path):
    path, name = _write(tmp_path, "orchard.docx", docs.docx_bytes())
    (page,) = parse(path, name).pages
    assert "# Orchard handbook" in page.text and "## Pruning" in page.text
    assert "Bramley | October" in page.text


def test_chunks_fit_the_model_window_in_its_own_tokens_and_overlap(embedder):
    sentences = [
        f"Sentence number {i} talks about the harbour, the ferry and tide table {i * 7}."
        for i in range(300)
    ]
    text = (
        "# Manual\n\n## Tides\n\n" + " ".join(sentences[:150]) + "\n\n" + " ".join(sentences[150:])
    )
    chunks = chunk_pages([Page(None, text)], embedder.count_tokens_many)
    assert len(chunks) > 10
    for chunk in chunks:
        assert chunk.text == text[chunk.start : chunk.end]  # offsets point at the source
        real = embedder.count_tokens(chunk.embedding_input())
        assert real <= embedder.max_tokens - 2, real  # nothing truncated by the model
        assert chunk.tokens <= 200
        assert chunk.heading_path == "Manual > Tides"
    overlapping = sum(1 for a, b in itertools.pairwise(chunks) if b.start < a.end)
    assert overlapping >= len(chunks) // 2  # consecutive chunks share text


def test_chunks_never_mix_sections_and_follow_the_heading_path(embedder):
    text = docs.MARKDOWN_NOTE
    chunks = chunk_pages([Page(None, text)], embedder.count_tokens_many)
    assert [c.heading_path for c in chunks] == ["Field notes > Birds", "Field notes > Plants"]
    assert "loon" in chunks[0].text and "kale" not in chunks[0].text


def test_a_giant_word_is_cut_instead_of_overflowing(embedder):
    text = "start " + "x" * 5000 + " end."
    chunks = chunk_pages([Page(1, text)], embedder.count_tokens_many)
    assert all(c.page == 1 for c in chunks)
    assert "".join(c.text for c in chunks).count("x") >= 4000


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("../../etc/passwd.txt", "passwd.txt"),
        ("..\\..\\windows\\system.ini.md", "system.ini.md"),
        ("  .hidden notes.md ", "hidden notes.md"),
        ("bad\x00name\x1f<>.pdf", "badname.pdf"),
        ("..", "document"),
        ("a" * 300 + ".pdf", "a" * 196 + ".pdf"),
    ],
)
def test_filenames_are_sanitised(raw, expected):
    assert sanitize_filename(raw) == expected


def test_chunks_of_mid_sized_paragraphs_overlap_by_whole_sentences(embedder):
    paragraphs = [
        " ".join(f"Paragraph {p} sentence {s} is about tide number {p * 10 + s}." for s in range(9))
        for p in range(12)
    ]
    text = "\n\n".join(paragraphs)
    chunks = chunk_pages([Page(3, text)], embedder.count_tokens_many)
    assert len(chunks) >= 4
    for a, b in itertools.pairwise(chunks):
        shared = text[b.start : a.end]
        assert b.start < a.end and 0 < embedder.count_tokens(shared) <= 40
        assert shared.rstrip().endswith(".")  # the overlap is whole sentences
    assert all(c.page == 3 and c.tokens <= 200 for c in chunks)
