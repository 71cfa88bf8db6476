from django.apps import AppConfig


class RagConfig(AppConfig):
    name = "rag"
    verbose_name = "Documents (RAG)"
    default_auto_field = "django.db.models.BigAutoField"

    def ready(self) -> None:
        # Signals only: no database queries here (resuming ingestion happens
        # on the worker's first use, see rag.worker).
        from django.db.models.signals import post_delete, post_migrate

        from rag import lexical, store, worker
        from rag.models import Chunk, Collection, Document

        # A Chroma collection found missing (or recreated empty) is rebuilt
        # from the database's record of its documents.
        if worker.rebuild_collection not in store.on_collection_lost:
            store.on_collection_lost.append(worker.rebuild_collection)
        post_delete.connect(_drop_chroma_collection, sender=Collection, dispatch_uid="rag-drop")
        post_delete.connect(_remove_file, sender=Document, dispatch_uid="rag-remove-file")
        # After every `migrate`: the keyword index and its triggers exist.
        receiver = lexical.INDEX.after_migrate(Chunk._meta.db_table)
        post_migrate.connect(receiver, sender=self, weak=False, dispatch_uid="rag-fts")


def _drop_chroma_collection(sender, instance, **kwargs) -> None:
    """A deleted collection takes its Chroma collection (every chunk) with it."""
    import logging

    from rag import store, topk

    topk.forget(instance.pk)
    try:
        store.drop_collection(instance.chroma_name)
    except Exception as exc:
        logging.getLogger(__name__).warning(
            "could not drop Chroma collection %s (%s)", instance.chroma_name, exc
        )


def _remove_file(sender, instance, **kwargs) -> None:
    """Deleting a document row (directly or by cascade) removes its stored file
    once the deletion is committed."""
    from django.db import transaction

    name, storage = instance.file.name, instance.file.storage
    if name:
        transaction.on_commit(lambda: storage.exists(name) and storage.delete(name))
