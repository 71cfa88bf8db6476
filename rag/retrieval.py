"""Retrieval: the chunks most relevant to a question, from the collections a
user may read, assembled into a numbered context block with its sources.

Access control is the choice of collections to query (one Chroma collection
and one keyword-index partition per BreezeWeb collection), never a metadata
filter: a collection the user cannot read is not even queried, and an
unreadable id passed in is dropped without a word, so the answer never reveals
that it exists.

Per collection (its `search_mode`, `keyword_weight`, `top_k`, `rerank`):

- **vector**: the query's embedding against the chunks' (title + section path
  + text) embeddings in Chroma, cosine, under the collection's `score_floor`
  dropped;
- **keyword**: BM25 over stemmed words of the same title + section path + text
  (rag.lexical: SQLite FTS5, or PostgreSQL full-text search);
- **hybrid** (default): both lists fused by weighted reciprocal rank fusion,
  `(1 - w) / (60 + rank_vector) + w / (60 + rank_keyword)`;
- **re-ranking** (hybrid mode, on by default): the best fused candidates re-ordered by how
  much of the question's terms (title and section included) they cover and
  whether they contain its identifiers and version numbers exactly.

Every hit is checked against its document row in one query: only chunks of
the generation the document names as live are kept, so a re-ingested,
failed or deleted document never answers from old chunks in either index.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field

import numpy as np

from rag import lexical, store
from rag.embeddings import get_embedder
from rag.models import Collection, Document, SearchMode

SNIPPET_CHARS = 300
DEDUP_JACCARD = 0.85  # word-set overlap above which two chunks say the same thing
OVERFETCH = 2  # query extra hits per collection so de-duplication leaves k
POOL = 30  # candidates per signal and collection, at least (fusion and re-ranking need depth)
RRF_K = 60  # reciprocal rank fusion's constant (Cormack et al.)
RERANK_DEPTH = 30  # fused candidates re-ordered by the re-ranking stage
# Re-ranking: fused rank (normalised) + term coverage + exact identifiers.
RERANK_COVERAGE = 0.5
RERANK_IDENTIFIER = 0.5
MODES = tuple(SearchMode.values)


# The fields of a Source a chat turn's citations carry (`Source.as_dict`).
CITED_FIELDS = ("document_id", "title", "page", "snippet", "score", "collection_id")


@dataclass(frozen=True)
class Source:
    """One cited chunk. `page` is 1-based (None for formats without pages).
    `score` (0-1) is what it was ranked by (re-ranked, fused, cosine or
    relative BM25, by mode); the per-signal scores are None where that signal
    did not find it or that stage did not run."""

    document_id: int
    title: str
    page: int | None
    snippet: str
    score: float
    collection_id: int
    text: str = ""
    section: str = ""
    chunk_id: str = ""
    vector_score: float | None = None
    keyword_score: float | None = None
    fused_score: float | None = None
    rerank_score: float | None = None

    def as_dict(self) -> dict:
        """What a chat turn's sources carry (unchanged by hybrid search)."""
        return {key: getattr(self, key) for key in CITED_FIELDS}

    def as_search_dict(self) -> dict:
        """Everything, for /api/search: full text, section, per-signal scores."""
        return asdict(self)


@dataclass(frozen=True)
class RetrievedContext:
    """`text` is the block to put in the prompt ("[1] title, p. 3: ..."), within
    the token budget; `sources[i]` is the chunk numbered `[i + 1]` in it."""

    text: str
    sources: tuple[Source, ...]

    def __bool__(self) -> bool:
        return bool(self.sources)


@dataclass
class _Candidate:
    key: str  # the chunk's id (the same in Chroma and in the keyword index)
    text: str
    document_id: int
    page: int | None
    collection_id: int
    section: str = ""
    generation: str = ""
    title: str = ""
    vector: float | None = None
    keyword: float | None = None
    fused: float = 0.0
    rerank: float | None = None
    words: frozenset[str] = field(default_factory=frozenset)
    mode: str = SearchMode.HYBRID
    score: float = 0.0  # 0-1, what it was ranked by (see _display_scores)


