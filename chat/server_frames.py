"""The frames the server sends on `/ws/chat/`, declared once (docs/websocket.md).

chat/frames.py declares what a client sends; this module declares what it
receives, as pydantic models, one per `type`. The code builds the frames as
dicts on the token path (no model is built per frame); these models describe
them for clients, in the OpenAPI document's components (`GET /api/schema`,
`WsServerFrame` and one `Ws...` schema per type, rendered on `/api/docs`), and
the test run holds every frame the consumer sends to them
(tests/support/conformance.py): a field the code adds without declaring it
here is a test failure, so the description cannot drift from the frames.
The parts the HTTP API's answers carry too (`Source`, `Cost`, `AgentStep`)
are declared here once; api/schemas.py uses them.
"""

from __future__ import annotations

import operator
from functools import reduce
from typing import Annotated, Any, Literal, get_type_hints

from pydantic import BaseModel, Field

from chat import models as chat_models
from chat.errors import WEBSOCKET_CODES
from chat.turns import FINISH_REASONS
from core.schema import about, declare, one_of
from rag import models as rag_models
from rag import retrieval
from runners.base import NoticeCode


class ServerFrame(BaseModel):
    """What every frame the server sends carries."""

    type: str
    request_id: str | None = Field(
        description="The request it answers; null on frames that answer none (`document_status`)."
    )


# ---- parts the HTTP API's answers carry too (api/schemas.py uses these) ----------------------

_CHUNK = get_type_hints(retrieval.Source)
Source = declare(
    "Source",
    BaseModel,
    "A document chunk the answer drew on (`[n]` in the answer is `sources[n-1]`).",
    **{key: _CHUNK[key] for key in retrieval.CITED_FIELDS},
)
Cost = declare(
    "Cost",
    BaseModel,
    amount=about(float, "Prompt and answer tokens at the runner's prices."),
    currency=str,
)
AgentStep = declare(
    "AgentStep",
    BaseModel,
    "One server-side tool call of an agent turn (`breezeweb.agent`), as agents.loop.Step "
    "describes it.",
    step_id=about(int | None, "Its saved id (websocket turns); null on /v1."),
    round=about(int, "The model round that asked for it (1-based)."),
    id=about(str, "The model's tool-call id."),
    name=str,
    arguments=about(str, "The model's arguments, a JSON string (possibly malformed)."),
    status=about(
        Literal["running", "awaiting_approval", "ok", "error", "denied", "cancelled"],
        "`running` only in a `tool_call` event.",
    ),
    result=about(str, "What the model was told (status ok)."),
    error=about(str, "Why it failed, as told to the model."),
    duration_ms=float | None,
    sources=list[dict[str, Any]],
)

# ---- the frames ------------------------------------------------------------------------------

# `type` -> its model, in the order docs/websocket.md lists them.
FRAMES: dict[str, type[ServerFrame]] = {}


def _frame(kind: str, doc: str, base: Any = ServerFrame, **fields: Any) -> None:
    name = "Ws" + "".join(part.title() for part in kind.split("_"))
    FRAMES[kind] = declare(name, base, doc, type=Literal[kind], **fields)


_ROUTING = {
    "runner": about(str, "The runner answering."),
    "model": str,
    "fallback": about(bool, "Another runner was tried first."),
}
_TOOL_CALL = {
    "id": about(str, "The model's tool-call id."),
    "name": str,
    "arguments": about(str, "The arguments, a JSON string (possibly malformed)."),
}

_frame(
    "accepted",
    "The request was accepted and its user turn saved.",
    conversation_id=int,
    user_message_id=int,
    assistant_message_id=int,
    title=about(str, "The conversation's (a new one is titled from its first message)."),
)
_frame("sources", "What the answer draws on (RAG).", sources=list[Source])
_frame(
    "routed",
    "The runner chosen; sent again when a fallback happens before the first token.",
    **_ROUTING,
    attempts=about(list[str], "The runners tried, in order."),
)
_frame(
    "notice",
    "Something the user should know about this answer.",
    code=one_of(NoticeCode),
    message=about(str, "In English (the chat page translates by `code`)."),
    data=about(dict[str, Any], "The code's details (docs/websocket.md)."),
)
_frame(
    "token",
    "Answer text: concatenate `text` in order.",
    text=str,
    seq=about(int, "The answer's length in characters once `text` is appended."),
)
_frame(
    "tool_call",
    "A tool call: the client's to run, or (agent mode, with `step_id`) BreezeWeb's.",
    **_TOOL_CALL,
    step_id=about(int | None, "Agent mode: the saved step.", None),
    round=about(int | None, "Agent mode: the model round that asked (1-based).", None),
)
_frame(
    "approval_request",
    "Agent mode: a call that waits for the user's `approve` frame.",
    step_id=int,
    **_TOOL_CALL,
    timeout_s=about(float, "After this the call counts as denied."),
)
_frame("tool_result", "Agent mode: how a tool call ended.", (ServerFrame, AgentStep))
_frame("approval", "The answer to an `approve` frame.", step_id=int, approved=bool)
_frame(
    "error",
    "A refusal or a failure; a failure after `accepted` is followed by `done`. "
    "Some codes add fields (`quota_exceeded`: `quota`).",
    code=one_of(sorted(WEBSOCKET_CODES)),
    message=str,
    retryable=about(bool, "Whether trying again can help."),
    retry_after_s=about(int | None, "Whole seconds (>= 1) to wait, when known.", None),
    quota=about(
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
    status=one_of(chat_models.Message.Status.values),
    **_ROUTING,
    finish_reason=one_of(FINISH_REASONS),
    usage=declare("WsUsage", BaseModel, prompt_tokens=int | None, completion_tokens=int | None),
    timings=declare(
        "WsTimings",
        BaseModel,
        time_to_first_token_ms=float | None,
        tokens_per_second=float | None,
        total_ms=float | None,
    ),
    cost=about(Cost | None, "At the runner's price; null when it has none."),
)
_frame(
    "sync",
    "The answer to an `attach`, before its live frames.",
    conversation_id=int,
    message_id=int,
    text=about(str, "The answer after `since`."),
    since=int,
    seq=about(int, "Where the answer now ends."),
    live=about(bool, "True: live frames follow; false: the saved text."),
    status=one_of(chat_models.Message.Status.values),
    **_ROUTING,
    sources=list[Source],
)
_frame(
    "document_status",
    "Live progress of one of your document uploads (any socket of yours).",
    document=declare(
        "WsDocument",
        BaseModel,
        id=int,
        title=str,
        status=one_of(rag_models.Document.Status.values),
        progress=(float, Field(ge=0, le=1)),
        error=str,
        chunk_count=int,
        collection_id=int,
    ),
)
_frame("pong", "The answer to `ping`.")

WsServerFrame = Annotated[reduce(operator.or_, FRAMES.values()), Field(discriminator="type")]
"""Any frame the server sends, told apart by `type`."""
