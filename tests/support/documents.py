"""Real test files made on the fly: a multi-page PDF written by a small PDF
writer (text objects per page, a valid xref), its encrypted and truncated
variants, a scanned-like PDF (an image, no text), a .docx through python-docx,
an HTML page with scripts and styles, and the bad cases.

The facts in them are distinctive so a question about one retrieves exactly
its document and page (used by the tests and by bench/rag_retrieval.py).
"""

from __future__ import annotations

import io
import textwrap
import zlib
from dataclasses import dataclass

# Each inner list is one PDF page; each string one paragraph.
LIGHTHOUSE_PAGES = [
    [
        "The Aldermoor lighthouse was built in 1887 by the engineer Thomas Vell.",
        "Its brass lamp could be seen from twenty nautical miles away on clear nights, "
        "and the keeper climbed 214 steps to wind the clockwork every four hours.",
    ],
    [
        "Greenhouse tomatoes of the Aldermoor cooperative are watered from rainwater "
        "that is stored in underground concrete tanks holding forty thousand litres.",
        "The cooperative sells its harvest at the Saturday market beside the harbour.",
    ],
    [
        "The Aldermoor kite festival takes place every September on the northern cliffs.",
        "Kite flyers from three countries compete for the silver gull trophy, "
        "awarded to the kite that stays aloft longest in the evening wind.",
    ],
]
LIGHTHOUSE_QUESTIONS = [
    ("Who built the Aldermoor lighthouse and when?", 1),
    ("How is rainwater stored to water the greenhouse tomatoes?", 2),
    ("When is the kite festival held and what trophy is awarded?", 3),
]

# Facts for the retrieval-quality check: (topic title, paragraph, question).
FACTS = [
    ("Volcano", "Mount Kerevan last erupted in 1974, covering the valley of Osk in grey ash.",
     "When did Mount Kerevan last erupt?"),
    ("Bakery", "The Lindqvist bakery bakes its rye sourdough for exactly nine hours at low heat.",
     "How long is the rye sourdough baked?"),
    ("Railway", "The Halden mountain railway climbs 1,200 metres through eleven spiral tunnels.",
     "How many spiral tunnels does the mountain railway have?"),
    ("Chess", "Grandmaster Ilse Marnow won the Baltic chess open five times in a row.",
     "Who won the Baltic chess open five times in a row?"),
    ("Bees", "Beekeepers in Varlo move their hives to the heather moors every August.",
     "Where do the Varlo beekeepers move their hives in August?"),
    ("Observatory", "The Pellham observatory telescope has a mirror 3.6 metres wide.",
     "How wide is the mirror of the observatory telescope?"),
    ("Ferry", "The night ferry from Rosk to Tiller takes seven hours and carries 400 cars.",
     "How long does the night ferry from Rosk to Tiller take?"),
    ("Library", "The Orren library keeps a 13th-century atlas drawn on goat parchment.",
     "What is the old atlas in the Orren library drawn on?"),
    ("Marathon", "The Quellby marathon route crosses the river Dunn four times.",
     "How many times does the marathon route cross the river?"),
    ("Cheese", "Brennach cheese is aged in limestone caves for eighteen months.",
     "Where and how long is Brennach cheese aged?"),
    ("Glacier", "The Sorva glacier retreated 600 metres between 1990 and 2020.",
     "How far did the Sorva glacier retreat?"),
    ("Violin", "The violin maker Agata Reis uses spruce from trees felled in winter.",
     "What wood does the violin maker use?"),
]  # fmt: skip


# --- a minimal PDF writer -------------------------------------------------------


def _pdf_escape(text: str) -> str:
    return text.replace("\\", "\\\\").replace("(", "\\(").replace(")", "\\)")


def _text_stream(paragraphs: list[str]) -> bytes:
    lines = ["BT", "/F1 11 Tf", "14 TL", "72 760 Td"]
    for paragraph in paragraphs:
        for line in textwrap.wrap(paragraph, 85):
            lines.append(f"({_pdf_escape(line)}) Tj T*")
        lines.append("T*")
    lines.append("ET")
    return "\n".join(lines).encode("latin-1")