def _default_count_tokens(text: str) -> int:
    return len(text) // 4


def _words(text: str) -> frozenset[str]:
    return frozenset(re.findall(r"\w+", text.lower()))


def _near_duplicate(a: _Candidate, b: _Candidate) -> bool:
    """The same words (a file uploaded twice, overlapping chunks): kept once,
    the better ranked. Near-identical versions of a passage are also kept once;
    the title and section path in both indexes rank the asked-for version first."""
    if not a.words or not b.words:
        return a.words == b.words
    return len(a.words & b.words) / len(a.words | b.words) >= DEDUP_JACCARD


def readable_collections(user, collection_ids: Iterable[int] | None) -> list[Collection]:
    """The collections to search: those asked for that `user` may read (all
    readable ones when `collection_ids` is None)."""
    if user is None or not getattr(user, "is_authenticated", False):
        return []
    readable = Collection.objects.readable_by(user)
    if collection_ids is not None:
        ids = [int(i) for i in collection_ids]
        if not ids:
            return []
        readable = readable.filter(pk__in=ids)
    return list(readable.order_by("pk"))


def _mode(coll: Collection, override: str | None) -> str:
    mode = override or coll.search_mode or SearchMode.HYBRID
    if mode not in MODES:
        raise ValueError(f"mode must be one of {', '.join(MODES)}")
    return mode


def needs_vector(collections: list[Collection], mode: str | None = None) -> bool:
    return any(_mode(c, mode) != SearchMode.KEYWORD for c in collections)


def _generation(chunk_id: str) -> str:
    parts = chunk_id.split(":")
    return parts[1] if len(parts) == 3 else ""


def _collection_candidates(
    coll: Collection, query: str, query_vector, mode: str, pool: int
) -> list[_Candidate]:
    """One collection's candidates, fused by weighted reciprocal rank."""
    by_key: dict[str, _Candidate] = {}
    weight = {SearchMode.VECTOR: 0.0, SearchMode.KEYWORD: 1.0}.get(mode, coll.keyword_weight)
    if mode != SearchMode.KEYWORD and query_vector is not None:
        rank = 0
        for hit in store.query(coll.chroma_name, query_vector, pool):
            if hit.score < coll.score_floor:
                continue
            rank += 1
            meta = hit.metadata
            page = meta.get("page")
            candidate = _Candidate(
                key=hit.id,
                text=hit.text,
                document_id=int(meta.get("document_id", 0)),
                page=int(page) if page is not None else None,
                collection_id=coll.pk,
                section=str(meta.get("heading") or ""),
                generation=str(meta.get("generation") or _generation(hit.id)),
                vector=hit.score,
            )
            candidate.fused += (1.0 - weight) / (RRF_K + rank)
            by_key[hit.id] = candidate
    if mode != SearchMode.VECTOR:
        for rank, hit in enumerate(lexical.search(coll.pk, query, pool), start=1):
            candidate = by_key.get(hit.chroma_id)
            if candidate is None:
                candidate = by_key[hit.chroma_id] = _Candidate(
                    key=hit.chroma_id,
                    text=hit.text,
                    document_id=hit.document_id,
                    page=hit.page,
                    collection_id=coll.pk,
                    section=hit.section,
                    generation=_generation(hit.chroma_id),
                )
            candidate.keyword = hit.score
            candidate.fused += weight / (RRF_K + rank)
    return list(by_key.values())


def _live(candidates: list[_Candidate]) -> list[_Candidate]:
    """Only chunks of a document's live generation (one query): a deleted or
    failed document, or a generation that was replaced, never answers."""
    rows = Document.objects.filter(pk__in={c.document_id for c in candidates}).exclude(
        status=Document.Status.FAILED
    )
    docs = {
        pk: (title, live, version)
        for pk, title, live, version in rows.values_list(
            "pk", "title", "live_generation", "index_version"
        )
    }
    kept = []
    for candidate in candidates:
        found = docs.get(candidate.document_id)
        if found is None:
            continue
        title, live, version = found
        # Indexed before hybrid search (no version): its one generation answers
        # until it is re-indexed.
        if version and candidate.generation != live:
            continue
        candidate.title = title
        kept.append(candidate)
    return kept


