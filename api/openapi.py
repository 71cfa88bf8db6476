"""The OpenAPI 3.1 description of BreezeWeb's HTTP API, as JSON at `/api/schema`
and as a server-rendered page at `/api/docs` (no scripts: the strict CSP holds).

The schema is built here by hand, next to nothing but itself, so that it reads
like documentation; the tests check it against the running views (status codes,
response shapes) and the fuzz test generates request bodies from it.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cache
from typing import Any

from django.http import HttpRequest, HttpResponse, JsonResponse
from django.shortcuts import render
from django.utils.html import escape
from django.utils.safestring import SafeString, mark_safe
from django.views.decorators.http import require_GET

OPENAPI_VERSION = "3.1.0"
API_VERSION = "1.0"


def _ref(name: str) -> dict[str, str]:
    return {"$ref": f"#/components/schemas/{name}"}


def _json(schema: dict[str, Any], description: str) -> dict[str, Any]:
    return {"description": description, "content": {"application/json": {"schema": schema}}}


def _openai_error(description: str, **headers: str) -> dict[str, Any]:
    response = _json(_ref("OpenAIError"), description)
    if headers:
        response["headers"] = {
            name: {"description": text, "schema": {"type": "integer"}}
            for name, text in headers.items()
        }
    return response


def _error(description: str) -> dict[str, Any]:
    return _json(_ref("Error"), description)


_RETRY = {"Retry-After": "Seconds to wait before trying again."}

_NUMBER_OR_NULL = ["number", "null"]

SCHEMAS: dict[str, Any] = {
    # ---- errors ----
    "OpenAIError": {
        "type": "object",
        "description": "OpenAI's error shape, used by every /v1 endpoint.",
        "required": ["error"],
        "properties": {
            "error": {
                "type": "object",
                "required": ["message", "type", "code"],
                "properties": {
                    "message": {"type": "string", "description": "What went wrong, for people."},
                    "type": {
                        "type": "string",
                        "description": "invalid_request_error, authentication_error, "
                        "permission_error, not_found_error, rate_limit_error, server_error, "
                        "api_error.",
                    },
                    "param": {
                        "type": ["string", "null"],
                        "description": "The request field at fault, e.g. messages[0].content.",
                    },
                    "code": {"type": "string", "description": "A stable machine-readable code."},
                },
            }
        },
    },
    "Error": {
        "type": "object",
        "description": "BreezeWeb's own error shape, used by the /api endpoints.",
        "required": ["error"],
        "properties": {
            "error": {
                "type": "object",
                "required": ["code", "message"],
                "properties": {
                    "code": {"type": "string"},
                    "message": {"type": "string"},
                },
                "additionalProperties": True,
            }
        },
    },
    # ---- models ----
    "Model": {
        "type": "object",
        "required": ["id", "object", "created", "owned_by"],
        "properties": {
            "id": {"type": "string", "description": "The runner config's name, or `auto`."},
            "object": {"const": "model"},
            "created": {"type": "integer", "description": "Unix time the runner was configured."},
            "owned_by": {"const": "breezeweb"},
            "metadata": {
                "type": "object",
                "properties": {
                    "kind": {
                        "type": "string",
                        "description": "`executorch`, `llamastack`, or `router` for auto.",
                    },
                    "model_id": {"type": "string", "description": "The model the runner serves."},
                    "capabilities": {
                        "type": "array",
                        "items": {"enum": ["llm", "vlm", "agent"]},
                        "description": "llm: text; vlm: images; agent: tools.",
                    },
                    "priority": {"type": "integer"},
                    "context_tokens": {"type": "integer"},
                    "max_tokens": {"type": "integer"},
                    "runners": {
                        "type": "array",
                        "items": {"type": "string"},
                        "description": "auto only: the runners it chooses from.",
                    },
                },
            },
        },
    },
    "ModelList": {
        "type": "object",
        "required": ["object", "data"],
        "properties": {
            "object": {"const": "list"},
            "data": {"type": "array", "items": _ref("Model")},
        },
    },
    # ---- chat completions: request ----
    "TextPart": {
        "type": "object",
        "required": ["type", "text"],
        "properties": {"type": {"const": "text"}, "text": {"type": "string"}},
    },
    "ImagePart": {
        "type": "object",
        "required": ["type", "image_url"],
        "description": "User messages only. A base64 data URL of a PNG, JPEG, WebP or GIF "
        "image within IMAGE_MAX_BYTES; links are not fetched. Needs a model with `vlm`.",
        "properties": {
            "type": {"const": "image_url"},
            "image_url": {
                "type": "object",
                "required": ["url"],
                "properties": {
                    "url": {"type": "string", "description": "data:image/png;base64,..."},
                    "detail": {"enum": ["auto", "low", "high"]},
                },
            },
        },
    },
    "ToolCall": {
        "type": "object",
        "required": ["id", "type", "function"],
        "properties": {
            "id": {"type": "string"},
            "type": {"const": "function"},
            "function": {
                "type": "object",
                "required": ["name", "arguments"],
                "properties": {
                    "name": {"type": "string"},
                    "arguments": {"type": "string", "description": "A JSON string."},
                },
            },
        },
    },
    "SystemMessage": {
        "type": "object",
        "required": ["role", "content"],
        "description": "Instructions; `developer` is taken as `system`.",
        "properties": {
            "role": {"enum": ["system", "developer"]},
            "content": {
                "anyOf": [{"type": "string"}, {"type": "array", "items": _ref("TextPart")}]
            },
            "name": {"type": "string"},
        },
    },
    "UserMessage": {
        "type": "object",
        "required": ["role", "content"],
        "description": "The last message of a request must be a user message.",
        "properties": {
            "role": {"const": "user"},
            "content": {
                "anyOf": [
                    {"type": "string"},
                    {
                        "type": "array",
                        "items": {"anyOf": [_ref("TextPart"), _ref("ImagePart")]},
                    },
                ]
            },
            "name": {"type": "string"},
        },
    },
    "AssistantMessage": {
        "type": "object",
        "required": ["role"],
        "description": "An earlier answer. `content` may be null only with `tool_calls`.",
        "properties": {
            "role": {"const": "assistant"},
            "content": {
                "anyOf": [
                    {"type": "string"},
                    {"type": "array", "items": _ref("TextPart")},
                    {"type": "null"},
                ]
            },
            "tool_calls": {"type": "array", "items": _ref("ToolCall")},
        },
    },
    "ToolMessage": {
        "type": "object",
        "required": ["role", "content", "tool_call_id"],
        "description": "A tool's result, answering the assistant's tool call `tool_call_id`.",
        "properties": {
            "role": {"const": "tool"},
            "content": {
                "anyOf": [{"type": "string"}, {"type": "array", "items": _ref("TextPart")}]
            },
            "tool_call_id": {"type": "string", "minLength": 1},
        },
    },
    "Message": {
        "description": "One turn of the conversation, by role.",
        "oneOf": [
            _ref("SystemMessage"),
            _ref("UserMessage"),
            _ref("AssistantMessage"),
            _ref("ToolMessage"),
        ],
    },
    "Tool": {
        "type": "object",
        "required": ["type", "function"],
        "properties": {
            "type": {"const": "function"},
            "function": {
                "type": "object",
                "required": ["name"],
                "properties": {
                    "name": {"type": "string", "pattern": "^[A-Za-z0-9_-]{1,64}$"},
                    "description": {"type": "string"},
                    "parameters": {"type": "object", "description": "A JSON Schema object."},
                },
            },
        },
    },
    "BreezeWebRequest": {
        "type": "object",
        "additionalProperties": False,
        "description": "BreezeWeb's extension of the request (openai client: extra_body).",
        "properties": {
            "rag": {
                "type": "boolean",
                "description": "Answer from the user's documents (retrieval-augmented). "
                "Defaults to true when `collections` is given.",
            },
            "collections": {
                "type": "array",
                "items": {"type": "integer", "minimum": 1},
                "description": "Collection ids to search (default: all the user may read).",
            },
            "save": {
                "type": "boolean",
                "description": "Record the request's messages and the answer as a new "
                "conversation (its id comes back in `breezeweb.conversation_id`).",
            },
            "conversation_id": {
                "type": "integer",
                "minimum": 1,
                "description": "Append the last user message and the answer to this "
                "conversation of yours. The model still sees exactly the `messages` sent.",
            },
        },
    },
    "ChatCompletionRequest": {
        "type": "object",
        "required": ["model", "messages"],
        "description": "OpenAI's request shape. Other OpenAI fields (user, seed, "
        "frequency_penalty, ...) are accepted and ignored.",
        "properties": {
            "model": {
                "type": "string",
                "description": "A model id from GET /v1/models, or `auto` (the router).",
            },
            "messages": {"type": "array", "minItems": 1, "items": _ref("Message")},
            "temperature": {"type": _NUMBER_OR_NULL, "minimum": 0, "maximum": 2},
            "top_p": {"type": _NUMBER_OR_NULL, "minimum": 0, "maximum": 1},
            "max_tokens": {
                "type": ["integer", "null"],
                "minimum": 1,
                "description": "Capped by the runner's own max_tokens.",
            },
            "max_completion_tokens": {
                "type": ["integer", "null"],
                "minimum": 1,
                "description": "Same as max_tokens; wins when both are given.",
            },
            "stop": {
                "anyOf": [
                    {"type": "string", "minLength": 1},
                    {
                        "type": "array",
                        "items": {"type": "string", "minLength": 1},
                        "maxItems": 4,
                    },
                    {"type": "null"},
                ]
            },
            "stream": {"type": ["boolean", "null"]},
            "stream_options": {
                "type": ["object", "null"],
                "description": "Only with stream: true.",
                "properties": {"include_usage": {"type": "boolean"}},
            },
            "n": {"const": 1},
            "tools": {
                "type": "array",
                "items": _ref("Tool"),
                "maxItems": 128,
                "description": "Needs a model with the `agent` capability.",
            },
            "tool_choice": {"enum": ["auto", "none"]},
            "breezeweb": _ref("BreezeWebRequest"),
        },
    },
    # ---- chat completions: response ----
    "Usage": {
        "type": "object",
        "required": ["prompt_tokens", "completion_tokens", "total_tokens"],
        "properties": {
            "prompt_tokens": {"type": "integer"},
            "completion_tokens": {"type": "integer"},
            "total_tokens": {"type": "integer"},
        },
    },
    "Source": {
        "type": "object",
        "description": "A document chunk the answer drew on ([n] in the answer is sources[n-1]).",
        "properties": {
            "document_id": {"type": "integer"},
            "title": {"type": "string"},
            "page": {"type": ["integer", "null"]},
            "snippet": {"type": "string"},
            "score": {"type": "number"},
            "collection_id": {"type": "integer"},
        },
    },
    "BreezeWebResponse": {
        "type": "object",
        "description": "BreezeWeb's extension of the response (openai client: "
        "`completion.model_extra['breezeweb']`).",
        "properties": {
            "runner": {"type": "string", "description": "The runner that answered."},
            "model_id": {"type": "string"},
            "fallback": {
                "type": "boolean",
                "description": "True when a higher-priority runner failed first.",
            },
            "sources": {"type": "array", "items": _ref("Source")},
            "notices": {
                "type": "array",
                "items": {"type": "object"},
                "description": "e.g. {code: trimmed} when old turns were left out to fit "
                "the context, {code: fallback} when a runner failed.",
            },
            "blocked": {
                "type": "string",
                "description": "Set when an output rule stopped the answer "
                "(finish_reason content_filter).",
            },
            "conversation_id": {"type": "integer", "description": "With save/conversation_id."},
        },
    },
    "ChatCompletion": {
        "type": "object",
        "required": ["id", "object", "created", "model", "choices", "usage"],
        "properties": {
            "id": {"type": "string"},
            "object": {"const": "chat.completion"},
            "created": {"type": "integer"},
            "model": {"type": "string", "description": "The runner that answered."},
            "choices": {
                "type": "array",
                "items": {
                    "type": "object",
                    "properties": {
                        "index": {"type": "integer"},
                        "message": {
                            "type": "object",
                            "properties": {
                                "role": {"const": "assistant"},
                                "content": {"type": ["string", "null"]},
                                "refusal": {"type": "null"},
                                "tool_calls": {"type": "array", "items": _ref("ToolCall")},
                            },
                        },
                        "finish_reason": {
                            "enum": ["stop", "length", "tool_calls", "content_filter"]
                        },
                    },
                },
            },
            "usage": _ref("Usage"),
            "breezeweb": _ref("BreezeWebResponse"),
        },
    },
    "ChatCompletionChunk": {
        "type": "object",
        "description": "One `data:` event of a stream. The first carries "
        "delta.role; the one with finish_reason carries `breezeweb`; with "
        "stream_options.include_usage a last chunk has empty choices and `usage` (and "
        "`breezeweb` again). The stream ends with `data: [DONE]`. An error after the "
        "stream began arrives as a `data:` event holding an OpenAIError, then [DONE].",
        "required": ["id", "object", "created", "model", "choices"],
        "properties": {
            "id": {"type": "string"},
            "object": {"const": "chat.completion.chunk"},
            "created": {"type": "integer"},
            "model": {"type": "string"},
            "choices": {
                "type": "array",
                "items": {
                    "type": "object",
                    "properties": {
                        "index": {"type": "integer"},
                        "delta": {
                            "type": "object",
                            "properties": {
                                "role": {"const": "assistant"},
                                "content": {"type": "string"},
                                "tool_calls": {"type": "array", "items": {"type": "object"}},
                            },
                        },
                        "finish_reason": {
                            "enum": ["stop", "length", "tool_calls", "content_filter", None]
                        },
                    },
                },
            },
            "usage": {"anyOf": [_ref("Usage"), {"type": "null"}]},
            "breezeweb": _ref("BreezeWebResponse"),
        },
    },
    # ---- conversations and runners ----
    "ConversationSummary": {
        "type": "object",
        "properties": {
            "id": {"type": "integer"},
            "title": {"type": "string"},
            "updated_at": {"type": "string", "format": "date-time"},
        },
    },
    "StoredMessage": {
        "type": "object",
        "properties": {
            "id": {"type": "integer"},
            "role": {"enum": ["system", "user", "assistant", "tool"]},
            "content": {"type": "string"},
            "images": {"type": "array", "items": {"type": "string"}},
            "status": {"enum": ["complete", "streaming", "stopped", "failed"]},
            "runner": {"type": "string"},
            "model": {"type": "string"},
            "fallback": {"type": "boolean"},
            "finish_reason": {"type": "string"},
            "usage": {"type": "object"},
            "timings": {"type": "object"},
            "sources": {"type": "array", "items": _ref("Source")},
            "error_code": {"type": "string"},
            "error": {"type": "string"},
            "created_at": {"type": "string", "format": "date-time"},
        },
    },
    "Conversation": {
        "type": "object",
        "properties": {
            "id": {"type": "integer"},
            "title": {"type": "string"},
            "pinned_runner": {"type": ["string", "null"]},
            "rag": {"type": "boolean"},
            "collections": {"type": "array", "items": {"type": "integer"}},
            "messages": {"type": "array", "items": _ref("StoredMessage")},
        },
    },
    "Runner": {
        "type": "object",
        "properties": {
            "name": {"type": "string"},
            "kind": {"type": "string"},
            "capabilities": {"type": "array", "items": {"enum": ["llm", "vlm", "agent"]}},
            "model_id": {"type": "string"},
            "priority": {"type": "integer"},
        },
    },
    # ---- documents ----
    "Document": {
        "type": "object",
        "properties": {
            "id": {"type": "integer"},
            "title": {"type": "string"},
            "status": {"enum": ["queued", "processing", "ready", "failed"]},
            "progress": {"type": "number", "minimum": 0, "maximum": 1},
            "error": {"type": "string", "description": "Why ingestion failed."},
            "chunk_count": {"type": "integer"},
            "collection_id": {"type": "integer"},
            "size": {"type": "integer"},
            "mime": {"type": "string"},
            "sha256": {"type": "string"},
            "page_count": {"type": ["integer", "null"]},
            "created_at": {"type": "string", "format": "date-time"},
            "updated_at": {"type": "string", "format": "date-time"},
        },
    },
    "Collection": {
        "type": "object",
        "properties": {
            "id": {"type": "integer"},
            "name": {"type": "string"},
            "personal": {"type": "boolean"},
            "shared": {"type": "boolean"},
            "owner": {"type": ["string", "null"]},
            "writable": {"type": "boolean"},
            "top_k": {"type": "integer"},
            "score_floor": {"type": "number"},
        },
    },
    "SearchRequest": {
        "type": "object",
        "required": ["query"],
        "properties": {
            "query": {"type": "string", "minLength": 1, "maxLength": 4000},
            "collections": {"type": "array", "items": {"type": "integer"}},
            "k": {"type": "integer", "minimum": 1, "maximum": 50},
            "mode": {
                "enum": ["vector", "keyword", "hybrid"],
                "description": "Overrides each collection's search mode (default: hybrid).",
            },
        },
    },
    "SearchResult": {
        "allOf": [
            _ref("Source"),
            {
                "type": "object",
                "properties": {
                    "rank": {"type": "integer"},
                    "text": {"type": "string", "description": "The whole chunk."},
                    "section": {"type": "string", "description": "Its heading path."},
                    "chunk_id": {"type": "string"},
                    "vector_score": {"type": ["number", "null"]},
                    "keyword_score": {"type": ["number", "null"]},
                    "fused_score": {"type": ["number", "null"]},
                    "rerank_score": {"type": ["number", "null"]},
                },
            },
        ]
    },
}

_AUTH_ERRORS = {
    "401": _openai_error("No key or session, or an invalid or revoked key."),
    "403": _openai_error("Session authentication without a valid CSRF token."),
    "429": _openai_error("The key's request rate is exceeded.", **_RETRY),
}
_API_AUTH_ERRORS = {
    "401": _error("No key or session, or an invalid or revoked key."),
    "403": _error("Session authentication without a valid CSRF token, or not allowed."),
}
_SECURITY = [{"bearerAuth": []}, {"sessionAuth": []}]

PATHS: dict[str, Any] = {
    "/v1/models": {
        "get": {
            "tags": ["OpenAI-compatible"],
            "operationId": "listModels",
            "summary": "List the models",
            "description": "`auto` (the router's choice) and every enabled runner config.",
            "security": _SECURITY,
            "responses": {"200": _json(_ref("ModelList"), "The models."), **_AUTH_ERRORS},
        }
    },
    "/v1/models/{model_id}": {
        "get": {
            "tags": ["OpenAI-compatible"],
            "operationId": "getModel",
            "summary": "One model",
            "security": _SECURITY,
            "parameters": [
                {"name": "model_id", "in": "path", "required": True, "schema": {"type": "string"}}
            ],
            "responses": {
                "200": _json(_ref("Model"), "The model."),
                "404": _openai_error("No such enabled model (code model_not_found)."),
                **_AUTH_ERRORS,
            },
        }
    },
    "/v1/chat/completions": {
        "post": {
            "tags": ["OpenAI-compatible"],
            "operationId": "createChatCompletion",
            "summary": "Answer a conversation",
            "description": "One turn through the guardian, retrieval (breezeweb.rag), the "
            "router (with fallback) and the output rules. Stateless unless "
            "breezeweb.save or breezeweb.conversation_id is given. With `stream: true` "
            "the answer is a text/event-stream of ChatCompletionChunk objects ending "
            "with `data: [DONE]`.",
            "security": _SECURITY,
            "requestBody": {
                "required": True,
                "content": {"application/json": {"schema": _ref("ChatCompletionRequest")}},
            },
            "responses": {
                "200": {
                    "description": "The completion (JSON), or its stream (SSE).",
                    "content": {
                        "application/json": {"schema": _ref("ChatCompletion")},
                        "text/event-stream": {"schema": _ref("ChatCompletionChunk")},
                    },
                },
                "400": _openai_error(
                    "A malformed request (invalid_json, invalid_type, invalid_value, "
                    "empty_array, ...; `param` names the field), an invalid image "
                    "(invalid_image), a blocked message (content_blocked), a message too "
                    "long for the model (invalid_input), or a chosen model without the "
                    "capability the request needs (model_not_capable)."
                ),
                "404": _openai_error(
                    "Unknown or disabled model (model_not_found), collection "
                    "(collection_not_found) or conversation (conversation_not_found)."
                ),
                "413": _openai_error("The body exceeds DATA_UPLOAD_MAX_MEMORY_SIZE."),
                "429": _openai_error(
                    "The key's request rate (rate_limit_exceeded) or concurrent streams "
                    "(too_many_concurrent_streams) are exceeded.",
                    **_RETRY,
                ),
                "502": _openai_error(
                    "The runner failed (runner_error) or refused BreezeWeb's own "
                    "credentials (runner_auth_failed)."
                ),
                "503": _openai_error(
                    "No runner can answer now (runner_unavailable, runner_rate_limited) "
                    "or, with auto, none has the needed capability (no_runner_available).",
                    **_RETRY,
                ),
                "504": _openai_error("The runner timed out (runner_timeout)."),
                "401": _AUTH_ERRORS["401"],
                "403": _AUTH_ERRORS["403"],
            },
        }
    },
    "/api/conversations": {
        "get": {
            "tags": ["Conversations"],
            "operationId": "listConversations",
            "summary": "Your conversations, newest first",
            "security": _SECURITY,
            "parameters": [
                {
                    "name": "q",
                    "in": "query",
                    "required": False,
                    "schema": {"type": "string"},
                    "description": "Only titles containing these words.",
                }
            ],
            "responses": {
                "200": _json(
                    {
                        "type": "object",
                        "properties": {
                            "conversations": {
                                "type": "array",
                                "items": _ref("ConversationSummary"),
                            }
                        },
                    },
                    "The conversations.",
                ),
                **_API_AUTH_ERRORS,
            },
        }
    },
    "/api/conversations/{conversation_id}": {
        "parameters": [
            {
                "name": "conversation_id",
                "in": "path",
                "required": True,
                "schema": {"type": "integer"},
            }
        ],
        "get": {
            "tags": ["Conversations"],
            "operationId": "getConversation",
            "summary": "One conversation with its messages",
            "description": "Also the conversations recorded through "
            "`/v1/chat/completions` with `breezeweb.save`.",
            "security": _SECURITY,
            "responses": {
                "200": _json(_ref("Conversation"), "The conversation."),
                "404": _error("Not there, or not yours (not_found)."),
                **_API_AUTH_ERRORS,
            },
        },
        "patch": {
            "tags": ["Conversations"],
            "operationId": "renameConversation",
            "summary": "Rename a conversation",
            "security": _SECURITY,
            "requestBody": {
                "required": True,
                "content": {
                    "application/json": {
                        "schema": {
                            "type": "object",
                            "required": ["title"],
                            "properties": {"title": {"type": "string", "maxLength": 200}},
                        }
                    }
                },
            },
            "responses": {
                "200": _json(_ref("ConversationSummary"), "Renamed."),
                "400": _error("Bad JSON or title (bad_json, bad_title)."),
                "404": _error("Not there, or not yours (not_found)."),
                **_API_AUTH_ERRORS,
            },
        },
        "delete": {
            "tags": ["Conversations"],
            "operationId": "deleteConversation",
            "summary": "Delete a conversation and its messages",
            "security": _SECURITY,
            "responses": {
                "204": {"description": "Deleted."},
                "404": _error("Not there, or not yours (not_found)."),
                **_API_AUTH_ERRORS,
            },
        },
    },
    "/api/runners": {
        "get": {
            "tags": ["Conversations"],
            "operationId": "listRunners",
            "summary": "The enabled runners (for a runner picker)",
            "security": _SECURITY,
            "responses": {
                "200": _json(
                    {
                        "type": "object",
                        "properties": {"runners": {"type": "array", "items": _ref("Runner")}},
                    },
                    "Highest priority first; no secrets.",
                ),
                **_API_AUTH_ERRORS,
            },
        }
    },
    "/api/documents": {
        "get": {
            "tags": ["Documents"],
            "operationId": "listDocuments",
            "summary": "List the documents you may read",
            "security": _SECURITY,
            "parameters": [
                {
                    "name": "collection",
                    "in": "query",
                    "required": False,
                    "schema": {"type": "integer"},
                    "description": "Only this collection's documents.",
                }
            ],
            "responses": {
                "200": _json(
                    {
                        "type": "object",
                        "properties": {"documents": {"type": "array", "items": _ref("Document")}},
                    },
                    "The newest 500 documents.",
                ),
                "400": _error("A collection that is not an id (bad_collection)."),
                **_API_AUTH_ERRORS,
            },
        },
        "post": {
            "tags": ["Documents"],
            "operationId": "uploadDocuments",
            "summary": "Upload documents",
            "description": "multipart/form-data with one or more `file` fields (txt, md, "
            "pdf, html, docx; each within UPLOAD_MAX_BYTES) and an optional "
            "`collection` id (default: your personal collection). Ingestion runs in the "
            "background: poll the document (or watch the websocket) for its status.",
            "security": _SECURITY,
            "requestBody": {
                "required": True,
                "content": {
                    "multipart/form-data": {
                        "schema": {
                            "type": "object",
                            "required": ["file"],
                            "properties": {
                                "file": {
                                    "type": "array",
                                    "items": {"type": "string", "format": "binary"},
                                },
                                "collection": {"type": "integer"},
                            },
                        }
                    }
                },
            },
            "responses": {
                "201": _json(
                    {
                        "type": "object",
                        "properties": {
                            "documents": {"type": "array", "items": _ref("Document")},
                            "errors": {
                                "type": "array",
                                "items": {"type": "object"},
                                "description": "Files that were refused, with reasons.",
                            },
                        },
                    },
                    "At least one file was accepted.",
                ),
                "400": _error("No file, too many files, a malformed body, or every file refused."),
                "404": _error("No such collection (collection_not_found)."),
                "413": _error("A file or the whole body is too large."),
                **_API_AUTH_ERRORS,
            },
        },
    },
    "/api/documents/{document_id}": {
        "parameters": [
            {"name": "document_id", "in": "path", "required": True, "schema": {"type": "integer"}}
        ],
        "get": {
            "tags": ["Documents"],
            "operationId": "getDocument",
            "summary": "One document and its ingestion status",
            "security": _SECURITY,
            "responses": {
                "200": _json(
                    {"type": "object", "properties": {"document": _ref("Document")}},
                    "The document.",
                ),
                "404": _error("No such document you may read (document_not_found)."),
                **_API_AUTH_ERRORS,
            },
        },
        "delete": {
            "tags": ["Documents"],
            "operationId": "deleteDocument",
            "summary": "Delete a document, its file and every chunk",
            "security": _SECURITY,
            "responses": {
                "200": _json(
                    {"type": "object", "properties": {"deleted": {"type": "integer"}}},
                    "Deleted.",
                ),
                "404": _error("No such document you may read (document_not_found)."),
                "503": _error("The vector store is unreachable; nothing was deleted."),
                **_API_AUTH_ERRORS,
            },
        },
    },
    "/api/documents/{document_id}/reingest": {
        "parameters": [
            {"name": "document_id", "in": "path", "required": True, "schema": {"type": "integer"}}
        ],
        "post": {
            "tags": ["Documents"],
            "operationId": "reingestDocument",
            "summary": "Index a document again",
            "security": _SECURITY,
            "responses": {
                "202": _json(
                    {"type": "object", "properties": {"document": _ref("Document")}},
                    "Queued for ingestion.",
                ),
                "404": _error("No such document you may read (document_not_found)."),
                "410": _error("The stored file is gone (file_missing)."),
                **_API_AUTH_ERRORS,
            },
        },
    },
    "/api/collections": {
        "get": {
            "tags": ["Documents"],
            "operationId": "listCollections",
            "summary": "The collections you may read",
            "description": "Your personal collection first (created on first use).",
            "security": _SECURITY,
            "responses": {
                "200": _json(
                    {
                        "type": "object",
                        "properties": {
                            "collections": {"type": "array", "items": _ref("Collection")}
                        },
                    },
                    "The collections.",
                ),
                **_API_AUTH_ERRORS,
            },
        }
    },
    "/api/search": {
        "post": {
            "tags": ["Documents"],
            "operationId": "search",
            "summary": "Search your documents (no generation)",
            "security": _SECURITY,
            "requestBody": {
                "required": True,
                "content": {"application/json": {"schema": _ref("SearchRequest")}},
            },
            "responses": {
                "200": _json(
                    {
                        "type": "object",
                        "properties": {
                            "query": {"type": "string"},
                            "results": {"type": "array", "items": _ref("SearchResult")},
                        },
                    },
                    "Ranked chunks above each collection's score floor.",
                ),
                "400": _error("Bad JSON, query, collections or k."),
                **_API_AUTH_ERRORS,
            },
        }
    },
    "/healthz": {
        "get": {
            "tags": ["Operations"],
            "operationId": "healthz",
            "summary": "Liveness: the process answers",
            "security": [],
            "responses": {
                "200": _json(
                    {"type": "object", "properties": {"status": {"const": "ok"}}}, "Alive."
                )
            },
        }
    },
    "/readyz": {
        "get": {
            "tags": ["Operations"],
            "operationId": "readyz",
            "summary": "Readiness: database, vector store, and one healthy runner",
            "security": [],
            "responses": {
                "200": _json(
                    {
                        "type": "object",
                        "properties": {
                            "status": {"enum": ["ready"]},
                            "checks": {"type": "object"},
                        },
                    },
                    "Ready.",
                ),
                "503": _json(
                    {
                        "type": "object",
                        "properties": {
                            "status": {"enum": ["not ready"]},
                            "checks": {"type": "object"},
                        },
                    },
                    "Not ready; `checks` says what failed.",
                ),
            },
        }
    },
}


@cache
def build_schema() -> dict[str, Any]:
    """The whole OpenAPI 3.1 document (built once per process)."""
    return {
        "openapi": OPENAPI_VERSION,
        "info": {
            "title": "BreezeWeb HTTP API",
            "version": API_VERSION,
            "description": "OpenAI-compatible chat completions and models, the documents "
            "API, and health endpoints. Authenticate with `Authorization: Bearer <API "
            "key>` (keys are created at /settings/api-keys/) or, from the browser, the "
            "session cookie plus the X-CSRFToken header on unsafe methods.",
        },
        "servers": [{"url": "/"}],
        "tags": [
            {"name": "OpenAI-compatible", "description": "Use any OpenAI client."},
            {"name": "Conversations", "description": "The chat's saved conversations."},
            {"name": "Documents", "description": "Upload and search documents for RAG."},
            {"name": "Operations", "description": "Health checks for load balancers."},
        ],
        "paths": PATHS,
        "components": {
            "schemas": SCHEMAS,
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


# ---- the reference page ---------------------------------------------------------------


@dataclass(frozen=True)
class Row:
    """One line of a schema table: a field, its type, and how deep it sits."""

    name: str
    type: str
    ref: str
    required: bool
    description: str
    depth: int


def _inline_code(text: str) -> SafeString:
    """Escaped text with `backticked` spans as <code>, for the docs page."""
    parts = escape(text).split("`")
    html = "".join(f"<code>{p}</code>" if i % 2 else p for i, p in enumerate(parts))
    return mark_safe(html)  # noqa: S308 (built from escaped text only)


def _type_label(schema: dict[str, Any]) -> tuple[str, str]:
    """A short type for people, and the component it refers to (if any)."""
    if "$ref" in schema:
        name = schema["$ref"].rsplit("/", 1)[-1]
        return name, name
    if "const" in schema:
        return repr(schema["const"]).replace("'", '"'), ""
    if "enum" in schema:
        return "one of " + ", ".join("null" if v is None else str(v) for v in schema["enum"]), ""
    for key in ("anyOf", "oneOf", "allOf"):
        if key in schema:
            labels = [_type_label(s)[0] for s in schema[key]]
            return (" & " if key == "allOf" else " | ").join(labels), ""
    kind = schema.get("type", "any")
    if isinstance(kind, list):
        kind = " | ".join(kind)
    if kind == "array" and "items" in schema:
        item, ref = _type_label(schema["items"])
        return f"array of {item}", ref
    if schema.get("format"):
        kind = f"{kind} ({schema['format']})"
    return kind, ""


def _limits(schema: dict[str, Any]) -> str:
    parts = []
    for key, word in (
        ("minimum", "≥"),
        ("maximum", "≤"),
        ("minItems", "min items"),
        ("maxItems", "max items"),
        ("minLength", "min length"),
        ("maxLength", "max length"),
        ("pattern", "pattern"),
    ):
        if key in schema:
            parts.append(f"{word} {schema[key]}")
    return "; ".join(parts)


def schema_rows(schema: dict[str, Any], depth: int = 0) -> list[Row]:
    """The fields of an object schema (nested objects inline, $refs as links)."""
    rows: list[Row] = []
    required = set(schema.get("required", ()))
    for name, prop in schema.get("properties", {}).items():
        label, ref = _type_label(prop)
        description = prop.get("description", "")
        limits = _limits(prop)
        if limits:
            description = f"{description} ({limits})" if description else limits
        rows.append(Row(name, label, ref, name in required, _inline_code(description), depth))
        if prop.get("type") in ("object", ["object", "null"]) and "properties" in prop:
            rows.extend(schema_rows(prop, depth + 1))
        items = prop.get("items", {})
        if prop.get("type") == "array" and "properties" in items:
            rows.extend(schema_rows(items, depth + 1))
    return rows


def _operations() -> list[dict[str, Any]]:
    ops = []
    for path, item in PATHS.items():
        for method, op in item.items():
            if method == "parameters":
                continue
            body_ref = ""
            body_type = ""
            if "requestBody" in op:
                content_type, media = next(iter(op["requestBody"]["content"].items()))
                body_type = content_type
                schema = media["schema"]
                body_ref = schema.get("$ref", "").rsplit("/", 1)[-1]
                body_rows = [] if body_ref else schema_rows(schema)
            else:
                body_rows = []
            responses = []
            for status, response in op["responses"].items():
                refs = [
                    _type_label(media["schema"]) for media in response.get("content", {}).values()
                ]
                responses.append(
                    {
                        "status": status,
                        "description": _inline_code(response["description"]),
                        "types": refs,
                        "headers": list(response.get("headers", {})),
                    }
                )
            ops.append(
                {
                    "anchor": op["operationId"],
                    "method": method,
                    "path": path,
                    "tag": op["tags"][0],
                    "summary": op["summary"],
                    "description": _inline_code(op.get("description", "")),
                    "auth": bool(op.get("security", _SECURITY)),
                    "parameters": [*item.get("parameters", []), *op.get("parameters", [])],
                    "body_type": body_type,
                    "body_ref": body_ref,
                    "body_rows": body_rows,
                    "responses": responses,
                }
            )
    return ops


@cache
def _docs_context() -> dict[str, Any]:
    schema = build_schema()
    components = []
    for name, component in SCHEMAS.items():
        label, _ = _type_label(component) if "properties" not in component else ("object", "")
        components.append(
            {
                "name": name,
                "description": _inline_code(component.get("description", "")),
                "type": label,
                "rows": schema_rows(component),
            }
        )
    return {
        "info": {**schema["info"], "description": _inline_code(schema["info"]["description"])},
        "openapi": schema["openapi"],
        "operations": _operations(),
        "components": components,
    }


@require_GET
def docs_view(request: HttpRequest) -> HttpResponse:
    """`GET /api/docs`: the schema as a readable page, rendered on the server."""
    return render(request, "api/docs.html", _docs_context())
