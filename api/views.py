"""The JSON endpoints behind the conversation list (/api/conversations,
/api/projects, /api/runners) and the usage page (/api/usage). Views stay
thin: they check access, parse the request and call chat.services."""

from __future__ import annotations

import json

from django.http import HttpRequest, HttpResponse, JsonResponse
from django.views.decorators.http import require_GET, require_http_methods, require_POST

from accounts import quotas
from accounts import usage as account_usage
from api import schemas
from api.decorators import api_view
from api.errors import json_error
from api.inputs import read_body, read_json
from chat import services, sharing, transfer
from chat.inputs import clean_name, parse_id
from chat.limits import MAX_CONVERSATION_QUERY_CHARS, MAX_SMALL_BODY_BYTES

LIMIT = "APP_API_REQUESTS_PER_MINUTE"


def _body(request: HttpRequest, model, *, allow_nul: bool = False):
    body = read_json(request, max_bytes=MAX_SMALL_BODY_BYTES, allow_nul=allow_nul, empty={})
    body = body if isinstance(body, dict) else {}  # anything else lacks every field
    return schemas.parse(model, body, field_codes=True)


@api_view(limit=LIMIT)
@require_http_methods(["GET", "POST"])
def conversations(request: HttpRequest) -> JsonResponse:
    """GET /api/conversations: the user's conversations, pinned then newest first;
    `?q=words`: those whose messages or title say them, best match first.
    POST {"title"?, "project_id"?}: a new, empty conversation."""
    if request.method == "POST":
        # NUL and other control characters are allowed here: the title drops them.
        new = _body(request, schemas.NewConversation, allow_nul=True)
        created = services.create_conversation(
            request.user, title=new.title or "", project_id=new.project_id
        )
        return JsonResponse(created, status=201)
    query = clean_name(request.GET.get("q", ""))[:MAX_CONVERSATION_QUERY_CHARS]
    project_id = None
    if raw := request.GET.get("project"):
        project_id = parse_id(raw)
        if project_id is None:
            return json_error(400, "bad_project", "project must be a project id")
    listed = services.list_conversations(request.user, query=query, project_id=project_id)
    return JsonResponse({"conversations": listed})


@api_view(limit=LIMIT)
@require_http_methods(["GET", "PATCH", "DELETE"])
def conversation(request: HttpRequest, conversation_id: int) -> HttpResponse:
    """GET: the conversation with its active branch and tree; PATCH {"title"?,
    "project_id"?, "pinned"?, "active_message_id"?}: rename, move, pin, switch
    branch; DELETE."""
    if request.method == "GET":
        return JsonResponse(services.conversation_messages(request.user, conversation_id))
    if request.method == "DELETE":
        services.delete_conversation(request.user, conversation_id)
        return HttpResponse(status=204)
    patch = _body(request, schemas.ConversationPatch, allow_nul=True)
    changes = {key: getattr(patch, key) for key in patch.model_fields_set}
    return JsonResponse(services.update_conversation(request.user, conversation_id, changes))


@api_view(limit=LIMIT)
@require_POST
def fork(request: HttpRequest, conversation_id: int) -> JsonResponse:
    """POST {"message_id"}: a new conversation with a copy of the branch up to that message."""
    message_id = _body(request, schemas.ForkRequest).message_id
    forked = services.fork_conversation(request.user, conversation_id, message_id)
    return JsonResponse(forked, status=201)


@api_view(limit=LIMIT)
@require_http_methods(["GET", "POST"])
def conversation_shares(request: HttpRequest, conversation_id: int) -> JsonResponse:
    """GET: the conversation's share links; POST {"expires_in_days"?}: a new one."""
    if request.method == "GET":
        services.conversation_messages(request.user, conversation_id)  # yours, or 404
        shares = sharing.list_shares(request.user, conversation_id=conversation_id)
        return JsonResponse({"shares": shares})
    days = _body(request, schemas.ShareRequest).expires_in_days
    created = sharing.create_share(request.user, conversation_id, expires_in_days=days)
    return JsonResponse(created, status=201)


@api_view(limit=LIMIT)
@require_GET
def shares(request: HttpRequest) -> JsonResponse:
    """GET /api/shares: every share link of the user's conversations."""
    return JsonResponse({"shares": sharing.list_shares(request.user)})