_STEM_LEN = 6


def _stems(text: str) -> set[str]:
    """Crude stems (first 6 characters of each word, stop words out): enough
    to tell "timeouts" from "timeout" for coverage, without a stemmer."""
    return {w[:_STEM_LEN] for w in re.findall(r"\w+", text.lower()) if w not in lexical.STOPWORDS}


_IDENTIFIER = re.compile(r"[\w]+(?:[._:-][\w]+)+|\w*\d\w*|\w+_\w+")


def _identifiers(query: str) -> list[str]:
    return list(dict.fromkeys(m.lower() for m in _IDENTIFIER.findall(query)))


def rerank(query: str, candidates: list[_Candidate], depth: int = RERANK_DEPTH) -> None:
    """Re-order the best `depth` fused candidates in place: fused score
    (normalised to the best) + how many of the question's terms the chunk and
    its title/section contain + how many of its identifiers and version
    numbers appear verbatim. Cheap (no model) and measured in bench/rag_eval.py."""
    head = candidates[:depth]
    if not head:
        return
    terms = _stems(query)
    identifiers = _identifiers(query)
    best = max(c.fused for c in head) or 1.0
    for candidate in head:
        haystack = f"{candidate.title}\n{candidate.section}\n{candidate.text}".lower()
        coverage = len(terms & _stems(haystack)) / len(terms) if terms else 0.0
        exact = (
            sum(1 for i in identifiers if re.search(rf"(?<![\w.]){re.escape(i)}(?![\w])", haystack))
            / len(identifiers)
            if identifiers
            else 0.0
        )
        candidate.rerank = (
            candidate.fused / best + RERANK_COVERAGE * coverage + RERANK_IDENTIFIER * exact
        )
    head.sort(key=lambda c: c.rerank, reverse=True)
    candidates[:depth] = head


def search(
    collections: list[Collection],
    query_vector: np.ndarray | None,
    *,
    k: int | None = None,
    query: str = "",
    mode: str | None = None,
    rerank_override: bool | None = None,
) -> list[_Candidate]:
    """Ranked, de-duplicated candidates from `collections` (already access-checked).

    `mode` overrides each collection's search mode, `rerank_override` its
    re-ranking switch; without `query` only vector search runs."""
    limit = k or max((c.top_k for c in collections), default=5)
    candidates: list[_Candidate] = []
    reranked = False
    for coll in collections:
        coll_mode = _mode(coll, mode if query else SearchMode.VECTOR)
        pool = max(POOL, (k or coll.top_k) * OVERFETCH)
        found = _collection_candidates(coll, query, query_vector, coll_mode, pool)
        for candidate in found:
            candidate.mode = coll_mode
            if coll_mode == SearchMode.VECTOR and candidate.vector is not None:
                candidate.fused = candidate.vector
            elif coll_mode == SearchMode.KEYWORD and candidate.keyword is not None:
                candidate.fused = candidate.keyword
        candidates.extend(found)
        wants = coll.rerank if rerank_override is None else rerank_override
        # Re-ranking re-orders fused candidates: vector or keyword mode alone is kept pure.
        reranked = reranked or (wants and bool(query) and coll_mode == SearchMode.HYBRID)
    candidates.sort(key=lambda c: c.fused, reverse=True)
    candidates = _live(candidates)
    if reranked:
        rerank(query, candidates)
    kept: list[_Candidate] = []
    for candidate in candidates:
        candidate.words = _words(candidate.text)
        if any(_near_duplicate(candidate, other) for other in kept):
            continue
        kept.append(candidate)
        if len(kept) >= limit:
            break
    _display_scores(kept)
    return kept


