"""Existing databases migrate forward with their data: a database built at the
migrations from before the app split (conversations, messages and API keys in
the `breezeweb` app), filled, then migrated, keeps every row and every link."""

from __future__ import annotations

from django.db import connection
from django.db.migrations.executor import MigrationExecutor

import pytest

from accounts.models import ApiKey
from chat.models import Conversation, Message
from runners.models import RunRecord

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.scaleout]

# The migration state before Conversation, Message and ApiKey left `breezeweb`:
# the new apps at zero, runners before its FK moved (breezeweb 0003 goes with them).
BEFORE_SPLIT = [("chat", None), ("accounts", None), ("runners", "0001_initial")]
OLD_STATE = [("breezeweb", "0002_initial")]
TABLES = (
    "breezeweb_conversation",
    "breezeweb_conversation_collections",
    "breezeweb_message",
    "breezeweb_apikey",
    "runners_runrecord",
)


def _columns(table: str) -> list[str]:
    with connection.cursor() as cursor:
        return [c.name for c in connection.introspection.get_table_description(cursor, table)]


def _rows(table: str, columns: list[str]) -> list[tuple]:
    """The rows' values in `columns` (those the table had before: later
    migrations may add columns, never change what was there)."""
    names = ", ".join(connection.ops.quote_name(c) for c in columns)
    with connection.cursor() as cursor:
        cursor.execute(f"SELECT {names} FROM {connection.ops.quote_name(table)} ORDER BY id")
        return [tuple(row) for row in cursor.fetchall()]


def _migrate(targets) -> MigrationExecutor:
    executor = MigrationExecutor(connection)
    executor.loader.build_graph()
    executor.migrate(targets)
    return executor


def _fill(apps) -> None:
    User = apps.get_model("auth", "User")
    Collection = apps.get_model("rag", "Collection")
    RunnerConfig = apps.get_model("runners", "RunnerConfig")
    Conversation = apps.get_model("breezeweb", "Conversation")
    Message = apps.get_model("breezeweb", "Message")
    ApiKey = apps.get_model("breezeweb", "ApiKey")
    RunRecord = apps.get_model("runners", "RunRecord")

    owner = User.objects.create(username="carol")
    collection = Collection.objects.create(name="handbook", owner=owner)
    runner = RunnerConfig.objects.create(name="local-old", kind="executorch", model_id="m")
    conversation = Conversation.objects.create(
        owner=owner, title="Before the split", pinned_runner=runner, rag_enabled=True
    )
    conversation.collections.add(collection)
    question = Message.objects.create(conversation=conversation, role="user", content="Hi?")
    answer = Message.objects.create(
        conversation=conversation,
        role="assistant",
        content="Hello.",
        runner_name="local-old",
        prompt_tokens=3,
        completion_tokens=2,
        sources=[{"title": "handbook.md", "page": 1}],
    )
    ApiKey.objects.create(user=owner, name="ci", prefix="bw_abc", key_hash="0" * 64)
    RunRecord.objects.create(runner=runner, message=answer, status="ok", runner_name="local-old")
    assert question.pk < answer.pk


def test_rows_written_before_the_app_split_survive_the_migration(django_user_model):
    executor = _migrate(BEFORE_SPLIT)
    old_apps = executor.loader.project_state(OLD_STATE).apps
    _fill(old_apps)
    columns = {table: _columns(table) for table in TABLES}
    before = {table: _rows(table, columns[table]) for table in TABLES}
    assert all(before[table] for table in TABLES)

    executor = _migrate(MigrationExecutor(connection).loader.graph.leaf_nodes())

    assert {table: _rows(table, columns[table]) for table in TABLES} == before
    conversation = Conversation.objects.get(title="Before the split")
    assert conversation.owner.username == "carol"
    assert conversation.pinned_runner.name == "local-old"
    assert [c.name for c in conversation.collections.all()] == ["handbook"]
    assert [m.content for m in conversation.messages.all()] == ["Hi?", "Hello."]
    answer = Message.objects.get(role="assistant")
    assert answer.sources == [{"title": "handbook.md", "page": 1}]
    assert RunRecord.objects.get().message == answer
    assert ApiKey.objects.get().user == conversation.owner
    assert not executor.loader.detect_conflicts()
    # Linear conversations became one branch each (chat 0004): every message
    # follows the one before it, and the last ends the active path.
    question = Message.objects.get(role="user")
    assert (question.parent_id, answer.parent_id) == (None, question.pk)
    assert conversation.active_leaf_id == answer.pk
    # Rows written before the search index are found by it (chat 0002 indexed them).
    from chat import services

    found = services.list_conversations(conversation.owner, query="hello")
    assert [c["match"]["message_id"] for c in found] == [answer.pk]


def test_content_types_follow_the_moved_models():
    from django.contrib.contenttypes.models import ContentType

    executor = _migrate(BEFORE_SPLIT)
    ContentType.objects.filter(app_label__in=["chat", "accounts"]).delete()
    for model in ("conversation", "message", "apikey"):
        ContentType.objects.get_or_create(app_label="breezeweb", model=model)
    old_ids = dict(ContentType.objects.filter(app_label="breezeweb").values_list("model", "pk"))

    _migrate(executor.loader.graph.leaf_nodes())

    ContentType.objects.clear_cache()
    assert ContentType.objects.get_for_model(Conversation).pk == old_ids["conversation"]
    assert ContentType.objects.get_for_model(Message).pk == old_ids["message"]
    assert ContentType.objects.get_for_model(ApiKey).pk == old_ids["apikey"]
