"""A Django upload handler that streams each file part straight into a staging
file with its sha256 and stops writing past UPLOAD_MAX_BYTES.

Installed per request by the documents API (`install`) before anything reads
request.POST/FILES. Note: Daphne and Django's ASGI handler buffer the request
body before the view runs; put a body-size limit in the reverse proxy too
(docs/rag.md). This handler guarantees our storage never receives more.
"""

from __future__ import annotations

from django.core.files.uploadedfile import UploadedFile
from django.core.files.uploadhandler import FileUploadHandler, SkipFile

from rag.uploads import StagedFile, StagingWriter, UploadRejected


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
