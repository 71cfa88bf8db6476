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


def test_a_project_search_ranks_within_the_project_not_within_the_users_best(user):
    """The project is a condition of the ranked query: a weak match inside the
    project is found even when more than a page of the user's other chats
    match better."""
    project = services.save_project(user, None, {"name": "Garden"})
    for i in range(search.CANDIDATES // 5 + 60):
        chat(user, f"Other {i}", "tulip tulip tulips, tulip " * 3)
    inside = chat(
        user,
        "Planting",
        "Bulbs: " + " ".join(f"word{i}" for i in range(80)) + " and one tulip.",
    )
    services.update_conversation(user, inside.pk, {"project_id": project["id"]})
    everywhere = found(user, "tulip")
    assert len(everywhere) == 50 and inside.pk not in [r["id"] for r in everywhere]
    in_project = services.list_conversations(user, query="tulip", project_id=project["id"])
    assert [r["id"] for r in in_project] == [inside.pk]
    assert marked(in_project[0]) == ["tulip"]
    hits = search.search(user.pk, "tulip", project_id=project["id"])
    assert [h.conversation_id for h in hits] == [inside.pk]
    # Titles too, and another project's chats stay out.
    titled = chat(user, "Tulip calendar", "when?")
    assert [
        r["id"] for r in services.list_conversations(user, query="tulip", project_id=project["id"])
    ] == [inside.pk]
    services.update_conversation(user, titled.pk, {"project_id": project["id"]})
    assert {
        r["id"] for r in services.list_conversations(user, query="tulip", project_id=project["id"])
    } == {inside.pk, titled.pk}


def test_a_real_edit_keeps_both_texts_findable_and_a_hit_can_be_on_another_branch(user):
    start = services.begin_message(user, conversation_id=None, text="How do I prune roses?")
    services.finish_message(start.assistant_message_id, _outcome("Cut above an outward bud."))
    edit = services.begin_edit(
        user,
        conversation_id=start.conversation_id,
        message_id=start.user_message_id,
        text="How do I prune hydrangeas?",
    )
    services.finish_message(edit.assistant_message_id, _outcome("Wait until spring."))
    # The edit is a new message beside the original: both are searchable.
    new = found(user, "hydrangeas")
    assert [r["match"]["message_id"] for r in new] == [edit.user_message_id]
    old = found(user, "roses")
    assert [r["match"]["message_id"] for r in old] == [start.user_message_id]
    # The old text is on the branch that is no longer shown ...
    shown = services.conversation_messages(user, start.conversation_id)["messages"]
    assert start.user_message_id not in [m["id"] for m in shown]
    assert found(user, "outward")[0]["match"]["message_id"] == start.assistant_message_id
    # ... and opening the hit (the page's PATCH) shows its branch, answer included.
    services.update_conversation(
        user, start.conversation_id, {"active_message_id": old[0]["match"]["message_id"]}
    )
    shown = services.conversation_messages(user, start.conversation_id)["messages"]
    assert [m["id"] for m in shown] == [start.user_message_id, start.assistant_message_id]


def _outcome(text: str) -> services.TurnOutcome:
    return services.TurnOutcome(content=text, status="complete")


def test_the_index_definitions_are_the_ones_installed(db):
    """install() compares each FTS5 table and trigger with its definition and
    makes a changed one again (re-indexing every row); the definitions as
    installed must read back identical, or every `migrate` would re-index."""
    if connection.vendor != "sqlite":
        pytest.skip("the FTS5 schema is SQLite's")
    from rag import lexical

    with connection.cursor() as cursor:
        cursor.execute("SELECT name, sql FROM sqlite_master")
        installed = dict(cursor.fetchall())
    for index in (search.INDEX, lexical.INDEX):
        for statement in index.sqlite_schema:
            name = statement.split("IF NOT EXISTS ", 1)[1].split()[0]
            assert installed[name] == statement.replace(" IF NOT EXISTS", "", 1)


@pytest.mark.django_db(transaction=True)
def test_an_index_of_an_older_definition_is_made_again_with_its_rows(user, other_user):
    """A database indexed before the owner column (the message index matched
    every user's words) takes the new definition at its next migrate."""
    if connection.vendor != "sqlite":
        pytest.skip("the FTS5 schema is SQLite's")
    search.uninstall(connection)
    try:
        with connection.cursor() as cursor:
            cursor.execute("CREATE VIRTUAL TABLE chat_message_fts USING fts5(conv UNINDEXED, text)")
            cursor.execute(
                "CREATE TRIGGER chat_message_fts_insert AFTER INSERT ON breezeweb_message "
                "BEGIN INSERT INTO chat_message_fts(rowid, conv, text) "
                "VALUES (new.id, new.conversation_id, new.content); END"
            )
        mine = chat(user, "Mine", "a message about zeppelins")
        chat(other_user, "Theirs", "zeppelins too")
    finally:
        search.install(connection)
    assert [r["id"] for r in found(user, "zeppelin")] == [mine.pk]
    later = chat(user, "Later", "more zeppelins")
    assert {r["id"] for r in found(user, "zeppelin")} == {mine.pk, later.pk}