def _image_stream() -> tuple[bytes, bytes]:
    """A grey 64x64 'scan' (no text anywhere) and the page content drawing it."""
    pixels = bytes((x * 3 + y * 5) % 256 for y in range(64) for x in range(64))
    return zlib.compress(pixels), b"q 400 0 0 400 100 300 cm /Im1 Do Q"


def pdf_bytes(pages: list[list[str]] | None = None, *, scanned_pages: int = 0) -> bytes:
    """A valid PDF: one page per paragraph list (real text objects), or
    `scanned_pages` pages holding only an image."""
    objects: list[bytes] = []

    def add(body: bytes) -> int:
        objects.append(body)
        return len(objects)

    catalog = add(b"")  # filled in once the page tree exists
    pages_obj = add(b"")
    font = add(b"<< /Type /Font /Subtype /Type1 /BaseFont /Helvetica >>")
    kids = []
    page_contents: list[tuple[bytes, int | None]] = []
    for paragraphs in pages or []:
        page_contents.append((_text_stream(paragraphs), None))
    for _ in range(scanned_pages):
        image, drawing = _image_stream()
        image_obj = add(
            b"<< /Type /XObject /Subtype /Image /Width 64 /Height 64 /ColorSpace /DeviceGray "
            b"/BitsPerComponent 8 /Filter /FlateDecode /Length %d >>\nstream\n"
            % len(image)
            + image
            + b"\nendstream"
        )
        page_contents.append((drawing, image_obj))
    for content, image_obj in page_contents:
        stream = add(b"<< /Length %d >>\nstream\n" % len(content) + content + b"\nendstream")
        resources = b"/Font << /F1 %d 0 R >>" % font
        if image_obj:
            resources += b" /XObject << /Im1 %d 0 R >>" % image_obj
        kids.append(
            add(
                b"<< /Type /Page /Parent %d 0 R /MediaBox [0 0 612 792] "
                b"/Resources << %s >> /Contents %d 0 R >>" % (pages_obj, resources, stream)
            )
        )
    objects[catalog - 1] = b"<< /Type /Catalog /Pages %d 0 R >>" % pages_obj
    objects[pages_obj - 1] = b"<< /Type /Pages /Kids [%s] /Count %d >>" % (
        b" ".join(b"%d 0 R" % k for k in kids),
        len(kids),
    )
    out = io.BytesIO()
    out.write(b"%PDF-1.4\n%\xe2\xe3\xcf\xd3\n")
    offsets = []
    for number, body in enumerate(objects, start=1):
        offsets.append(out.tell())
        out.write(b"%d 0 obj\n" % number + body + b"\nendobj\n")
    xref = out.tell()
    out.write(b"xref\n0 %d\n0000000000 65535 f \n" % (len(objects) + 1))
    for offset in offsets:
        out.write(b"%010d 00000 n \n" % offset)
    out.write(
        b"trailer\n<< /Size %d /Root %d 0 R >>\nstartxref\n%d\n%%%%EOF\n"
        % (len(objects) + 1, catalog, xref)
    )
    return out.getvalue()


def lighthouse_pdf() -> bytes:
    return pdf_bytes(LIGHTHOUSE_PAGES)


def encrypted_pdf(password: str = "s3cret-pw") -> bytes:
    from pypdf import PdfReader, PdfWriter

    writer = PdfWriter(clone_from=PdfReader(io.BytesIO(lighthouse_pdf())))
    writer.encrypt(user_password=password, owner_password=password + "-owner")
    out = io.BytesIO()
    writer.write(out)
    return out.getvalue()


def truncated_pdf() -> bytes:
    data = lighthouse_pdf()
    return data[: int(len(data) * 0.6)]


def scanned_pdf() -> bytes:
    return pdf_bytes(scanned_pages=2)


# --- other formats --------------------------------------------------------------


