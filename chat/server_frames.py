"""The frames the server sends on `/ws/chat/`, declared once (docs/websocket.md).

chat/frames.py declares what a client sends; this module declares what it
receives, as pydantic models, one per `type`. The code builds the frames as
dicts on the token path (no model is built per frame); these models describe
them for clients, in the OpenAPI document's components (`GET /api/schema`,
`WsServerFrame` and one `Ws...` schema per type, rendered on `/api/docs`), and
the test run holds every frame the consumer sends to them
(tests/support/conformance.py): a field the code adds without declaring it
here is a test failure, so the description cannot drift from the frames.
"""

from __future__ import annotations

import operator
from functools import reduce
from typing import Annotated, Any, Literal, get_type_hints

from pydantic import BaseModel, Field, create_model

from chat import models as chat_models
from chat.errors import WEBSOCKET_CODES
from chat.turns import FINISH_REASONS
from rag import models as rag_models
from rag.retrieval import Source
from runners.base import NoticeCode


class ServerFrame(BaseModel):
    """What every frame the server sends carries."""

    type: str
    request_id: str | None = Field(
        description="The request it answers; null on frames that answer none (`document_status`)."
    )


def _literal(values: Any) -> Any:
    return Literal[tuple(sorted(values))]


# `type` -> its model, in the order docs/websocket.md lists them.
FRAMES: dict[str, type[ServerFrame]] = {}


def _frame(kind: str, doc: str, **fields: Any) -> None:
    name = "Ws" + "".join(part.title() for part in kind.split("_"))
    spec = {key: v if isinstance(v, tuple) else (v, ...) for key, v in fields.items()}
    FRAMES[kind] = create_model(
        name, __base__=ServerFrame, __doc__=doc, type=(Literal[kind], ...), **spec
    )


def _about(kind: Any, description: str, default: Any = ...) -> tuple[Any, Any]:
    return kind, Field(default, description=description)


_CITED = ("document_id", "title", "page", "snippet", "score", "collection_id")
_SOURCE = get_type_hints(Source)
WsSource = create_model(
    "WsSource",
    __doc__="A document chunk the answer draws on (`[n]` in the answer is `sources[n-1]`).",
    **{key: (_SOURCE[key], ...) for key in _CITED},
)
_ROUTING = {
    "runner": _about(str, "The runner answering."),
    "model": str,
    "fallback": _about(bool, "Another runner was tried first."),
}
_TOOL_CALL = {
    "id": _about(str, "The model's tool-call id."),
    "name": str,
    "arguments": _about(str, "The arguments, a JSON string (possibly malformed)."),
}
_STEP_STATUS = Literal["running", "awaiting_approval", "ok", "error", "denied", "cancelled"]

_frame(
    "accepted",
    "The request was accepted and its user turn saved.",
    conversation_id=int,
    user_message_id=int,
    assistant_message_id=int,
    title=_about(str, "The conversation's (a new one is titled from its first message)."),
)
_frame("sources", "What the answer draws on (RAG).", sources=list[WsSource])
_frame(
    "routed",
    "The runner chosen; sent again when a fallback happens before the first token.",
    **_ROUTING,
    attempts=_about(list[str], "The runners tried, in order."),
)
_frame(
    "notice",
    "Something the user should know about this answer.",
    code=_literal(NoticeCode),
    message=_about(str, "In English (the chat page translates by `code`)."),
    data=_about(dict[str, Any], "The code's details (docs/websocket.md)."),
)
_frame(
    "token",
    "Answer text: concatenate `text` in order.",
    text=str,
    seq=_about(int, "The answer's length in characters once `text` is appended."),
)
_frame(
    "tool_call",
    "A tool call: the client's to run, or (agent mode, with `step_id`) BreezeWeb's.",
    **_TOOL_CALL,
    step_id=_about(int | None, "Agent mode: the saved step.", None),
    round=_about(int | None, "Agent mode: the model round that asked (1-based).", None),
)
_frame(
    "approval_request",
    "Agent mode: a call that waits for the user's `approve` frame.",
    step_id=int,
    **_TOOL_CALL,
    timeout_s=_about(float, "After this the call counts as denied."),
)
_frame(
    "tool_result",
    "Agent mode: how a tool call ended.",
    step_id=int | None,
    round=int,
    **_TOOL_CALL,
    status=_STEP_STATUS,
    result=_about(str, "What the model was told (status ok)."),
    error=_about(str, "Why it failed, as told to the model."),
    duration_ms=float | None,
    sources=list[dict[str, Any]],
)
_frame("approval", "The answer to an `approve` frame.", step_id=int, approved=bool)
_frame(
    "error",
    "A refusal or a failure; a failure after `accepted` is followed by `done`. "
    "Some codes add fields (`quota_exceeded`: `quota`).",
    code=_literal(WEBSOCKET_CODES),
    message=str,
    retryable=_about(bool, "Whether trying again can help."),
    retry_after_s=_about(int | None, "Whole seconds (>= 1) to wait, when known.", None),
    quota=_about(
        dict[str, Any] | None,
        "`quota_exceeded`: the budget that is spent (as `GET /api/usage` shows it).",
        None,
    ),
)
_frame(
    "done",
    "The request ended: exactly one per accepted request.",
    conversation_id=int,
    message_id=int,
    status=_literal(chat_models.Message.Status.values),
    **_ROUTING,
    finish_reason=_literal(FINISH_REASONS),
    usage=create_model(
        "WsUsage", prompt_tokens=(int | None, ...), completion_tokens=(int | None, ...)
    ),
    timings=create_model(
        "WsTimings",
        time_to_first_token_ms=(float | None, ...),
        tokens_per_second=(float | None, ...),
        total_ms=(float | None, ...),
    ),
    cost=_about(
        create_model("WsCost", amount=(float, ...), currency=(str, ...)) | None,
        "At the runner's price; null when it has none.",
    ),
)
_frame(
    "sync",
    "The answer to an `attach`, before its live frames.",
    conversation_id=int,
    message_id=int,
    text=_about(str, "The answer after `since`."),
    since=int,
    seq=_about(int, "Where the answer now ends."),
    live=_about(bool, "True: live frames follow; false: the saved text."),
    status=_literal(chat_models.Message.Status.values),
    **_ROUTING,
    sources=list[WsSource],
)
_frame(
    "document_status",
    "Live progress of one of your document uploads (any socket of yours).",
    document=create_model(
        "WsDocument",
        id=(int, ...),
        title=(str, ...),
        status=(_literal(rag_models.Document.Status.values), ...),
        progress=(float, Field(ge=0, le=1)),
        error=(str, ...),
        chunk_count=(int, ...),
        collection_id=(int, ...),
    ),
)
_frame("pong", "The answer to `ping`.")

WsServerFrame = Annotated[reduce(operator.or_, FRAMES.values()), Field(discriminator="type")]
"""Any frame the server sends, told apart by `type`."""