@api_view(limit=LIMIT)
@require_http_methods(["DELETE"])
def share(request: HttpRequest, share_id: int) -> JsonResponse:
    """DELETE /api/shares/{id}: revoke the link (it is kept, marked revoked)."""
    return JsonResponse(sharing.revoke_share(request.user, share_id))


EXPORT_TYPES = {"json": "application/json", "md": "text/markdown; charset=utf-8"}


def _export(request: HttpRequest, conversation_id: int | None) -> HttpResponse:
    kind = request.GET.get("format", "json")
    if kind not in EXPORT_TYPES:
        return json_error(400, "bad_format", "format must be `json` or `md`")
    data = transfer.export_json(request.user, conversation_id)
    if conversation_id is not None and not data["conversations"]:
        return json_error(404, "not_found", f"Conversation {conversation_id} was not found.")
    if kind == "md":
        body = transfer.export_markdown(data).encode()
    else:
        body = json.dumps(data, ensure_ascii=False, indent=1).encode()
    name = f"conversation-{conversation_id}" if conversation_id else "conversations"
    response = HttpResponse(body, content_type=EXPORT_TYPES[kind])
    response["Content-Disposition"] = f'attachment; filename="breezeweb-{name}.{kind}"'
    return response


@api_view(limit=LIMIT)
@require_GET
def export_all(request: HttpRequest) -> HttpResponse:
    """GET /api/conversations/export?format=json|md: all the user's conversations."""
    return _export(request, None)


@api_view(limit=LIMIT)
@require_GET
def export_one(request: HttpRequest, conversation_id: int) -> HttpResponse:
    """GET /api/conversations/{id}/export?format=json|md: one conversation."""
    return _export(request, conversation_id)


@api_view(limit=LIMIT)
@require_POST
def imports(request: HttpRequest) -> JsonResponse:
    """POST /api/imports, the body a BreezeWeb export or ChatGPT's
    conversations.json: queued, answered at once with the job to poll."""
    raw = read_body(request)
    if not raw.strip():
        return json_error(400, "bad_json", "The request body is empty; send the file's JSON.")
    return JsonResponse(transfer.start_import(request.user, raw), status=202)


@api_view(limit=LIMIT)
@require_GET
def import_job(request: HttpRequest, job_id: int) -> JsonResponse:
    """GET /api/imports/{id}: the import's progress, then its report."""
    job = transfer.get_job(request.user, job_id)
    if job is None:
        return json_error(404, "not_found", f"Import {job_id} was not found.")
    return JsonResponse(job)


@api_view(limit=LIMIT)
@require_http_methods(["GET", "POST"])
def projects(request: HttpRequest) -> JsonResponse:
    """GET /api/projects: the user's projects; POST: create one."""
    if request.method == "GET":
        return JsonResponse({"projects": services.list_projects(request.user)})
    changes = _body(request, schemas.ProjectRequest).changes()
    return JsonResponse(services.save_project(request.user, None, changes), status=201)


@api_view(limit=LIMIT)
@require_http_methods(["GET", "PATCH", "DELETE"])
def project(request: HttpRequest, project_id: int) -> HttpResponse:
    """GET: one project; PATCH: change it; DELETE: delete it (its
    conversations stay, outside any project)."""
    if request.method == "GET":
        return JsonResponse(services.get_project(request.user, project_id))
    if request.method == "DELETE":
        services.delete_project(request.user, project_id)
        return HttpResponse(status=204)
    changes = _body(request, schemas.ProjectRequest).changes()
    return JsonResponse(services.save_project(request.user, project_id, changes))


@api_view(limit=LIMIT)
@require_GET
def runners(request: HttpRequest) -> JsonResponse:
    """GET /api/runners: the enabled runners the caller may use (name, kind,
    capabilities, model_id)."""
    return JsonResponse({"runners": services.enabled_runners(request.user)})


@api_view(limit=LIMIT)
@require_GET
def usage(request: HttpRequest) -> JsonResponse:
    """GET /api/usage: the caller's usage (today, this month, by runner and
    by key) and budgets (accounts.usage, accounts.quotas)."""
    summary = account_usage.user_summary(request.user)
    summary["quotas"] = [q.as_dict() for q in quotas.status(request.user)]
    return JsonResponse(summary)