def docx_bytes() -> bytes:
    import docx

    document = docx.Document()
    document.add_heading("Orchard handbook", level=1)
    document.add_heading("Pruning", level=2)
    document.add_paragraph(
        "Prune the Bramley apple trees in late February, cutting back about a third "
        "of last year's growth so that light reaches the centre of the crown."
    )
    document.add_heading("Pests", level=2)
    document.add_paragraph(
        "Codling moth traps baited with pheromone are hung in May, one trap for every "
        "five trees, and checked every Monday."
    )
    table = document.add_table(rows=2, cols=2)
    table.cell(0, 0).text = "Variety"
    table.cell(0, 1).text = "Harvest"
    table.cell(1, 0).text = "Bramley"
    table.cell(1, 1).text = "October"
    out = io.BytesIO()
    document.save(out)
    return out.getvalue()


SCRIPT_SECRET = "zebra-pancake-telemetry-token"

HTML_PAGE = f"""<!doctype html>
<html><head><title>Harbour guide</title>
<style>body {{ font-family: serif; }} .hidden-style-marker {{ color: red; }}</style>
<script>var tracking = "{SCRIPT_SECRET}"; console.log(tracking);</script>
</head>
<body>
<h1>Harbour guide</h1>
<h2>Opening hours</h2>
<p>The harbour master&#39;s office is open from 7&nbsp;am to 3&nbsp;pm, and the fuel dock
closes at sunset during the winter months.</p>
<script type="text/javascript">document.write("{SCRIPT_SECRET}");</script>
<h2>Moorings</h2>
<p>Visiting yachts moor on the eastern pontoon; the fee is twelve euros per night.</p>
<noscript>Enable JavaScript</noscript>
</body></html>
"""

MARKDOWN_NOTE = """# Field notes

## Birds
The red-throated loon nests on the small lakes behind the dunes from May to July.

## Plants
Sea kale grows on the shingle bank and flowers with white, honey-scented blossoms in June.
"""


def binary_named_txt() -> bytes:
    return bytes(range(256)) * 40


@dataclass(frozen=True)
class FactDocument:
    filename: str
    data: bytes
    questions: tuple[tuple[str, int | None], ...]  # (question, page)


def fact_documents() -> list[FactDocument]:
    """Small documents for recall@k: a PDF of four pages plus markdown notes,
    each fact on its own page or section."""
    pages = [[f"{title}. {text}"] for title, text, _ in FACTS[:4]]
    docs = [
        FactDocument(
            "facts-one.pdf",
            pdf_bytes(pages),
            tuple((q, i + 1) for i, (_, _, q) in enumerate(FACTS[:4])),
        )
    ]
    for start in range(4, len(FACTS), 4):
        group = FACTS[start : start + 4]
        body = "\n\n".join(f"## {title}\n\n{text}" for title, text, _ in group)
        docs.append(
            FactDocument(
                f"facts-{start}.md",
                f"# Notes {start}\n\n{body}\n".encode(),
                tuple((q, None) for _, _, q in group),
            )
        )
    return docs


# --- helpers for the RAG tests ------------------------------------------------------


def drop_all_chroma_collections() -> None:
    """Empty the test Chroma store: database ids restart after a flush, so a new
    test's collection 1 must not find the previous test's chunks."""
    from rag import store

    client = store.get_client()
    for item in client.list_collections():
        name = item if isinstance(item, str) else item.name
        if name.startswith("bw_collection_"):
            client.delete_collection(name)
    store.forget_handles()


def add_and_ingest(owner, filename: str, data: bytes, collection=None):
    """Store a file as a document and index it right here (no worker)."""
    from rag.ingestion import ingest_document
    from rag.models import Collection
    from rag.uploads import add_document, stage_chunks

    target = collection or Collection.personal_for(owner)
    document = add_document(owner, target, stage_chunks([data], filename), dispatch=False)
    ingest_document(document.pk)
    document.refresh_from_db()
    return document


def chunk_count(document) -> int:
    from rag import store

    return store.count_document_chunks(document.collection.chroma_name, document.pk)
