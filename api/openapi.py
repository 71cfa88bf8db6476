"""The OpenAPI 3.1 description of BreezeWeb's HTTP API, as JSON at `/api/schema`
and as a server-rendered page at `/api/docs` (no scripts: the strict CSP holds).

Nothing here is schema written by hand: every body, request and response, is a
pydantic model in api/schemas.py, turned into JSON Schema by pydantic itself
(`components.schemas`). This module only says which operation takes and
answers which model, in prose for people, and renders the result generically.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from functools import cache
from typing import Any

from django.http import HttpRequest, HttpResponse, JsonResponse
from django.shortcuts import render
from django.utils.html import escape
from django.utils.safestring import SafeString, mark_safe
from django.views.decorators.http import require_GET

from pydantic import BaseModel
from pydantic.json_schema import GenerateJsonSchema, models_json_schema

from api import schemas as s
from chat import limits, server_frames
from chat.frames import CLIENT_FRAMES

OPENAPI_VERSION = "3.1.0"
API_VERSION = "1.0"
REF = "#/components/schemas/{model}"


@dataclass(frozen=True)
class Op:
    """One operation: `"POST /path"`, the answer's model, a summary, the error
    statuses (with their meaning when it is particular), the body's model."""

    route: str
    ok: type[BaseModel] | None
    summary: str
    errors: tuple[int, ...] | dict[int, str] = ()
    body: type[BaseModel] | None = None
    status: int = 200

    @property
    def public(self) -> bool:
        return not self.route.split()[1].startswith(("/api", "/v1"))


