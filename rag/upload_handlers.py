"""A Django upload handler that streams each file part straight into a staging
file with its sha256 and stops writing past UPLOAD_MAX_BYTES.

Installed per request by the documents API (`install`) before anything reads
request.POST/FILES. Note: Django's ASGI handler reads the whole request body
(spooled to a temporary file) before the view runs; put a body-size limit in
the reverse proxy too (docs/rag.md). This handler guarantees our storage never
receives more.
"""

from __future__ import annotations

from django.core.files.uploadedfile import UploadedFile
from django.core.files.uploadhandler import FileUploadHandler, SkipFile
from django.http import multipartparser

from rag.uploads import StagedFile, StagingWriter, UploadRejected

# Django reads each multipart part's headers within 1024 bytes and refuses the
# whole body past that ("Request max total header size exceeded"), so a file
# name of a few hundred characters (or fewer, in a non-Latin script: 3-4 bytes
# each in UTF-8) made an upload fail as unreadable. Part headers up to 8 KB
# hold a 1000-character name in any script; sanitize_filename then shortens it.
# Django has no setting for this; the module constant is read on every parse.
PART_HEADER_MAX_BYTES = 8 * 1024
if multipartparser.MAX_TOTAL_HEADER_SIZE < PART_HEADER_MAX_BYTES:
    multipartparser.MAX_TOTAL_HEADER_SIZE = PART_HEADER_MAX_BYTES


class StagedUpload(UploadedFile):
    """What request.FILES holds for each part: the staged file, not its bytes."""

    def __init__(self, staged: StagedFile, content_type: str | None) -> None:
        super().__init__(file=None, name=staged.name, content_type=content_type, size=staged.size)
        self.staged = staged


class StagingUploadHandler(FileUploadHandler):
    def __init__(self, request=None) -> None:
        super().__init__(request)
        self.rejected: list[UploadRejected] = []
        self.staged: list[StagedFile] = []
        self._writer: StagingWriter | None = None

    def new_file(self, *args, **kwargs):
        super().new_file(*args, **kwargs)
        if self._writer is not None:  # a previous part never completed
            self._writer.abort()
        self._writer = StagingWriter(self.file_name)

    def receive_data_chunk(self, raw_data, start):
        if self._writer is None:
            return None
        try:
            self._writer.write(raw_data)
        except UploadRejected as exc:
            self._writer = None
            self.rejected.append(exc)
            raise SkipFile from None  # the parser drains the rest unwritten
        return None

    def file_complete(self, file_size):
        if self._writer is None:
            return None
        staged = self._writer.finish()
        self._writer = None
        self.staged.append(staged)
        return StagedUpload(staged, self.content_type)

    def upload_interrupted(self):
        if self._writer is not None:
            self._writer.abort()
            self._writer = None
        self.cleanup()

    def cleanup(self) -> None:
        """Remove staged files that no document took (errors, refusals)."""
        for staged in self.staged:
            staged.discard()


def install(request) -> StagingUploadHandler:
    handler = StagingUploadHandler(request)
    request.upload_handlers = [handler]
    return handler
