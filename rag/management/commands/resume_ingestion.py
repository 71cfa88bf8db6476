"""`python manage.py resume_ingestion`: re-queue documents left queued or
processing by a stopped process.

In-process mode (no Redis) the web server resumes by itself on first use; this
command runs the jobs right here and waits. In channels mode it hands them to
the `runworker ingest` processes."""

from django.core.management.base import BaseCommand

from rag import worker


class Command(BaseCommand):
    help = "Re-queue unfinished document ingestion (queued/processing documents)."

    def handle(self, *args, **options):
        ids = worker.resume_unfinished(force=True)
        if worker.mode() == "channels":
            self.stdout.write(f"Sent {len(ids)} document(s) to the `ingest` channel.")
            return
        self.stdout.write(f"Ingesting {len(ids)} unfinished document(s) here...")
        worker.wait_until_idle(timeout=24 * 3600)
        self.stdout.write("Done.")
