"""Split parsed pages into chunks that follow the document's structure and fit
the embedding model's window, measured in the model's own word pieces.

Sections (markdown headings) are never mixed in one chunk; inside a section
whole paragraphs are packed, a paragraph too long for a chunk is split into
sentences, and a sentence too long into runs of words. Consecutive chunks of a
section share ~`overlap_tokens` of trailing text so a fact cut at a boundary
is still found. Chunk text is an exact slice of the page (`start`/`end` are
character offsets into it), so citations can point back at the source.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from rag.parsing import Page

DEFAULT_MAX_TOKENS = 200
DEFAULT_OVERLAP_TOKENS = 40
_HEADING = re.compile(r"^(#{1,6})[ \t]+(.+?)[ \t#]*$")
_SENTENCE_END = re.compile(r"(?<=[.!?;:])[\"')\]]*\s+")
_WORD = re.compile(r"\S+")

CountMany = Callable[[list[str]], list[int]]


@dataclass(frozen=True)
class Chunk:
    text: str
    page: int | None
    start: int
    end: int
    heading_path: str
    tokens: int

    def context(self, title: str = "") -> str:
        """Where the chunk is: the document's title and the heading path. Indexed
        with the chunk (vector and keyword), never shown to the model."""
        return "\n".join(part for part in (title, self.heading_path) if part)

    def embedding_input(self, title: str = "") -> str:
        """What the embedding model sees: the title and heading path give a
        chunk its context ("section 4 of version 2"), then the text."""
        where = self.context(title)
        return f"{where}\n{self.text}" if where else self.text


@dataclass
class _Unit:
    start: int
    end: int
    tokens: int


def _blocks(text: str):
    """Yield ('heading', level, title, start, end) or ('para', start, end) in order."""
    pos = 0
    para_start: int | None = None
    para_end = 0
    for line in text.splitlines(keepends=True):
        line_start, pos = pos, pos + len(line)
        stripped = line.strip()
        heading = _HEADING.match(stripped)
        if not stripped or heading:
            if para_start is not None:
                yield ("para", para_start, para_end)
                para_start = None
            if heading:
                yield ("heading", len(heading.group(1)), heading.group(2).strip())
            continue
        if para_start is None:
            para_start = line_start + (len(line) - len(line.lstrip()))
        para_end = line_start + len(line.rstrip())
    if para_start is not None:
        yield ("para", para_start, para_end)


def _spans(pattern_split: re.Pattern, text: str, start: int, end: int) -> list[tuple[int, int]]:
    """Split text[start:end] at the pattern into trimmed (start, end) spans."""
    spans = []
    cursor = start
    for match in pattern_split.finditer(text, start, end):
        if match.start() > cursor:
            spans.append((cursor, match.start()))
        cursor = match.end()
    if cursor < end:
        spans.append((cursor, end))
    return [(s, e) for s, e in spans if text[s:e].strip()]


def _split_unit(text: str, start: int, end: int, budget: int, count_many: CountMany) -> list[_Unit]:
    """Units of at most `budget` tokens covering text[start:end]: sentences, or
    word runs for a sentence that is still too long."""
    sentences = _spans(_SENTENCE_END, text, start, end)
    counts = count_many([text[s:e] for s, e in sentences])
    units: list[_Unit] = []
    for (s, e), n in zip(sentences, counts, strict=True):
        if n <= budget:
            units.append(_Unit(s, e, n))
            continue
        words = [(m.start(), m.end()) for m in _WORD.finditer(text, s, e)]
        word_counts = count_many([text[ws:we] for ws, we in words])
        run_start, run_tokens, run_end = None, 0, s
        for (ws, we), wn in zip(words, word_counts, strict=True):
            if run_start is not None and run_tokens + wn > budget:
                units.append(_Unit(run_start, run_end, run_tokens))
                run_start, run_tokens = None, 0
            if run_start is None:
                run_start = ws
            # A single "word" longer than the budget (a URL, base64): cut it.
            run_tokens += min(wn, budget)
            run_end = we
        if run_start is not None:
            units.append(_Unit(run_start, run_end, run_tokens))
    return units


def chunk_pages(
    pages: Sequence[Page],
    count_many: CountMany,
    *,
    max_tokens: int = DEFAULT_MAX_TOKENS,
    overlap_tokens: int = DEFAULT_OVERLAP_TOKENS,
) -> list[Chunk]:
    """Chunks of every page, in reading order. `count_many` counts tokens of
    several texts at once (the embedding model's tokenizer)."""
    chunks: list[Chunk] = []
    headings: list[tuple[int, str]] = []  # the current heading stack, across pages

    for page in pages:
        text = page.text
        section: list[_Unit] = []

        def flush_section(section: list[_Unit], text: str = text, page: Page = page) -> None:
            if not section:
                return
            heading_path = " > ".join(title for _, title in headings)
            budget = max(48, max_tokens - (count_many([heading_path])[0] if heading_path else 0))
            # Paragraphs as lists of sentences: cuts fall between paragraphs
            # when possible, and overlap is counted in whole sentences.
            paragraphs = [
                _split_unit(text, unit.start, unit.end, budget, count_many) for unit in section
            ]
            _pack(paragraphs, budget, overlap_tokens, text, page.number, heading_path, chunks)

        for block in _blocks(text):
            if block[0] == "heading":
                flush_section(section)
                section = []
                _, level, title = block
                while headings and headings[-1][0] >= level:
                    headings.pop()
                headings.append((level, title))
            else:
                section.append(_Unit(block[1], block[2], 0))
        flush_section(section)
    return chunks


def _pack(
    paragraphs: list[list[_Unit]],
    budget: int,
    overlap_tokens: int,
    text: str,
    page: int | None,
    heading_path: str,
    out: list[Chunk],
) -> None:
    current: list[_Unit] = []
    tokens = 0

    def emit() -> None:
        start, end = current[0].start, current[-1].end
        out.append(Chunk(text[start:end], page, start, end, heading_path, tokens))

    def tail() -> tuple[list[_Unit], int]:
        """The last sentences of the chunk just emitted, up to overlap_tokens."""
        carried: list[_Unit] = []
        carried_tokens = 0
        for previous in reversed(current):
            if carried_tokens + previous.tokens > overlap_tokens:
                break
            carried.insert(0, previous)
            carried_tokens += previous.tokens
        if len(carried) == len(current):  # never repeat a whole chunk
            return [], 0
        return carried, carried_tokens

    for paragraph in paragraphs:
        size = sum(u.tokens for u in paragraph)
        if current and tokens + size > budget:
            emit()
            current, tokens = tail()
            if tokens + size > budget and size <= budget:
                current, tokens = [], 0  # a whole paragraph beats the overlap
        for unit in paragraph:
            if current and tokens + unit.tokens > budget:
                emit()
                current, tokens = tail()
                if tokens + unit.tokens > budget:
                    current, tokens = [], 0
            current.append(unit)
            tokens += unit.tokens
    if current:
        emit()