_V1 = "OpenAI-compatible"
_RETRY = "Seconds to wait before trying again."
CHAT = (
    "Answer a conversation: One turn through the guardian, retrieval (`breezeweb.rag`), "
    "the router (with fallback) and the output rules. Stateless unless `breezeweb.save` or "
    "`breezeweb.conversation_id` is given. With `stream: true` the answer is a "
    "text/event-stream of ChatCompletionChunk objects ending with `data: [DONE]`."
)
UPLOAD = (
    "Upload documents: Ingestion runs in the background; poll the document (or watch the "
    "websocket) for its status."
)
STATUS = {
    400: "A malformed request: `code` says what is wrong, `param` names the field; or an "
    "API key sent in the query string (`api_key_in_query`), which is refused.",
    401: "No key or session, or an invalid or revoked key.",
    403: "Session authentication without a valid CSRF token, or not allowed.",
    404: "Not there, or not yours.",
    410: "The stored file is gone (`file_missing`).",
    413: "The body, or a file, is over its limit.",
    429: "The request rate is exceeded.",
    503: "Not ready, or a service is unavailable; the body says which.",
}
CHAT_ERRORS = {
    400: "A malformed request (`param` names the field), an invalid image (`invalid_image`), "
    "a blocked message (`content_blocked`), a message too long for the model "
    "(`invalid_input`), or a chosen model without a capability the request needs "
    "(`model_not_capable`), or an API key sent in the query string (`api_key_in_query`).",
    404: "Unknown or disabled model, collection or conversation.",
    413: "The body exceeds DATA_UPLOAD_MAX_MEMORY_SIZE.",
    429: "The request rate or the concurrent streams are exceeded.",
    502: "The runner failed, or refused BreezeWeb's own credentials.",
    503: "No runner can answer now or, with `auto`, none has the needed capability.",
    504: "The runner timed out.",
}
OPERATIONS = [
    Op("GET /v1/models", s.ModelList, "The models: `auto` (the router) and each enabled runner"),
    Op("GET /v1/models/{model_id}", s.Model, "One model", (404,)),
    Op("POST /v1/chat/completions", s.ChatCompletion, CHAT, CHAT_ERRORS, s.ChatCompletionRequest),
    Op(
        "GET /api/conversations",
        s.ConversationList,
        "Your conversations: Pinned first, then newest first; with `q`, search results, "
        "best match first.",
    ),
    Op(
        "POST /api/conversations",
        s.Conversation,
        "Start an empty conversation: In a project, it takes the project's defaults.",
        (400, 404),
        s.NewConversation,
        status=201,
    ),
    Op("GET /api/conversations/{conversation_id}", s.Conversation, "One conversation", (404,)),
    Op(
        "PATCH /api/conversations/{conversation_id}",
        s.ConversationSummary,
        "Rename, move to a project, pin it, or switch its branch",
        (400, 404),
        s.ConversationPatch,
    ),
    Op("DELETE /api/conversations/{conversation_id}", None, "Delete it", (404,), status=204),
    Op(
        "POST /api/conversations/{conversation_id}/fork",
        s.Conversation,
        "Fork it from a message: A new conversation with a copy of the branch up to that "
        "message, its settings and project.",
        (400, 404),
        s.ForkRequest,
        status=201,
    ),
    Op(
        "GET /api/conversations/{conversation_id}/shares",
        s.ShareList,
        "Its share links",
        (404,),
    ),
    Op(
        "POST /api/conversations/{conversation_id}/shares",
        s.NewShare,
        "Share it: A read-only link to a snapshot of its active branch as it is now, opened "
        "without a login unless SHARE_LINKS_REQUIRE_LOGIN; the URL is shown only in this answer.",
        (400, 404),
        s.ShareRequest,
        status=201,
    ),
    Op("GET /api/shares", s.ShareList, "All your share links"),
    Op("DELETE /api/shares/{share_id}", s.Share, "Revoke a share link: It stops at once.", (404,)),
    Op(
        "GET /api/conversations/export",
        s.Export,
        "Export all your conversations: As a download, BreezeWeb JSON or (`format=md`) Markdown.",
        (400,),
    ),
    Op(
        "GET /api/conversations/{conversation_id}/export",
        s.Export,
        "Export one conversation: As a download, BreezeWeb JSON or (`format=md`) Markdown.",
        (400, 404),
    ),
    Op(
        "POST /api/imports",
        s.ImportJob,
        "Import conversations: The body is a BreezeWeb JSON export or ChatGPT's "
        "conversations.json (at most DATA_UPLOAD_MAX_MEMORY_SIZE bytes); it is imported "
        "in the background with branches, and the job reports what was imported and skipped.",
        (400, 413),
        status=202,
    ),
    Op("GET /api/imports/{job_id}", s.ImportJob, "An import's progress and report", (404,)),
    Op("GET /api/projects", s.ProjectList, "Your projects"),
    Op(
        "POST /api/projects",
        s.Project,
        "Create a project: A folder of conversations with instructions (a system prompt) "
        "and defaults for its new chats (runner, documents, parameters).",
        (400, 404),
        s.ProjectRequest,
        status=201,
    ),
    Op("GET /api/projects/{project_id}", s.Project, "One project", (404,)),
    Op(
        "PATCH /api/projects/{project_id}",
        s.Project,
        "Change it: Only the fields sent change.",
        (400, 404),
        s.ProjectRequest,
    ),
    Op(
        "DELETE /api/projects/{project_id}",
        None,
        "Delete it: Its conversations stay, outside any project.",
        (404,),
        status=204,
    ),
    Op("GET /api/runners", s.RunnerList, "The enabled runners you may use (for a runner picker)"),
    Op("GET /api/usage", s.UsageSummary, "Your usage and your budgets (quotas)"),
    Op("GET /api/documents", s.DocumentList, "The documents you may read", (400,)),
    Op(
        "POST /api/documents",
        s.Uploaded,
        UPLOAD,
        {
            409: "The same file is already in the collection (`duplicate`; the error "
            "names the existing document).",
            415: "The file is not of a type BreezeWeb reads, its content does not match "
            "its name, or it cannot be opened (`unsupported_type`, `not_a_pdf`, "
            "`binary_content`, `encrypted_pdf`, ...).",
        }
        | dict.fromkeys((400, 404, 413)),
        s.Upload,
        status=201,
    ),
    Op("GET /api/documents/{document_id}", s.OneDocument, "One document", (404,)),
    Op(
        "DELETE /api/documents/{document_id}",
        s.Deleted,
        "Delete it, its file and chunks",
        (404, 503),
    ),
    Op(
        "POST /api/documents/{document_id}/reingest",
        s.OneDocument,
        "Index it again",
        (404, 410),
        status=202,
    ),
    Op("GET /api/collections", s.CollectionList, "The collections you may read"),
    Op(
        "POST /api/search",
        s.SearchResults,
        "Search your documents (no generation)",
        (400,),
        s.SearchRequest,
    ),
    Op("GET /healthz", s.Health, "Liveness: the process answers"),
    Op("GET /readyz", s.Readiness, "Readiness: database, vector store, a healthy runner", (503,)),
]


class _Schema(GenerateJsonSchema):
    """pydantic's JSON Schema without the `title` it derives from each field name."""

    def field_title_should_be_set(self, schema) -> bool:
        return False


QUERY = {
    "GET /api/conversations": {
        "q": "Search: only conversations whose messages or title contain all these words "
        f"(stemmed; the last one may be the start of a word), best match first, at most "
        f"{limits.MAX_SEARCH_HITS}; at most {limits.MAX_CONVERSATION_QUERY_CHARS} characters "
        "are read.",
        "project": "Only this project's conversations (an id).",
    },
    "GET /api/documents": {"collection": "Only this collection's documents (an id)."},
    "GET /api/conversations/export": {"format": "`json` (default) or `md`."},
    "GET /api/conversations/{conversation_id}/export": {"format": "`json` (default) or `md`."},
}


