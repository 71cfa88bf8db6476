"""The top-k keyword index in memory (rag.topk) is a cache that is used only
while it is exactly current: the generation table its triggers keep, a build
in the background, and what a query sees meanwhile. (The retrieval behaviour
itself is checked through it in test_hybrid.py, `keyword_index` = topk.)"""

from __future__ import annotations

import time

from django.db import connection

import pytest

from rag import lexical, topk
from rag.models import Chunk, Collection
from rag.uploads import delete_document
from tests.rag.test_hybrid import LIGHTHOUSE, MANUAL
from tests.support import documents as docs
from tests.support.documents import add_and_ingest

pytestmark = pytest.mark.django_db(transaction=True)


@pytest.fixture(autouse=True)
def _clean(settings):
    settings.RAG_INGEST_WORKER = "thread"
    topk.forget()
    yield
    topk.wait_for_builds()
    topk.forget()
    docs.drop_all_chroma_collections()


def _state(collection) -> tuple[int, int]:
    with connection.cursor() as cursor:
        return topk._state(cursor, collection.pk)


def test_the_generation_table_counts_chunks_and_moves_with_every_change(user):
    manual = add_and_ingest(user, "manual.md", MANUAL.encode())
    add_and_ingest(user, "aldermoor.md", LIGHTHOUSE.encode())
    collection = Collection.personal_for(user)
    generation, count = _state(collection)
    assert count == Chunk.objects.filter(collection=collection).count() > 0
    delete_document(manual)
    after, count = _state(collection)
    assert after > generation
    assert count == Chunk.objects.filter(collection=collection).count()
    # Triggers gone (a migration rebuilt the table): installing counts again.
    lexical.uninstall(connection)
    lexical.install(connection)
    recounted, count = _state(collection)
    assert count == Chunk.objects.filter(collection=collection).count()
    assert recounted != after


def test_a_large_collection_is_indexed_in_the_background_and_used_once_current(
    user, settings, monkeypatch
):
    settings.RAG_TOPK_MIN_CHUNKS = 2
    monkeypatch.setattr(topk, "SETTLE_SECONDS", 0)
    add_and_ingest(user, "manual.md", MANUAL.encode())
    collection = Collection.personal_for(user)
    before = topk.answered
    # No index yet: FTS5 answers, and a build starts.
    first = lexical.search(collection.pk, "E-41072", 3)
    assert "E-41072" in first[0].text and topk.answered == before
    topk.wait_for_builds()
    second = lexical.search(collection.pk, "E-41072", 3)
    assert topk.answered == before + 1
    assert second[0].chunk_pk == first[0].chunk_pk
    # A new document changes the generation: FTS5 answers (with it) until rebuilt.
    add_and_ingest(user, "aldermoor.md", LIGHTHOUSE.encode())
    assert "Thomas Vell" in lexical.search(collection.pk, "Vell", 1)[0].text
    assert topk.answered == before + 1
    topk.wait_for_builds()
    assert "Thomas Vell" in lexical.search(collection.pk, "Vell", 1)[0].text
    assert topk.answered == before + 2


def test_small_collections_and_a_zero_setting_use_fts5_alone(user, settings):
    add_and_ingest(user, "aldermoor.md", LIGHTHOUSE.encode())
    collection = Collection.personal_for(user)
    for minimum in (10_000, 0):
        settings.RAG_TOPK_MIN_CHUNKS = minimum
        assert lexical.search(collection.pk, "Vell", 1)
        topk.wait_for_builds()
        assert collection.pk not in topk._indexes


def test_a_build_waits_until_the_collection_stops_changing(user, settings, monkeypatch):
    settings.RAG_TOPK_MIN_CHUNKS = 2
    monkeypatch.setattr(topk, "SETTLE_SECONDS", 0.5)
    add_and_ingest(user, "manual.md", MANUAL.encode())
    collection = Collection.personal_for(user)
    lexical.search(collection.pk, "E-41072", 3)  # first seen: no build yet
    topk.wait_for_builds()
    assert collection.pk not in topk._indexes
    time.sleep(0.6)
    lexical.search(collection.pk, "E-41072", 3)  # unchanged for long enough
    topk.wait_for_builds()
    assert collection.pk in topk._indexes
    # Below the threshold (documents deleted, or the setting raised): dropped.
    settings.RAG_TOPK_MIN_CHUNKS = 10_000
    add_and_ingest(user, "aldermoor.md", LIGHTHOUSE.encode())
    lexical.search(collection.pk, "Vell", 1)
    assert collection.pk not in topk._indexes
    # A deleted collection's index goes with it.
    settings.RAG_TOPK_MIN_CHUNKS = 2
    monkeypatch.setattr(topk, "SETTLE_SECONDS", 0)
    lexical.search(collection.pk, "Vell", 1)
    topk.wait_for_builds()
    assert collection.pk in topk._indexes
    collection.delete()
    assert collection.pk not in topk._indexes
