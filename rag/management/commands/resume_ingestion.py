"""`python manage.py resume_ingestion`: re-queue documents left queued or
processing by a stopped process.

In-process mode (no Redis) the web server resumes by itself on first use; this
command runs the jobs right here and waits. In channels mode it hands them to
the `runworker ingest` processes."""

from django.core.management.base import BaseCommand, CommandError

from rag import store, worker


class Command(BaseCommand):
    help = "Re-queue unfinished document ingestion (queued/processing documents)."

    def handle(self, *args, **options):
        if worker.mode() == "thread":
            # The jobs run here: refuse while another process (the server) has
            # the embedded vector store; that server resumes them itself.
            try:
                store.get_client()
            except store.StoreLocked as exc:
                raise CommandError(str(exc)) from None
        ids = worker.resume_unfinished(force=True)
        if worker.mode() == "channels":
            self.stdout.write(f"Sent {len(ids)} document(s) to the `ingest` channel.")
            return
        self.stdout.write(f"Ingesting {len(ids)} unfinished document(s) here...")
        worker.wait_until_idle(timeout=24 * 3600)
        self.stdout.write("Done.")
