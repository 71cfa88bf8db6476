from django.apps import AppConfig


class ChatConfig(AppConfig):
    name = "chat"
    verbose_name = "Chat"
    default_auto_field = "django.db.models.BigAutoField"

    def ready(self) -> None:
        from django.db.models.signals import post_migrate

        from chat import search
        from chat.models import Message

        # After every `migrate`: the search index and its triggers exist.
        receiver = search.INDEX.after_migrate(Message._meta.db_table)
        post_migrate.connect(receiver, sender=self, weak=False, dispatch_uid="chat-fts")
