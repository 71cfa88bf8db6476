"""`python manage.py reindex`: re-index documents whose vectors would change
(indexed before hybrid search, with an older chunk format or other embedding
weights), here with a progress bar, or in the workers in channels mode.

The web server does the same by itself when its worker starts; this command is
for doing it now and watching it. `--all` re-indexes every ready document."""

from __future__ import annotations

from django.core.management.base import BaseCommand, CommandError

from rag import store, worker
from rag.ingestion import ingest_document
from rag.models import Document


class Command(BaseCommand):
    help = "Re-index documents whose vectors would change (or --all ready documents)."

    def add_arguments(self, parser):
        parser.add_argument("--all", action="store_true", help="Every ready document.")
        parser.add_argument("--dry-run", action="store_true", help="Only count them.")

    def handle(self, *args, all=False, dry_run=False, **options):
        chosen = (
            Document.objects.filter(status=Document.Status.READY)
            if all
            else worker.outdated_documents()
        )
        ids = list(chosen.order_by("created_at", "pk").values_list("pk", flat=True))
        if dry_run or not ids:
            self.stdout.write(f"{len(ids)} document(s) to re-index.")
            return
        if worker.mode() == "channels":
            for document in Document.objects.filter(pk__in=ids):
                worker.requeue(document)
            self.stdout.write(f"Sent {len(ids)} document(s) to the `ingest` channel.")
            return
        try:
            store.get_client()
        except store.StoreLocked as exc:
            raise CommandError(str(exc)) from None
        from tqdm import tqdm

        failed = 0
        bar = tqdm(total=len(ids), unit="doc", desc="Re-indexing", ncols=80)
        for document_id in ids:
            # Back to queued without dispatching: this process runs it.
            Document.objects.filter(pk=document_id, status=Document.Status.READY).update(
                status=Document.Status.QUEUED, progress=0.0, ingest_token="", attempts=0
            )
            result = ingest_document(document_id)
            failed += result.status == "failed"
            bar.update(1)
        bar.close()
        self.stdout.write(f"Re-indexed {len(ids) - failed} document(s); {failed} failed.")
