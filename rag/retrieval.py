"""Retrieval: the chunks most relevant to a question, from the collections a
user may read, assembled into a numbered context block with its sources.

Access control is the choice of Chroma collections to query (one per BreezeWeb
collection), never a metadata filter: a collection the user cannot read is not
even queried, and an unreadable id passed in is dropped without a word, so the
answer never reveals that it exists.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass

import numpy as np

from rag import store
from rag.embeddings import get_embedder
from rag.models import Collection, Document

SNIPPET_CHARS = 300
DEDUP_JACCARD = 0.85  # word-set overlap above which two chunks say the same thing
OVERFETCH = 2  # query extra hits per collection so de-duplication leaves k


@dataclass(frozen=True)
class Source:
    """One cited chunk. `page` is 1-based (None for formats without pages)."""

    document_id: int
    title: str
    page: int | None
    snippet: str
    score: float
    collection_id: int

    def as_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class RetrievedContext:
    """`text` is the block to put in the prompt ("[1] title, p. 3: ..."), within
    the token budget; `sources[i]` is the chunk numbered `[i + 1]` in it."""

    text: str
    sources: tuple[Source, ...]

    def __bool__(self) -> bool:
        return bool(self.sources)


@dataclass(frozen=True)
class _Candidate:
    text: str
    score: float
    document_id: int
    page: int | None
    collection_id: int
    words: frozenset[str]


def _default_count_tokens(text: str) -> int:
    return len(text) // 4


def _words(text: str) -> frozenset[str]:
    return frozenset(re.findall(r"\w+", text.lower()))


def _near_duplicate(a: frozenset[str], b: frozenset[str]) -> bool:
    if not a or not b:
        return a == b
    return len(a & b) / len(a | b) >= DEDUP_JACCARD


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


def search(
    collections: list[Collection], query_vector: np.ndarray, *, k: int | None = None
) -> list[_Candidate]:
    """Ranked, de-duplicated candidates from `collections` (already access-checked)."""
    candidates: list[_Candidate] = []
    for coll in collections:
        wanted = k or coll.top_k
        for hit in store.query(coll.chroma_name, query_vector, wanted * OVERFETCH):
            if hit.score < coll.score_floor:
                continue
            meta = hit.metadata
            page = meta.get("page")
            candidates.append(
                _Candidate(
                    text=hit.text,
                    score=hit.score,
                    document_id=int(meta.get("document_id", 0)),
                    page=int(page) if page is not None else None,
                    collection_id=coll.pk,
                    words=_words(hit.text),
                )
            )
    candidates.sort(key=lambda c: c.score, reverse=True)
    limit = k or max((c.top_k for c in collections), default=5)
    kept: list[_Candidate] = []
    for candidate in candidates:
        if any(_near_duplicate(candidate.words, other.words) for other in kept):
            continue
        kept.append(candidate)
        if len(kept) >= limit:
            break
    return kept


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
) -> RetrievedContext:
    """The context for answering `query` from documents `user` may read.

    Synchronous and blocking (embeds the query, queries Chroma): call it from a
    thread, e.g. `await sync_to_async(retrieve)(...)`. `collection_ids` limits
    the search (ids the user may not read are silently dropped); `k` overrides
    each collection's top_k; the context text fits `budget_tokens` as measured
    by `count_tokens` (default: characters / 4)."""
    query = (query or "").strip()
    collections = readable_collections(user, collection_ids)
    if not query or not collections:
        return RetrievedContext("", ())
    vector = get_embedder().embed([query])[0]
    return assemble(search(collections, vector, k=k), budget_tokens, count_tokens)


def assemble(
    candidates: list[_Candidate],
    budget_tokens: int,
    count_tokens: Callable[[str], int] | None = None,
) -> RetrievedContext:
    """Number the candidates into a context block that fits the budget."""
    count = count_tokens or _default_count_tokens
    titles = dict(
        Document.objects.filter(pk__in={c.document_id for c in candidates})
        .exclude(status=Document.Status.FAILED)
        .values_list("pk", "title")
    )
    blocks: list[str] = []
    sources: list[Source] = []
    used = 0
    for candidate in candidates:
        title = titles.get(candidate.document_id)
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
                score=round(candidate.score, 4),
                collection_id=candidate.collection_id,
            )
        )
    return RetrievedContext("\n".join(blocks), tuple(sources))
