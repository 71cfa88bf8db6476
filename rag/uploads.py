"""Storing uploaded files and the document life cycle (add, delete, re-ingest).

A file is streamed to a staging file under MEDIA_ROOT/tmp while its sha256 is
computed and its size checked against UPLOAD_MAX_BYTES (the bytes past the
limit are never written), then its type is checked from its content, then it
is moved (a rename, no copy) to `documents/<collection>/<sha256>` and queued.
"""

from __future__ import annotations

import hashlib
import os
import re
import tempfile
import unicodedata
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from django.conf import settings
from django.db import IntegrityError, transaction

from rag import store, worker
from rag.models import Collection, Document
from rag.parsing import MIME_TYPES, FileRejected, sniff

# Control characters (C0, DEL, C1), line/paragraph separators, bidi overrides
# (which make "exe.txt" display as "txt.exe"), lone surrogates, and the
# characters Windows refuses in names.
_UNSAFE = re.compile(
    r"[\x00-\x1f\x7f-\x9f\u2028\u2029\u202a-\u202e\u2066-\u2069\ud800-\udfff<>:\"|?*]+"
)
MAX_NAME_CHARS = 200


# An upload that cannot be stored: the same refusal as a file that cannot be indexed.
UploadRejected = FileRejected


@dataclass(frozen=True)
class StagedFile:
    """An upload written to disk and hashed, not yet a document."""

    path: Path
    name: str
    size: int
    sha256: str

    def discard(self) -> None:
        self.path.unlink(missing_ok=True)


def max_upload_mb() -> str:
    mb = settings.UPLOAD_MAX_BYTES / (1024 * 1024)
    return f"{mb:g}" if mb >= 1 else f"{mb:.2f}"


def too_large(name: str) -> UploadRejected:
    return UploadRejected(
        "file_too_large",
        f"{name} is larger than the upload limit of {max_upload_mb()} MB",
        status=413,
        limit_bytes=settings.UPLOAD_MAX_BYTES,
    )


def sanitize_filename(raw: str) -> str:
    """A display name safe anywhere: no directories (`../`, `C:\\`), no control
    characters, no leading dots, at most MAX_NAME_CHARS characters with the
    extension kept: a longer name is shortened, never refused."""
    name = unicodedata.normalize("NFC", raw or "")
    name = name.replace("\\", "/").rsplit("/", 1)[-1]
    name = _UNSAFE.sub("", name)
    name = re.sub(r"\s+", " ", name).strip().lstrip(".").strip()
    if len(name) > MAX_NAME_CHARS:
        stem, dot, ext = name.rpartition(".")
        keep_ext = bool(dot) and len(ext) <= 10
        if keep_ext:
            name = f"{stem[: MAX_NAME_CHARS - 1 - len(ext)].rstrip()}.{ext}"
        else:
            name = name[:MAX_NAME_CHARS].rstrip()
    return name or "document"


def staging_dir() -> Path:
    path = Path(settings.MEDIA_ROOT) / "tmp"
    path.mkdir(parents=True, exist_ok=True)
    return path


class StagingWriter:
    """Writes one upload to a staging file, hashing as it goes; raises
    UploadRejected(413) the moment the size passes the limit."""

    def __init__(self, name: str) -> None:
        self.name = sanitize_filename(name)
        self.limit = settings.UPLOAD_MAX_BYTES
        fd, path = tempfile.mkstemp(prefix="upload-", dir=staging_dir())
        self.path = Path(path)
        self._fh = os.fdopen(fd, "wb")
        self._hash = hashlib.sha256()
        self.size = 0

    def write(self, data: bytes) -> None:
        if self.size + len(data) > self.limit:
            self.abort()
            raise too_large(self.name)
        self._fh.write(data)
        self._hash.update(data)
        self.size += len(data)

    def finish(self) -> StagedFile:
        self._fh.close()
        return StagedFile(self.path, self.name, self.size, self._hash.hexdigest())

    def abort(self) -> None:
        self._fh.close()
        self.path.unlink(missing_ok=True)


def stage_chunks(chunks: Iterable[bytes], name: str) -> StagedFile:
    """Stage a file from an iterable of byte chunks (a Django UploadedFile's
    `.chunks()`, a file read in blocks)."""
    writer = StagingWriter(name)
    try:
        for data in chunks:
            writer.write(data)
    except UploadRejected:
        raise
    except BaseException:
        writer.abort()
        raise
    return writer.finish()


def stage_path(path: Path, block: int = 1024 * 1024) -> StagedFile:
    """Stage a file from the local disk (the `ingest` command)."""
    with path.open("rb") as fh:
        return stage_chunks(iter(lambda: fh.read(block), b""), path.name)


def check_staged(target: Collection, staged: StagedFile) -> str:
    """The staged file's kind, or UploadRejected: content that is not what its
    name says (415/400), or a file already in `target` (409 `duplicate`)."""
    try:
        kind = sniff(staged.path, staged.name)
    except FileRejected as exc:
        raise UploadRejected(exc.code, f"{staged.name}: {exc.message}", status=exc.status) from None
    existing = Document.objects.filter(collection=target, sha256=staged.sha256).first()
    if existing is not None:
        raise _duplicate(existing)
    return kind


def add_document(owner, target: Collection, staged: StagedFile, *, dispatch: bool = True):
    """Turn a staged file into a queued document of `target` (handed to the
    worker unless `dispatch` is False: the caller runs the ingestion itself).

    Raises UploadRejected: 415/400 for content that is not what its name says,
    409 `duplicate` (naming the existing document) for a file already in the
    collection. The staged file is consumed either way."""
    try:
        kind = check_staged(target, staged)
        relative = f"documents/{target.pk}/{staged.sha256}"
        final = Path(settings.MEDIA_ROOT) / relative
        final.parent.mkdir(parents=True, exist_ok=True)
        try:
            with transaction.atomic():
                document = Document(
                    collection=target,
                    owner=owner,
                    title=staged.name,
                    sha256=staged.sha256,
                    size=staged.size,
                    mime=MIME_TYPES[kind],
                    status=Document.Status.QUEUED,
                )
                document.file.name = relative
                document.save()
                os.replace(staged.path, final)
                if dispatch:
                    worker.enqueue(document)
        except IntegrityError:
            # Someone stored the same file in the same collection meanwhile.
            existing = Document.objects.filter(collection=target, sha256=staged.sha256).first()
            if existing is None:
                raise
            raise _duplicate(existing) from None
        return document
    finally:
        staged.discard()


def _duplicate(existing: Document) -> UploadRejected:
    return UploadRejected(
        "duplicate",
        f"this file is already in the collection as “{existing.title}” (document {existing.pk})",
        status=409,
        document={"id": existing.pk, "title": existing.title, "status": existing.status},
    )


def delete_document(document: Document) -> None:
    """Remove every chunk, then the row (the file goes with it, see rag.apps).
    If the vector store is unreachable nothing is removed (the error propagates).

    One transaction: the row and its keyword rows (cascade) go together, and
    the Chroma chunks are removed inside it, so a failure there rolls the
    rest back; retrieval checks every vector hit against the row, so neither
    index answers for the document once this commits."""
    with transaction.atomic():
        Document.objects.select_for_update().filter(pk=document.pk).first()
        store.delete_document(document.collection.chroma_name, document.pk)
        document.delete()


def reingest(document: Document) -> Document:
    """Queue a document again; old chunks are swapped for new ones when done."""
    return worker.requeue(document)
