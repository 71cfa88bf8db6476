"""Full-text search over what was said (chat.search, GET /api/conversations?q=):
ranked, with snippets and the message to open, in step with saves, edits and
deletes, and never across users. Marked `scaleout`: the same tests run on
PostgreSQL (tsvector + GIN) in the second pass, on SQLite (FTS5) in the first."""

from __future__ import annotations

from django.db import connection

import pytest

from chat import search, services
from chat.models import Conversation, Message
from chat.search import MARK_END, MARK_START, split_marks

pytestmark = [pytest.mark.django_db, pytest.mark.scaleout]


def chat(owner, title: str, *texts: str) -> Conversation:
    conversation = Conversation.objects.create(owner=owner, title=title)
    for i, text in enumerate(texts):
        Message.objects.create(
            conversation=conversation, role="user" if i % 2 == 0 else "assistant", content=text
        )
    return conversation


def found(user, query: str) -> list[dict]:
    return services.list_conversations(user, query=query)


def marked(item: dict) -> list[str]:
    match = item["match"]
    return [match["snippet"][start:end] for start, end in match["highlights"]]


def test_the_best_match_ranks_first_with_the_message_and_a_highlighted_snippet(user):
    passing = chat(
        user,
        "Garden",
        "How deep should I plant tulip bulbs?",
        "About 15 cm. The rest of this answer talks about watering and soil, "
        "compost, mulch, frost, sunlight, spacing, squirrels and other garden worries.",
    )
    focused = chat(
        user,
        "Bulbs",
        "Tell me about tulip colours.",
        "Tulips come in many colours; tulip breeders love red tulips.",
    )
    chat(user, "Unrelated", "What is the capital of Portugal?", "Lisbon.")
    results = found(user, "tulips")
    assert [r["id"] for r in results] == [focused.pk, passing.pk]
    best = results[0]["match"]
    answer = focused.messages.get(role="assistant")
    assert best["message_id"] == answer.pk
    assert best["score"] > results[1]["match"]["score"]
    # Stemmed: "tulips" finds "tulip" and "Tulips", each one highlighted.
    assert {word.lower() for word in marked(results[0])} <= {"tulip", "tulips"}
    assert marked(results[0])
    assert "breeders" in best["snippet"]
    assert MARK_START not in best["snippet"] and MARK_END not in best["snippet"]


def test_every_word_must_match_and_the_last_may_be_a_prefix(user):
    both = chat(user, "a", "The python interpreter prints a traceback.")
    chat(user, "b", "A python is a snake.")
    assert [r["id"] for r in found(user, "python traceback")] == [both.pk]
    assert [r["id"] for r in found(user, "python trace")] == [both.pk]  # still typing
    assert {r["id"] for r in found(user, "pyth")} == {both.pk, both.pk + 1}


def test_titles_are_searched_too(user):
    titled = chat(user, "Quarterly budget review", "hello", "hi there")
    results = found(user, "budget")
    assert [r["id"] for r in results] == [titled.pk]
    assert results[0]["match"]["message_id"] is None
    assert marked(results[0]) == ["budget"]


def test_the_index_follows_saves_streaming_edits_and_deletes(user):
    conversation = chat(user, "Notes", "first question")
    assert found(user, "aubergine") == []
    # An answer being streamed is saved every ~0.5 s: searchable as it grows.
    answer = Message.objects.create(conversation=conversation, role="assistant", status="streaming")
    services.flush_contents({answer.pk: "Roast the aubergine"})
    assert found(user, "aubergine")[0]["match"]["message_id"] == answer.pk
    # An edit (begin_edit saves the new text; a rename changes the title).
    question = conversation.messages.get(role="user")
    question.content = "what about courgettes?"
    question.save()
    assert found(user, "courgettes")[0]["match"]["message_id"] == question.pk
    assert found(user, "first question") == []
    services.rename_conversation(user, conversation.pk, "Vegetable planning")
    assert found(user, "notes") == []
    assert found(user, "vegetable")[0]["id"] == conversation.pk
    # Deleting a message, then the conversation, takes their words out.
    answer.delete()
    assert found(user, "aubergine") == []
    services.delete_conversation(user, conversation.pk)
    assert found(user, "courgettes") == found(user, "vegetable") == []


def test_one_users_search_never_sees_anothers_words(user, other_user):
    chat(other_user, "Bob's secret plan", "the password is swordfish")
    mine = chat(user, "Mine", "I like swordfish steaks")
    assert [r["id"] for r in found(user, "swordfish")] == [mine.pk]
    assert found(user, "password") == found(user, "secret plan") == []
    # Straight at the engine too, not only through the service's filtering.
    hits = search.search(user.pk, "password swordfish")
    assert hits == []


@pytest.mark.parametrize(
    "query",
    [
        '"',
        "NEAR(a b)",
        "a OR b AND NOT c",
        "owner:u1",
        "*",
        "text: secret",
        "'); DROP TABLE breezeweb_message; --",
        "swordfish:*",
        "\\",
        "ü" * 200,
        "x" * 5000,
    ],
)
def test_query_syntax_in_the_users_text_is_only_words(user, other_user, query):
    chat(other_user, "Other", "secret swordfish u1 owner text")
    assert found(user, query) == []


def test_a_query_of_stop_words_falls_back_to_titles(user):
    titled = chat(user, "What is it", "something")
    chat(user, "Else", "what is it")
    assert [r["id"] for r in found(user, "what is")] == [titled.pk]


@pytest.mark.django_db(transaction=True)  # PostgreSQL alters no table with pending FK checks
def test_rows_written_before_the_index_are_indexed_when_it_is_installed(user):
    search.uninstall(connection)
    try:
        old = chat(user, "Old", "a message about zeppelins")
    finally:
        search.install(connection)
    assert [r["id"] for r in found(user, "zeppelin")] == [old.pk]


def test_split_marks_gives_plain_text_and_ranges():
    text, ranges = split_marks(f"a {MARK_START}big{MARK_END} cat{MARK_START}{MARK_END}")
    assert text == "a big cat"
    assert ranges == ((2, 5),)


def test_the_api_searches_and_answers_matches(client, user, other_user):
    chat(other_user, "Theirs", "orchids everywhere")
    mine = chat(user, "Mine", "Water orchids weekly")
    client.force_login(user)
    body = client.get("/api/conversations", {"q": "orchid"}).json()
    assert [c["id"] for c in body["conversations"]] == [mine.pk]
    match = body["conversations"][0]["match"]
    assert match["message_id"] == mine.messages.get().pk
    assert match["snippet"] == "Water orchids weekly"
    assert match["highlights"] == [[6, 13]]
    listed = client.get("/api/conversations").json()["conversations"]
    assert "match" not in listed[0]
