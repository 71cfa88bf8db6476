from django.apps import AppConfig


class ChatConfig(AppConfig):
    name = "chat"
    verbose_name = "Chat"
    default_auto_field = "django.db.models.BigAutoField"

    def ready(self) -> None:
        from django.db.models.signals import post_migrate

        post_migrate.connect(_ensure_search_index, sender=self, dispatch_uid="chat-fts")


def _ensure_search_index(sender, using="default", plan=None, **kwargs) -> None:
    """After every `migrate`: the search index and its triggers exist (SQLite
    drops a table's triggers when a migration rebuilds the table)."""
    from django.db import connections

    from chat import search
    from chat.models import Message

    conn = connections[using]
    if Message._meta.db_table in conn.introspection.table_names():
        search.install(conn)