def _components() -> dict[str, Any]:
    models = {m for op in OPERATIONS for m in (op.body, op.ok) if m}
    models |= {s.OpenAIError, s.Error, s.ChatCompletionChunk}
    keys = [(m, "validation" if issubclass(m, s.Body) else "serialization") for m in models]
    # The chat websocket's frames (docs/websocket.md): what a client sends, what it gets.
    server = tuple(server_frames.FRAMES.values())
    keys += [(m, "validation") for m in CLIENT_FRAMES]
    keys += [(m, "serialization") for m in server]
    keys.sort(key=lambda k: k[0].__name__)
    _, top = models_json_schema(keys, ref_template=REF, schema_generator=_Schema)
    components = top["$defs"]
    sides = {
        "WsClientFrame": ("a client sends", CLIENT_FRAMES),
        "WsServerFrame": ("the server sends", server),
    }
    for name, (who, frames) in sides.items():
        components[name] = {
            "description": f"Any frame {who} on `/ws/chat/`, by `type` (docs/websocket.md).",
            "oneOf": [{"$ref": REF.format(model=m.__name__)} for m in frames],
            "discriminator": {"propertyName": "type"},
        }
    return dict(sorted(components.items()))


def _content(model: type[BaseModel] | None, description: str, retry: bool = False) -> dict:
    out: dict[str, Any] = {"description": description}
    if model is not None:
        out["content"] = {
            "application/json": {"schema": {"$ref": REF.format(model=model.__name__)}}
        }
    if model is s.ChatCompletion:
        chunk = {"$ref": REF.format(model="ChatCompletionChunk")}
        out["content"]["text/event-stream"] = {"schema": chunk}
    if model is s.Export:
        out["content"]["text/markdown"] = {"schema": {"type": "string"}}
    if retry:
        out["headers"] = {"Retry-After": {"description": _RETRY, "schema": {"type": "integer"}}}
    return out


def _operation(op: Op) -> dict[str, Any]:
    path = op.route.split()[1]
    v1 = path.startswith("/v1")
    errors = {**dict.fromkeys(op.errors)} if isinstance(op.errors, tuple) else dict(op.errors)
    if not op.public:
        # What ApiMiddleware and the authentication answer for any operation: a
        # key in the query string, a declared body over the limit, no or a bad key.
        always = dict.fromkeys((400, 401, 403, 413, 429))
        errors = always | errors
    responses = {str(op.status): _content(op.ok, "Done.")}
    for status, text in sorted(errors.items()):
        shape = s.Readiness if op.public else s.OpenAIError if v1 else s.Error
        responses[str(status)] = _content(shape, text or STATUS[status], status in (429, 503))
    params = [
        {"name": name[1:-1], "in": "path", "required": True, "schema": {"type": "string"}}
        for name in path.split("/")
        if name.startswith("{")
    ]
    params += [
        {"name": name, "in": "query", "schema": {"type": "string"}, "description": text}
        for name, text in QUERY.get(op.route, {}).items()
    ]
    summary, _, description = op.summary.partition(": ")
    out: dict[str, Any] = {
        "tags": [_V1 if v1 else "Operations" if op.public else "BreezeWeb"],
        "operationId": re.sub(r"\W+", "_", op.route).strip("_"),
        "summary": summary,
        "description": description,
        "security": [] if op.public else [{"bearerAuth": []}, {"sessionAuth": []}],
        "responses": responses,
    }
    if params:
        out["parameters"] = params
    if op.body is not None:
        kind = "multipart/form-data" if op.body is s.Upload else "application/json"
        schema = {"$ref": REF.format(model=op.body.__name__)}
        out["requestBody"] = {"required": True, "content": {kind: {"schema": schema}}}
    return out


