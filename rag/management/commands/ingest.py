"""`python manage.py ingest PATH... [--collection ID | --user NAME]`: add files
or folders (recursively) to a collection and index them here, with a progress
bar and a summary."""

from __future__ import annotations

import time
from pathlib import Path

from django.contrib.auth import get_user_model
from django.core.management.base import BaseCommand, CommandError

from tqdm import tqdm

from rag import store, worker
from rag.ingestion import ingest_document
from rag.models import Collection, Document
from rag.parsing import EXTENSIONS
from rag.uploads import UploadRejected, add_document, stage_path


def _files(paths: list[str]) -> list[Path]:
    found: list[Path] = []
    for raw in paths:
        path = Path(raw)
        if path.is_dir():
            found.extend(
                p
                for p in sorted(path.rglob("*"))
                if p.is_file()
                and not any(part.startswith(".") for part in p.relative_to(path).parts)
                and p.suffix.lower() in EXTENSIONS
            )
        elif path.is_file():
            found.append(path)
        else:
            raise CommandError(f"{raw}: no such file or folder")
    return found


class Command(BaseCommand):
    help = "Index files or folders into a document collection."

    def add_arguments(self, parser):
        parser.add_argument("paths", nargs="+", metavar="PATH")
        parser.add_argument("--collection", type=int, help="Collection id (default: personal)")
        parser.add_argument("--user", help="Owner of the documents (username)")
        parser.add_argument(
            "--queue",
            action="store_true",
            help="Only queue them for the workers (runworker ingest) instead of indexing here.",
        )

    def handle(self, *args, paths, collection=None, user=None, queue=False, **options):
        if queue and worker.mode() != "channels":
            raise CommandError("--queue hands jobs to `runworker ingest`: it needs REDIS_URL")
        if not queue:
            # Indexing here opens the vector store: refuse before adding
            # anything when another process (the server) has the embedded one.
            try:
                store.get_client()
            except store.StoreLocked as exc:
                raise CommandError(f"{exc}, or pass --queue with REDIS_URL set") from None
        owner, target = self._target(collection, user)
        files = _files(paths)
        if not files:
            raise CommandError("no supported files found (.txt .md .pdf .html .docx)")
        started = time.perf_counter()
        added: list[Document] = []
        problems: list[tuple[str, str]] = []
        duplicates: list[tuple[str, str]] = []
        for path in files:
            try:
                staged = stage_path(path)
                added.append(add_document(owner, target, staged, dispatch=queue))
            except UploadRejected as exc:
                kind = duplicates if exc.code == "duplicate" else problems
                kind.append((str(path), exc.message))
            except OSError as exc:
                problems.append((str(path), f"cannot read: {exc.strerror or exc}"))

        if queue:
            self.stdout.write(f"Queued {len(added)} document(s) in “{target.name}”.")
        else:
            self._index_here(added, problems)
        mine = Document.objects.filter(pk__in=[d.pk for d in added])
        chunks = sum(mine.values_list("chunk_count", flat=True))
        ready = mine.filter(status=Document.Status.READY).count()
        elapsed = time.perf_counter() - started
        self.stdout.write(
            self.style.SUCCESS(
                f"{ready} of {len(files)} file(s) indexed into “{target.name}” "
                f"(collection {target.pk}): {chunks} chunks in {elapsed:.1f} s; "
                f"{len(duplicates)} duplicate(s), {len(problems)} failed."
            )
        )
        for name, message in duplicates:
            self.stdout.write(f"  duplicate  {name}: {message}")
        for name, message in problems:
            self.stdout.write(self.style.WARNING(f"  failed     {name}: {message}"))

    def _target(self, collection_id: int | None, username: str | None):
        users = get_user_model().objects
        owner = None
        if username:
            owner = users.filter(username=username).first()
            if owner is None:
                raise CommandError(f"no user named {username!r}")
        if collection_id is not None:
            target = Collection.objects.filter(pk=collection_id).first()
            if target is None:
                raise CommandError(f"no collection {collection_id}")
            if owner is None:
                owner = target.owner or users.filter(is_superuser=True).order_by("pk").first()
            if owner is None:
                raise CommandError("a shared collection needs --user NAME (the uploader)")
            if not target.writable_by(owner):
                raise CommandError(f"{owner.get_username()} may not add to “{target.name}”")
            return owner, target
        if owner is None:
            raise CommandError("give --collection ID or --user NAME")
        return owner, Collection.personal_for(owner)

    def _index_here(self, added: list[Document], problems: list[tuple[str, str]]) -> None:
        bar = tqdm(total=len(added), unit="doc", desc="Indexing", disable=not added)
        for document in added:
            bar.set_postfix_str(document.title[:40])

            def progress(doc, done, total, bar=bar):
                bar.set_postfix_str(f"{doc.title[:30]} {done}/{total} chunks")

            result = ingest_document(document.pk, on_progress=progress)
            if result.status == "failed":
                problems.append((document.title, result.error))
            bar.update(1)
        bar.close()
        # A Chroma collection found lost meanwhile queues its documents again
        # on this process's worker thread: let them finish before exiting.
        worker.wait_until_idle(timeout=24 * 3600)
