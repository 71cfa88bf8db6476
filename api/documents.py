"""The documents HTTP API. Views are thin: auth, access checks, a service call,
JSON. Errors are `{"error": {"code", "message", ...}}` (accounts.auth)."""

from __future__ import annotations

import logging
from functools import wraps

from django.conf import settings
from django.http import HttpRequest, JsonResponse
from django.views.decorators.csrf import csrf_exempt

from api import schemas
from api.decorators import api_view
from api.errors import json_error
from api.inputs import read_json
from chat.inputs import parse_id
from chat.limits import (
    MAX_DOCUMENTS_LISTED,
    MAX_FILES_PER_REQUEST,
    MAX_SMALL_BODY_BYTES,
)
from rag import upload_handlers, worker
from rag.events import document_payload
from rag.models import Collection, Document
from rag.retrieval import retrieve
from rag.uploads import UploadRejected, add_document, delete_document, reingest, too_large

log = logging.getLogger(__name__)

LIMIT = "APP_API_REQUESTS_PER_MINUTE"


def document_json(document: Document) -> dict:
    return {
        **document_payload(document),
        "size": document.size,
        "mime": document.mime,
        "sha256": document.sha256,
        "page_count": document.page_count,
        "created_at": document.created_at.isoformat(),
        "updated_at": document.updated_at.isoformat(),
    }


def collection_json(collection: Collection, user) -> dict:
    return {
        "id": collection.pk,
        "name": collection.name,
        "personal": collection.is_personal,
        "shared": collection.shared,
        "owner": collection.owner.get_username() if collection.owner_id else None,
        "writable": collection.writable_by(user),
        "top_k": collection.top_k,
        "score_floor": collection.score_floor,
    }


def _staged_uploads(view):
    """Stream multipart files into staging files (size limit, sha256) before
    anything parses the body; remove whatever no document took."""

    @csrf_exempt
    @wraps(view)
    def wrapper(request: HttpRequest, *args, **kwargs):
        if request.method != "POST" or not request.content_type.startswith("multipart/"):
            return view(request, *args, **kwargs)
        try:
            declared = int(request.META.get("CONTENT_LENGTH") or 0)
        except ValueError:
            declared = 0
        # A body that cannot hold a single file within the limit per allowed part.
        if declared > settings.UPLOAD_MAX_BYTES * MAX_FILES_PER_REQUEST + 1024 * 1024:
            return json_error(**_error_kwargs(too_large("this upload")))
        handler = upload_handlers.install(request)
        request.rag_upload_handler = handler
        try:
            return view(request, *args, **kwargs)
        finally:
            handler.cleanup()

    return wrapper


def _error_kwargs(exc: UploadRejected) -> dict:
    return {"status": exc.status, "code": exc.code, "message": exc.message, **exc.extra}


def _ready_worker() -> None:
    # First use of the documents API starts the worker and resumes leftovers.
    worker.ensure_started()


@_staged_uploads
@api_view(limit=LIMIT)
def documents(request: HttpRequest):
    """GET: the documents the user may read. POST: upload files (field `file`)."""
    _ready_worker()
    if request.method == "GET":
        readable = Collection.objects.readable_by(request.user)
        docs = Document.objects.filter(collection__in=readable).order_by("-created_at")
        if raw := request.GET.get("collection"):
            collection_id = parse_id(raw)
            if collection_id is None:
                return json_error(400, "bad_collection", "collection must be a collection id")
            docs = docs.filter(collection_id=collection_id)
        return JsonResponse({"documents": [document_json(d) for d in docs[:MAX_DOCUMENTS_LISTED]]})
    if request.method != "POST":
        return json_error(405, "method_not_allowed", "Use GET or POST.")
    return _upload(request)


def _target_collection(request: HttpRequest) -> Collection | JsonResponse:
    raw = request.POST.get("collection", "")
    if not raw:
        return Collection.personal_for(request.user)
    collection_id = parse_id(raw)
    if collection_id is None:
        return json_error(400, "bad_collection", "collection must be a collection id")
    target = Collection.objects.readable_by(request.user).filter(pk=collection_id).first()
    if target is None:
        return json_error(404, "collection_not_found", f"No collection {collection_id}.")
    if not target.writable_by(request.user):
        return json_error(
            403, "collection_read_only", f"You may read “{target.name}” but not add to it."
        )
    return target