@cache
def build_schema() -> dict[str, Any]:
    """The whole OpenAPI 3.1 document (built once per process)."""
    paths: dict[str, dict[str, Any]] = {}
    for op in OPERATIONS:
        method, path = op.route.split()
        paths.setdefault(path, {})[method.lower()] = _operation(op)
    return {
        "openapi": OPENAPI_VERSION,
        "info": {
            "title": "BreezeWeb HTTP API",
            "version": API_VERSION,
            "description": "OpenAI-compatible chat completions and models, the documents "
            "API, and health endpoints. Authenticate with `Authorization: Bearer <API key>` "
            "(keys are created at /settings/api-keys/) or, from the browser, the session "
            "cookie plus the X-CSRFToken header on unsafe methods. Request bodies are at "
            f"most DATA_UPLOAD_MAX_MEMORY_SIZE bytes (/v1) or {limits.MAX_SMALL_BODY_BYTES} "
            "(/api), nested at most "
            f"{limits.MAX_JSON_DEPTH} (/v1) or {limits.MAX_APP_JSON_DEPTH} (/api) levels.",
        },
        "servers": [{"url": "/"}],
        "tags": [
            {"name": _V1, "description": "Use any OpenAI client."},
            {"name": "BreezeWeb", "description": "Conversations, runners and documents."},
            {"name": "Operations", "description": "Health checks for load balancers."},
        ],
        "paths": paths,
        "components": {
            "schemas": _components(),
            "securitySchemes": {
                "bearerAuth": {
                    "type": "http",
                    "scheme": "bearer",
                    "description": "An API key from /settings/api-keys/ (bw_...).",
                },
                "sessionAuth": {
                    "type": "apiKey",
                    "in": "cookie",
                    "name": "sessionid",
                    "description": "The browser's session; unsafe methods also need the "
                    "X-CSRFToken header.",
                },
            },
        },
    }


@require_GET
def schema_view(request: HttpRequest) -> JsonResponse:
    """`GET /api/schema`: the OpenAPI document as JSON (public, like the docs)."""
    return JsonResponse(build_schema(), json_dumps_params={"indent": 1})


# ---- the reference page: any OpenAPI document, rendered generically -----------------------

LIMITS = {"minimum": "≥", "maximum": "≤", "exclusiveMinimum": ">", "pattern": "pattern"}
LIMITS |= {f"{e}{k}": f"{e[:3]} {k.lower()}" for e in ("min", "max") for k in ("Items", "Length")}


def _prose(text: str) -> SafeString:
    """Escaped text with `backticked` spans as <code>."""
    parts = escape(text).split("`")
    html = "".join(f"<code>{p}</code>" if i % 2 else p for i, p in enumerate(parts))
    return mark_safe(html)  # noqa: S308 (built from escaped text only)


def type_of(node: dict[str, Any]) -> str:
    """A short type for people (`$ref`s as component names)."""
    if "$ref" in node:
        return node["$ref"].rsplit("/", 1)[-1]
    if "const" in node:
        return repr(node["const"]).replace("'", '"')
    if "enum" in node:
        return "one of " + ", ".join(map(str, node["enum"]))
    if members := node.get("anyOf") or node.get("oneOf"):
        return " | ".join(map(type_of, members))
    if node.get("type") == "array":
        return f"array of {type_of(node.get('items', {}))}"
    return node.get("type", "any") + (f" ({node['format']})" if "format" in node else "")


def _limits(node: dict[str, Any]) -> str:
    nodes = [node, node.get("items") or {}, *node.get("anyOf", [])]
    found = {k: v for n in nodes for k, v in n.items() if k in LIMITS and v not in (None, "", [])}
    return "; ".join(f"{LIMITS[k]} {v}" for k, v in found.items())


def rows(schema: dict[str, Any]) -> list[dict[str, Any]]:
    """The fields of an object schema: name, type, required, description and limits."""
    required = set(schema.get("required", ()))
    return [
        {"name": name, "type": type_of(p), "required": name in required, "limits": _limits(p)}
        | {"description": _prose(p.get("description", ""))}
        for name, p in schema.get("properties", {}).items()
    ]


def _types(media: dict[str, Any]) -> list[str]:
    return [type_of(m["schema"]) for m in media.get("content", {}).values()]


def _op(path: str, method: str, op: dict[str, Any]) -> dict[str, Any]:
    responses = [
        {**r, "status": status, "description": _prose(r["description"]), "types": _types(r)}
        for status, r in op["responses"].items()
    ]
    body = _types(op.get("requestBody", {}))
    return {**op, "method": method, "path": path, "body": body, "responses": responses}


@cache
def _docs_context() -> dict[str, Any]:
    schema = build_schema()
    operations = [
        _op(path, method, {**op, "description": _prose(op["description"])})
        for path, item in schema["paths"].items()
        for method, op in item.items()
    ]
    components = [
        {"name": name, "description": _prose(c.get("description", "")), "rows": rows(c)}
        for name, c in schema["components"]["schemas"].items()
    ]
    info = {**schema["info"], "description": _prose(schema["info"]["description"])}
    return {"info": info, "openapi": schema["openapi"], "ops": operations, "schemas": components}


@require_GET
def docs_view(request: HttpRequest) -> HttpResponse:
    """`GET /api/docs`: the schema as a readable page, rendered on the server."""
    return render(request, "api/docs.html", _docs_context())