def _display_scores(candidates: list[_Candidate]) -> None:
    """`score` on a 0-1 scale whatever the mode: the re-ranked score over its
    maximum, the fused score over a double first place, the cosine, or BM25
    relative to the best keyword hit."""
    best_keyword = max((c.keyword or 0.0 for c in candidates), default=0.0) or 1.0
    top = 1.0 + RERANK_COVERAGE + RERANK_IDENTIFIER
    for c in candidates:
        if c.rerank is not None:
            c.score = c.rerank / top
        elif c.mode == SearchMode.VECTOR:
            c.score = c.vector or 0.0
        elif c.mode == SearchMode.KEYWORD:
            c.score = (c.keyword or 0.0) / best_keyword
        else:
            c.score = c.fused * (RRF_K + 1)


def _round(value: float | None) -> float | None:
    return None if value is None else round(value, 6)


def _snippet(text: str) -> str:
    flat = " ".join(text.split())
    if len(flat) <= SNIPPET_CHARS:
        return flat
    return flat[: SNIPPET_CHARS - 1].rsplit(" ", 1)[0] + "…"


def retrieve(
    user,
    query: str,
    collection_ids: list[int] | None = None,
    *,
    k: int | None = None,
    budget_tokens: int = 1024,
    count_tokens: Callable[[str], int] | None = None,
    mode: str | None = None,
    rerank: bool | None = None,
) -> RetrievedContext:
    """The context for answering `query` from documents `user` may read.

    Synchronous and blocking (embeds the query, queries Chroma): call it from a
    thread, e.g. `await sync_to_async(retrieve)(...)`. `collection_ids` limits
    the search (ids the user may not read are silently dropped); `k` overrides
    each collection's top_k, `mode` (vector/keyword/hybrid) its search mode and
    `rerank` its re-ranking switch; the context text fits `budget_tokens` as
    measured by `count_tokens` (default: characters / 4). What the model is
    shown is the chunk text only: titles and sections are indexed, not shown."""
    query = (query or "").strip()
    collections = readable_collections(user, collection_ids)
    if not query or not collections:
        return RetrievedContext("", ())
    vector = get_embedder().embed([query])[0] if needs_vector(collections, mode) else None
    found = search(collections, vector, k=k, query=query, mode=mode, rerank_override=rerank)
    return assemble(found, budget_tokens, count_tokens)


def assemble(
    candidates: list[_Candidate],
    budget_tokens: int,
    count_tokens: Callable[[str], int] | None = None,
) -> RetrievedContext:
    """Number the candidates into a context block that fits the budget."""
    count = count_tokens or _default_count_tokens
    missing = {c.document_id for c in candidates if not c.title}
    titles = (
        dict(
            Document.objects.filter(pk__in=missing)
            .exclude(status=Document.Status.FAILED)
            .values_list("pk", "title")
        )
        if missing
        else {}
    )
    blocks: list[str] = []
    sources: list[Source] = []
    used = 0
    for candidate in candidates:
        title = candidate.title or titles.get(candidate.document_id)
        if title is None:  # deleted meanwhile: its chunks are on their way out
            continue
        number = len(sources) + 1
        where = f", p. {candidate.page}" if candidate.page is not None else ""
        header = f"[{number}] {title}{where}: "
        body = " ".join(candidate.text.split())
        block = header + body
        cost = count(block) + (1 if blocks else 0)
        if used + cost > budget_tokens:
            room = budget_tokens - used - count(header) - 1
            if blocks or room < 16:
                break
            # The best chunk alone is over budget: cut it rather than give nothing.
            ratio = room / max(1, count(body))
            body = body[: max(1, int(len(body) * ratio))].rsplit(" ", 1)[0] + "…"
            while body and count(header + body) > budget_tokens:
                body = body[: int(len(body) * 0.9)]
            block = header + body
            cost = count(block)
        blocks.append(block)
        used += cost
        sources.append(
            Source(
                document_id=candidate.document_id,
                title=title,
                page=candidate.page,
                snippet=_snippet(candidate.text),
                score=round(candidate.score, 6),
                collection_id=candidate.collection_id,
                text=candidate.text,
                section=candidate.section,
                chunk_id=candidate.key,
                vector_score=_round(candidate.vector),
                keyword_score=_round(candidate.keyword),
                fused_score=_round(candidate.fused),
                rerank_score=_round(candidate.rerank),
            )
        )
    return RetrievedContext("\n".join(blocks), tuple(sources))