def _upload(request: HttpRequest) -> JsonResponse:
    handler = getattr(request, "rag_upload_handler", None)
    try:
        files = request.FILES.getlist("file")
    except Exception as exc:  # a malformed multipart body
        log.info("upload: unreadable multipart body (%s)", type(exc).__name__)
        return json_error(400, "bad_upload", "The multipart body could not be read.")
    rejected = list(handler.rejected) if handler else []
    if not files and not rejected:
        return json_error(400, "no_file", "Send the file(s) in the multipart field `file`.")
    if len(files) + len(rejected) > MAX_FILES_PER_REQUEST:
        return json_error(
            400, "too_many_files", f"At most {MAX_FILES_PER_REQUEST} files per request."
        )
    target = _target_collection(request)
    if isinstance(target, JsonResponse):
        return target
    created: list[Document] = []
    for upload in files:
        staged = getattr(upload, "staged", None)
        if staged is None:  # only our handler fills request.FILES
            continue
        try:
            created.append(add_document(request.user, target, staged))
        except UploadRejected as exc:
            rejected.append(exc)
    errors = [{"code": e.code, "message": e.message, **e.extra} for e in rejected]
    if created:
        body = {"documents": [document_json(d) for d in created], "errors": errors}
        return JsonResponse(body, status=201)
    first = rejected[0]
    return json_error(**_error_kwargs(first), errors=errors)


def _readable_document(request: HttpRequest, pk: int) -> Document | None:
    readable = Collection.objects.readable_by(request.user)
    return (
        Document.objects.select_related("collection").filter(pk=pk, collection__in=readable).first()
    )


def _may_change(user, document: Document) -> bool:
    return document.owner_id == user.pk or document.collection.writable_by(user)


@api_view(limit=LIMIT)
def document_detail(request: HttpRequest, pk: int):
    """GET one document; DELETE it (file and every chunk)."""
    _ready_worker()
    document = _readable_document(request, pk)
    if document is None:
        return json_error(404, "document_not_found", f"No document {pk}.")
    if request.method == "GET":
        return JsonResponse({"document": document_json(document)})
    if request.method != "DELETE":
        return json_error(405, "method_not_allowed", "Use GET or DELETE.")
    if not _may_change(request.user, document):
        return json_error(403, "forbidden", "Only its owner or an admin may delete this document.")
    try:
        delete_document(document)
    except Exception as exc:
        log.warning("document %s: delete failed (%s)", pk, type(exc).__name__)
        return json_error(
            503, "store_unavailable", "The vector store is unreachable; nothing was deleted."
        )
    return JsonResponse({"deleted": pk})


@api_view(limit=LIMIT)
def document_reingest(request: HttpRequest, pk: int):
    """POST: index the document again (its current chunks stay until replaced)."""
    if request.method != "POST":
        return json_error(405, "method_not_allowed", "Use POST.")
    _ready_worker()
    document = _readable_document(request, pk)
    if document is None:
        return json_error(404, "document_not_found", f"No document {pk}.")
    if not _may_change(request.user, document):
        return json_error(403, "forbidden", "Only its owner or an admin may re-ingest it.")
    if not document.file or not document.file.storage.exists(document.file.name):
        return json_error(410, "file_missing", "The stored file is gone; upload it again.")
    return JsonResponse({"document": document_json(reingest(document))}, status=202)


@api_view(limit=LIMIT)
def collections(request: HttpRequest):
    """GET: the collections the user may read (their personal one first)."""
    if request.method != "GET":
        return json_error(405, "method_not_allowed", "Use GET.")
    Collection.personal_for(request.user)
    readable = Collection.objects.readable_by(request.user).select_related("owner")
    mine_first = sorted(readable, key=lambda c: (c.owner_id != request.user.pk, c.name))
    return JsonResponse({"collections": [collection_json(c, request.user) for c in mine_first]})


@api_view(limit=LIMIT)
def search_view(request: HttpRequest):
    """POST {query, collections?, k?, mode?}: ranked chunks (full text, page,
    section, per-signal scores), no generation."""
    if request.method != "POST":
        return json_error(405, "method_not_allowed", "Use POST.")
    body = read_json(request, max_bytes=MAX_SMALL_BODY_BYTES)
    search = schemas.parse(schemas.SearchRequest, body, field_codes=True)
    query, ids, k, mode = search.query, search.collections, search.k, search.mode
    # No prompt to fit: the budget only bounds the work.
    context = retrieve(request.user, query, ids, k=k, budget_tokens=1_000_000, mode=mode)
    results = [
        {"rank": i + 1, **source.as_search_dict()} for i, source in enumerate(context.sources)
    ]
    return JsonResponse({"query": query, "results": results})
