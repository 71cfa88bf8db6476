"""The HTTP APIs' request and response bodies, declared once as pydantic models.

The same models validate requests (`parse`), describe them in the OpenAPI
document (api/openapi.py generates it with pydantic's JSON Schema) and feed the
fuzz suite, so a limit or a field cannot be enforced in one place and
documented differently in another. Every number comes from chat/limits.py.

Validation is strict (no coercion: `"1"` is not 1, `true` is not a number) and
runs after api.inputs has bounded the body's size, depth, integers and text.
A refusal is an `InputError(400, code, message, param)`: `error_for` turns
pydantic's first error into one of the documented codes, with `param` the
field's JSON path (`messages[2].content[1].type`).
"""

from __future__ import annotations

import operator
from datetime import datetime
from functools import reduce
from typing import Annotated, Any, Literal, get_type_hints

from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Discriminator,
    Field,
    PositiveInt,
    StringConstraints,
    Tag,
    ValidationError,
    WrapValidator,
    create_model,
    field_validator,
    model_validator,
)
from pydantic.json_schema import SkipJsonSchema
from pydantic_core import PydanticCustomError

from chat import limits
from chat import models as chat_models
from chat.frames import Sampling
from chat.inputs import InputError, json_path
from chat.server_frames import AgentStep, Cost, Source
from core.schema import about, declare, one_of
from rag import models as rag_models
from rag import retrieval
from rag.retrieval import MODES
from runners.base import SAMPLING_BOUNDS
from runners.registry import RUNNER_KINDS

# ---- from pydantic's errors to the documented codes -------------------------------------

# pydantic's error type -> the code /v1 answers; any other type is `invalid_type`.
# Codes raised by the models themselves (PydanticCustomError) pass through as they are.
CODES = {
    "missing": "missing_required_parameter",
    "too_short": "empty_array",
    "too_long": "array_too_long",
    "string_too_long": "string_above_max_length",
    "extra_forbidden": "unknown_parameter",
    "literal_error": "invalid_value",
    "string_pattern_mismatch": "invalid_value",
    "string_too_short": "invalid_value",
    "greater_than": "invalid_value",
    "greater_than_equal": "invalid_value",
    "less_than_equal": "invalid_value",
}
DEFAULT_CODE = "invalid_type"
CUSTOM_CODES = {"invalid_type", "invalid_value", "unsupported_value", "unsupported_content_type"}
# Union members are tagged "<field>=<tag>"; such a step of an error's location is no JSON key.
_TAG_MARK = "="


def error_for(exc: ValidationError, *, field_codes: bool = False) -> InputError:
    """The one mapping from a pydantic ValidationError to the API's error.
    /v1 codes say what is wrong (CODES); /api codes name the field
    (`field_codes`: `bad_<top-level field>`, as the /api endpoints always did)."""
    error = exc.errors(include_url=False)[0]
    ctx = error.get("ctx") or {}
    kind = error["type"]
    last = len(error["loc"]) - 1  # an unknown key may hold anything, "=" too
    loc = tuple(
        step
        for i, step in enumerate(error["loc"])
        if not (
            isinstance(step, str) and _TAG_MARK in step and (i < last or kind != "extra_forbidden")
        )
    )
    loc += tuple(ctx.get("at", ()))  # a check on the whole object that names one field
    param = json_path(loc)
    if field_codes:
        code = f"bad_{loc[0]}" if loc else "bad_json"
    elif kind in CUSTOM_CODES or kind == "string_above_max_length":
        code = kind
    elif kind == "missing" and len(loc) > 1:
        code = DEFAULT_CODE  # a nested field: its object is malformed
    else:
        code = CODES.get(kind, DEFAULT_CODE)
    message = error["msg"].rstrip(".")
    return InputError(400, code, f"`{param}`: {message}." if param else f"{message}.", param)


def parse[M: BaseModel](model: type[M], body: Any, *, field_codes: bool = False) -> M:
    """`body` (decoded JSON) checked against `model`; raises InputError(400)."""
    if not isinstance(body, dict):
        code = "bad_json" if field_codes else "invalid_type"
        raise InputError(400, code, "The request body must be a JSON object.")
    try:
        return model.model_validate(body, strict=True)
    except ValidationError as exc:
        raise error_for(exc, field_codes=field_codes) from None


def coded(code: str, **by_type: str) -> WrapValidator:
    """Any error inside this field is `code` (or `by_type[pydantic type]`) at
    the field itself, not at a part of it (`breezeweb.collections`, not
    `breezeweb.collections[3]`)."""

    def wrap(value: Any, handler: Any) -> Any:
        try:
            return handler(value)
        except ValidationError as exc:
            error = exc.errors(include_url=False)[0]
            raise PydanticCustomError(by_type.get(error["type"], code), error["msg"]) from None

    return WrapValidator(wrap)


class _Choice(Discriminator):
    __hash__ = object.__hash__  # its error context is a dict; typing.Union hashes members


def tagged(members: dict[str, Any], choose: Any, code: str, message: str, at: tuple = ()) -> Any:
    """A union whose member `choose(value)` names (None: `code` at the field,
    plus `at`). Tags are "<field>=<value>" so that error_for can drop them."""
    union = [Annotated[kind, Tag(tag)] for tag, kind in members.items()]
    discriminator = _Choice(
        choose,
        custom_error_type=code,
        custom_error_message=message,
        custom_error_context={"at": at},
    )
    return Annotated[reduce(operator.or_, union), discriminator]


def by_key(key: str, fallback: str) -> Any:
    """Choose a member by `value[key]`; a value that is not an object goes to
    `fallback`, whose own check then says what is wrong with it."""

    def choose(value: Any) -> str | None:
        if not isinstance(value, dict):
            return f"{key}={fallback}"
        tag = value.get(key)
        return f"{key}={tag}" if isinstance(tag, str) else None

    return choose


class Body(BaseModel):
    """A request body: strict types; fields other than the declared ones are ignored."""

    model_config = ConfigDict(strict=True, extra="ignore", allow_inf_nan=False)


class Reply(BaseModel):
    """A response body (documentation: the views build these shapes)."""


# ---- POST /v1/chat/completions: the request --------------------------------------------

NonEmpty = Annotated[str, StringConstraints(min_length=1)]
MessageText = Annotated[str, StringConstraints(max_length=limits.MAX_TEXT_CHARS)]


class TextPart(Body):
    """A piece of a message's text."""

    type: Literal["text"]
    text: MessageText


class ImageURL(Body):
    url: Annotated[NonEmpty, coded("invalid_type")] = Field(
        description="`data:image/png;base64,...`"
    )
    detail: str | None = Field(None, description="`auto`, `low` or `high`; ignored.")


class ImagePart(Body):
    """User messages only: a base64 data URL of a PNG, JPEG, WebP or GIF image
    within IMAGE_MAX_BYTES (links are not fetched). Needs a model with `vlm`."""

    type: Literal["image_url"]
    image_url: ImageURL


def _no_image(value: Any) -> Any:
    raise PydanticCustomError("invalid_value", "Only user messages may carry images.")


_part = by_key("type", "text")
_bad_part = "A content part's `type` must be `text` or `image_url`."
UserPart = tagged(
    {"type=text": TextPart, "type=image_url": ImagePart},
    _part,
    "unsupported_content_type",
    _bad_part,
    ("type",),
)
TextOnlyPart = tagged(
    {
        "type=text": TextPart,
        "type=image_url": SkipJsonSchema[Annotated[Any, BeforeValidator(_no_image)]],
    },
    _part,
    "unsupported_content_type",
    _bad_part,
    ("type",),
)


def _content_of(part: Any) -> Any:
    """A message's `content`: a string, or an array of content parts."""
    return tagged(
        {"content=text": MessageText, "content=parts": list[part]},
        lambda v: (
            "content=text"
            if isinstance(v, str)
            else "content=parts"
            if isinstance(v, list)
            else None
        ),
        "invalid_type",
        "`content` must be a string or an array of content parts.",
    )


UserContent = _content_of(UserPart)
TextOnlyContent = _content_of(TextOnlyPart)


class ToolCallFunction(Body):
    name: str
    arguments: str = Field(description="The arguments, as a JSON string.")


class ToolCall(Body):
    """A call of a tool the model made."""

    id: str
    type: Literal["function"] = "function"
    function: ToolCallFunction


class _Message(Body):
    """One turn of the conversation."""

    @property
    def parts(self) -> list:
        content = getattr(self, "content", None)
        return [TextPart(type="text", text=content)] if isinstance(content, str) else content or []

    @property
    def text(self) -> str:
        return "\n".join(p.text for p in self.parts if isinstance(p, TextPart))

    @field_validator("content", check_fields=False)
    @classmethod
    def _text_fits(cls, content: Any) -> Any:
        if isinstance(content, list):
            size = sum(len(p.text) + 1 for p in content if isinstance(p, TextPart)) - 1
            if size > limits.MAX_TEXT_CHARS:
                raise PydanticCustomError(
                    "string_above_max_length",
                    f"The text is {size:,} characters; the limit is {limits.MAX_TEXT_CHARS:,}.",
                )
        return content


class SystemMessage(_Message):
    """Instructions for the model."""

    role: Literal["system"]
    content: TextOnlyContent


class DeveloperMessage(SystemMessage):
    """OpenAI's newer name for a system message; taken as `system`."""

    role: Literal["developer"]


class UserMessage(_Message):
    """The user's turn. The last message of a request must be one."""

    role: Literal["user"]
    content: UserContent = Field(description=f"At most {limits.MAX_IMAGES} image parts.")

    @field_validator("content")
    @classmethod
    def _image_count(cls, content: Any) -> Any:
        images = sum(isinstance(p, ImagePart) for p in content) if isinstance(content, list) else 0
        if images > limits.MAX_IMAGES:
            raise PydanticCustomError(
                "too_long", f"At most {limits.MAX_IMAGES} images per message; got {images}."
            )
        return content


class AssistantMessage(_Message):
    """An earlier answer. `content` may be null only with `tool_calls`."""

    role: Literal["assistant"]
    content: TextOnlyContent | None = None
    tool_calls: list[Annotated[ToolCall, coded("invalid_type")]] | None = None

    @model_validator(mode="after")
    def _says_something(self) -> AssistantMessage:
        if self.content is None and not self.tool_calls:
            raise PydanticCustomError(
                "invalid_type", "`content` is required without `tool_calls`.", {"at": ("content",)}
            )
        return self


class ToolMessage(_Message):
    """A tool's result, answering the assistant's tool call `tool_call_id`."""

    role: Literal["tool"]
    content: TextOnlyContent
    tool_call_id: Annotated[NonEmpty, coded("invalid_type")]


ROLES = {
    "role=system": SystemMessage,
    "role=developer": DeveloperMessage,
    "role=user": UserMessage,
    "role=assistant": AssistantMessage,
    "role=tool": ToolMessage,
}
Message = tagged(
    ROLES,
    by_key("role", "user"),
    "invalid_value",
    "`role` must be one of system, developer, user, assistant, tool.",
    ("role",),
)


class FunctionDefinition(Body):
    name: Annotated[
        str,
        Field(pattern=rf"^[A-Za-z0-9_-]{{1,{limits.MAX_TOOL_NAME_CHARS}}}$"),
        coded("invalid_value"),
    ] = Field(description=f"1-{limits.MAX_TOOL_NAME_CHARS} letters, digits, `_` or `-`.")
    description: str | None = None
    parameters: dict[str, Any] | None = Field(None, description="A JSON Schema object.")


class Tool(Body):
    """A function the model may call (needs a model with the `agent` capability)."""

    type: Literal["function"]
    function: FunctionDefinition


class StreamOptions(Body):
    include_usage: bool = Field(
        False, description="Send one last chunk with the `usage` (and `breezeweb` again)."
    )


class BreezeWebRequest(Body):
    """BreezeWeb's extension of the request (openai client: `extra_body`).
    Unknown fields are refused, so a typo does not silently turn RAG off."""

    model_config = ConfigDict(extra="forbid")

    rag: bool | None = Field(
        None,
        description="Answer from the user's documents (retrieval-augmented). "
        "Defaults to true when `collections` is given.",
    )
    collections: Annotated[list[PositiveInt], coded("invalid_type")] | None = Field(
        None, description="Collection ids to search (default: all the user may read)."
    )
    save: bool = Field(
        False,
        description="Record the request's messages and the answer as a new conversation "
        "(its id comes back in `breezeweb.conversation_id`).",
    )
    conversation_id: Annotated[PositiveInt, coded("invalid_type")] | None = Field(
        None,
        description="Append the last user message and the answer to this conversation of "
        "yours. The model still sees exactly the `messages` sent.",
    )
    agent: bool = Field(
        False,
        description="Agent mode: BreezeWeb runs its server-side tools (built-in and MCP, "
        "those you may use that need no approval) round after round until the answer; "
        "the steps come back in `breezeweb.steps` (streamed as `breezeweb.step` events). "
        "Your own `tools` still come back to you as `tool_calls`. Needs a runner with the "
        "`agent` capability.",
    )
    timezone: Annotated[str, Field(min_length=1, max_length=limits.MAX_TIMEZONE_CHARS)] | None = (
        Field(None, description="Your IANA time zone (e.g. Europe/Paris), for the time tool.")
    )

    @model_validator(mode="after")
    def _collections_need_rag(self) -> BreezeWebRequest:
        if self.collections and self.rag is False:
            raise PydanticCustomError(
                "invalid_value", "`collections` needs `rag` true.", {"at": ("collections",)}
            )
        return self


Tokens = Annotated[int, Field(ge=1, le=limits.MAX_TOKENS), coded("invalid_type")]
Stop = Annotated[
    list[NonEmpty],
    Field(max_length=limits.MAX_STOP_SEQUENCES),
    coded("invalid_value", list_type="invalid_type", string_type="invalid_type"),
    BeforeValidator(
        lambda v: [v] if isinstance(v, str) else v,
        json_schema_input_type=NonEmpty
        | Annotated[list[NonEmpty], Field(max_length=limits.MAX_STOP_SEQUENCES)],
    ),
]


class ChatCompletionRequest(Body, Sampling):
    """OpenAI's request shape, with vLLM's `top_k` and `repetition_penalty`.
    Other OpenAI fields (`user`, `logprobs`, ...) are accepted and ignored."""

    model_config = ConfigDict(
        json_schema_extra={
            "examples": [{"model": "auto", "messages": [{"role": "user", "content": "Hello!"}]}]
        }
    )

    model: Annotated[str, Field(pattern=r"\S"), coded("invalid_type")] = Field(
        description="A model id from `GET /v1/models`, or `auto` (the router)."
    )
    messages: list[Message] = Field(
        min_length=1,
        max_length=limits.MAX_MESSAGES,
        description="The conversation so far; the last message must be the user's.",
    )
    max_tokens: Tokens | None = Field(None, description="Capped by the runner's own max_tokens.")
    max_completion_tokens: Tokens | None = Field(
        None, description="Same as `max_tokens`; wins when both are given."
    )
    stop: Stop | None = Field(None, description="A string or an array of strings.")
    stream: bool | None = Field(
        None, description="Answer as Server-Sent Events of ChatCompletionChunk objects."
    )
    stream_options: StreamOptions | None = Field(None, description="Only with `stream: true`.")
    n: Annotated[Literal[1], coded("unsupported_value")] | None = Field(None, description="Only 1.")
    tools: list[Tool] | None = Field(None, max_length=limits.MAX_TOOLS)
    tool_choice: Annotated[Literal["auto", "none"], coded("unsupported_value")] | None = Field(
        None, description="Forcing a tool is not supported."
    )
    breezeweb: BreezeWebRequest | None = None

    @model_validator(mode="before")
    @classmethod
    def _absent(cls, data: Any) -> Any:
        """A null field is an absent one; `max_completion_tokens` wins over `max_tokens`."""
        data = {k: v for k, v in data.items() if v is not None}
        if "max_completion_tokens" in data:
            data.pop("max_tokens", None)
        return data

    @model_validator(mode="after")
    def _consistent(self) -> ChatCompletionRequest:
        last = len(self.messages) - 1
        if self.messages[last].role != "user":
            raise PydanticCustomError(
                "invalid_value",
                "The last message must be the user's.",
                {"at": ("messages", last, "role")},
            )
        if self.stream_options is not None and not self.stream:
            raise PydanticCustomError(
                "invalid_value",
                "`stream_options` is only allowed with `stream: true`.",
                {"at": ("stream_options",)},
            )
        return self


# ---- /api request bodies (their error codes name the field: `bad_<field>`) ---------------


class ConversationPatch(Body):
    """PATCH /api/conversations/{id}: any of its fields, at least one."""

    title: str | None = Field(
        None,
        description=f"The new title: control characters are removed, then it must be "
        f"1-{limits.MAX_TITLE_CHARS} characters.",
    )
    project_id: PositiveInt | None = Field(
        None,
        description="Move it into this project of yours; null takes it out of its project. "
        "Its own runner, documents and parameters stay.",
    )
    pinned: bool | None = Field(None, description="Pinned conversations are listed first.")
    active_message_id: PositiveInt | None = Field(
        None,
        description="Show and answer the branch through this message of the conversation "
        "(the newest answers below it); e.g. one of a message's `siblings`.",
    )

    @model_validator(mode="after")
    def _something(self) -> ConversationPatch:
        if not self.model_fields_set & {"title", "project_id", "pinned", "active_message_id"}:
            raise PydanticCustomError(
                "missing",
                "Send `title`, `project_id`, `pinned` or `active_message_id`.",
                {"at": ("title",)},
            )
        if "active_message_id" in self.model_fields_set and self.active_message_id is None:
            raise PydanticCustomError(
                "invalid_type",
                "`active_message_id` is a message id.",
                {"at": ("active_message_id",)},
            )
        if "title" in self.model_fields_set and self.title is None:
            raise PydanticCustomError("invalid_type", "A title cannot be null.", {"at": ("title",)})
        if "pinned" in self.model_fields_set and self.pinned is None:
            raise PydanticCustomError(
                "invalid_type", "`pinned` is true or false.", {"at": ("pinned",)}
            )
        return self


class ForkRequest(Body):
    """POST /api/conversations/{id}/fork."""

    message_id: PositiveInt = Field(
        description="The copy holds the branch from the first message to this one."
    )


class ShareRequest(Body):
    """POST /api/conversations/{id}/shares."""

    expires_in_days: Annotated[int, Field(ge=1, le=limits.MAX_SHARE_DAYS)] | None = Field(
        None, description="The link stops working after this many days; null: until revoked."
    )


class NewConversation(Body):
    """POST /api/conversations: an empty conversation, to be answered over the
    websocket (`conversation_id`) or /v1 (`breezeweb.conversation_id`)."""

    title: str | None = Field(None, description="Default: `New chat`.")
    project_id: PositiveInt | None = Field(
        None,
        description="Start it in this project of yours: it takes the project's runner, "
        "documents and parameters, and follows its instructions.",
    )


def _bounded(name: str) -> Any:
    """A sampling parameter within runners.base.SAMPLING_BOUNDS (as /v1 and the websocket)."""
    _, low, high = SAMPLING_BOUNDS[name]
    return Annotated[float, Field(ge=low, le=high)]


Temperature = _bounded("temperature")
TopP = _bounded("top_p")


class ProjectRequest(Body):
    """POST /api/projects (`name` required) and PATCH /api/projects/{id} (the
    fields sent change; null resets a default)."""

    name: str | None = Field(
        None,
        description=f"Control characters are removed, then 1-{limits.MAX_TITLE_CHARS} characters.",
    )
    instructions: str | None = Field(
        None,
        max_length=limits.MAX_INSTRUCTIONS_CHARS,
        description="A system prompt given to the model before every turn of the project's "
        "conversations (read at each turn: edits apply to existing chats too).",
    )
    runner: str | None = Field(
        None, description="New chats answer with this enabled runner; null or `auto`: the router."
    )
    rag: bool | None = Field(None, description="New chats answer from documents.")
    collections: list[PositiveInt] | None = Field(
        None,
        max_length=limits.MAX_COLLECTIONS,
        description="Collection ids new chats search (default: all you may read).",
    )
    temperature: Temperature | None = Field(None, description="Null: the runner's setting.")
    top_p: TopP | None = Field(None, description="Null: the runner's setting.")
    max_tokens: Annotated[int, Field(ge=1, le=limits.MAX_TOKENS)] | None = Field(
        None, description="Null: the runner's setting."
    )

    def changes(self) -> dict[str, Any]:
        """The fields the client sent (an absent field is left as it is)."""
        return {key: getattr(self, key) for key in self.model_fields_set}


class SearchRequest(Body):
    """POST /api/search."""

    query: str = Field(
        pattern=r"\S", max_length=limits.MAX_QUERY_CHARS, description="What to look for."
    )
    collections: list[PositiveInt] | None = Field(
        None, description="Collection ids to search (default: all you may read)."
    )
    k: int | None = Field(None, ge=1, le=limits.MAX_SEARCH_K, description="How many chunks.")
    mode: Literal[MODES] | None = Field(  # type: ignore[valid-type]
        None, description="Overrides each collection's search mode (default: hybrid)."
    )


class Upload(Body):
    """multipart/form-data."""

    file: list[bytes] = Field(
        min_length=1,
        max_length=limits.MAX_FILES_PER_REQUEST,
        description="txt, md, pdf, html or docx files, each within UPLOAD_MAX_BYTES.",
    )
    collection: int | None = Field(None, description="Default: your personal collection.")


# The request bodies of /api: their refusals are `bad_<field>` (or `bad_json`).
FIELD_CODED = (
    SearchRequest,
    ConversationPatch,
    NewConversation,
    ProjectRequest,
    ForkRequest,
    ShareRequest,
)


def emitted_codes() -> set[str]:
    """Every code `error_for` and `parse` can answer (docs/http-api.md lists them)."""
    fields = {f"bad_{name}" for model in FIELD_CODED for name in model.model_fields}
    return {*CODES.values(), DEFAULT_CODE, *CUSTOM_CODES, "bad_json", *fields}


# ---- responses: the shapes the views build, generated (`name=type`, or `(type, default)`) ----


def reply(name: str, doc: str | None = None, /, **fields: Any) -> type[Reply]:
    return declare(name, Reply, doc, **fields)


CODE = about(str, "A stable machine-readable code (docs/http-api.md).")
OpenAIErrorDetail = reply(
    "OpenAIErrorDetail",
    message=about(str, "What went wrong, for people."),
    type=about(
        str,
        "invalid_request_error, authentication_error, permission_error, "
        "not_found_error, rate_limit_error, server_error or api_error.",
    ),
    param=about(str | None, "The request field at fault, e.g. `messages[0].content`."),
    code=CODE,
)
OpenAIError = reply(
    "OpenAIError", "OpenAI's error shape, used by every /v1 endpoint.", error=OpenAIErrorDetail
)


class ErrorDetail(Reply):
    model_config = ConfigDict(extra="allow")

    code: str = Field(description=CODE[1].description)
    message: str
    param: str = Field("", description="The request field at fault, when there is one.")


Error = reply(
    "Error", "BreezeWeb's own error shape, used by the /api endpoints.", error=ErrorDetail
)

Capability = Literal["llm", "vlm", "agent"]
ModelMetadata = reply(
    "ModelMetadata",
    kind=about(str, f"`{'`, `'.join(RUNNER_KINDS)}`, or `router` for auto."),
    model_id=about(str, "The model the runner serves."),
    capabilities=about(list[Capability], "llm: text; vlm: images; agent: tools."),
    priority=(int, 0),
    context_tokens=(int, 0),
    max_tokens=(int, 0),
    runners=about(list[str], "auto only: the runners it chooses from.", []),
    description=(str, ""),
)
Model = reply(
    "Model",
    id=about(str, "The runner config's name, or `auto`."),
    object=Literal["model"],
    created=about(int, "Unix time the runner was configured."),
    owned_by=Literal["breezeweb"],
    metadata=ModelMetadata,
)
ModelList = reply("ModelList", object=Literal["list"], data=list[Model])
Usage = reply("Usage", prompt_tokens=int, completion_tokens=int, total_tokens=int)

# A cited chunk, as rag.retrieval.Source declares it: a turn carries its first fields
# (`Source`, declared with the websocket's frames), /api/search all of them.
SearchResult = reply(
    "SearchResult", retrieval.Source.__doc__, rank=int, **get_type_hints(retrieval.Source)
)
SearchResults = reply("SearchResults", query=str, results=list[SearchResult])

BreezeWebStep = reply(
    "BreezeWebStep",
    "The `breezeweb` field of a `breezeweb.step` SSE event (agent mode): a chunk with an "
    "empty delta that other clients can ignore.",
    event=about(Literal["tool_call", "tool_result"], "A call started, or its result."),
    step=AgentStep,
)
BreezeWebResponse = reply(
    "BreezeWebResponse",
    "BreezeWeb's extension of the response (openai client: `completion.model_extra['breezeweb']`).",
    runner=about(str, "The runner that answered."),
    model_id=str,
    fallback=about(bool, "True when a higher-priority runner failed first."),
    sources=list[Source],
    notices=about(
        list[dict[str, Any]],
        "e.g. `{code: trimmed}` when old turns were left out to fit the context, "
        "`{code: fallback}` when a runner failed.",
    ),
    blocked=about(str, "Set when an output rule stopped the answer (`content_filter`).", ""),
    conversation_id=about(int, "With `save` or `conversation_id`.", 0),
    steps=about(list[AgentStep], "Agent mode: the server-side tool calls, in order.", []),
)
FinishReason = Literal["stop", "length", "tool_calls", "content_filter"]
AnswerMessage = reply(
    "AnswerMessage",
    role=Literal["assistant"],
    content=about(str | None, "Null when the answer is `tool_calls`."),
    refusal=None,
    tool_calls=(list[ToolCall], []),
)
Choice = reply(
    "Choice", index=int, message=AnswerMessage, logprobs=None, finish_reason=FinishReason
)
_COMPLETION = {"id": str, "created": int, "system_fingerprint": None}
ChatCompletion = reply(
    "ChatCompletion",
    **_COMPLETION,
    object=Literal["chat.completion"],
    model=about(str, "The runner that answered."),
    choices=list[Choice],
    usage=Usage,
    breezeweb=BreezeWebResponse,
)
Delta = reply(
    "Delta",
    role=(Literal["assistant"], "assistant"),
    content=(str, ""),
    tool_calls=(list[dict[str, Any]], []),
)
ChunkChoice = reply(
    "ChunkChoice", index=int, delta=Delta, logprobs=None, finish_reason=FinishReason | None
)
ChatCompletionChunk = reply(
    "ChatCompletionChunk",
    "One `data:` event of a stream. The first carries `delta.role`; the one with "
    "`finish_reason` carries `breezeweb`; with `stream_options.include_usage` a last chunk "
    "has empty `choices` and `usage` (and `breezeweb` again). The stream ends with "
    "`data: [DONE]`. An error after the stream began arrives as a `data:` event holding an "
    "OpenAIError, then `[DONE]`.",
    **_COMPLETION,
    object=Literal["chat.completion.chunk"],
    model=str,
    choices=list[ChunkChoice],
    usage=(Usage | None, None),
    breezeweb=(BreezeWebResponse | BreezeWebStep | None, None),
)

SearchMatch = reply(
    "SearchMatch",
    "Why a conversation matched a search (`?q=`).",
    message_id=about(
        int | None, "The best-matching message (open the conversation there); null: the title."
    ),
    snippet=about(str, "Text around the match (plain text, never HTML)."),
    highlights=about(
        list[tuple[int, int]], "[start, end) character ranges of `snippet` that matched."
    ),
    score=about(float, "Higher is better (BM25 on SQLite, ts_rank_cd on PostgreSQL)."),
)
ConversationSummary = reply(
    "ConversationSummary",
    id=int,
    title=str,
    updated_at=datetime,
    project_id=about(int | None, "The project it is in."),
    pinned=about(bool, "Pinned conversations are listed first."),
    match=about(SearchMatch | None, "Only in search results.", None),
)
Params = reply(
    "Params",
    "Generation parameters (null: the runner's setting).",
    temperature=float | None,
    top_p=float | None,
    max_tokens=int | None,
)
Project = reply(
    "Project",
    "A folder of conversations with its own instructions and defaults for new chats.",
    id=int,
    name=str,
    instructions=str,
    runner=about(str | None, "Null: the router chooses."),
    rag=bool,
    collections=list[int],
    temperature=float | None,
    top_p=float | None,
    max_tokens=int | None,
    conversation_count=int,
    updated_at=datetime,
)
ProjectList = reply("ProjectList", projects=about(list[Project], "By name."))
Share = reply(
    "Share",
    "A read-only link to a snapshot of a conversation's active branch.",
    id=int,
    conversation_id=int,
    title=about(str, "The conversation's title when it was shared."),
    prefix=about(str, "The start of the link's token, to recognise it."),
    created_at=datetime,
    expires_at=datetime | None,
    revoked=bool,
    active=about(bool, "Neither revoked nor expired: the link opens."),
    views=int,
)
NewShare = create_model(
    "NewShare",
    __base__=Share,
    __doc__="A new link; its `url` (a path, `/s/<token>/`) is shown only this once.",
    url=(str, ...),
)
ShareList = reply("ShareList", shares=about(list[Share], "Newest first."))
ExportedConversation = reply(
    "ExportedConversation",
    title=str,
    created_at=datetime,
    updated_at=datetime,
    project=str | None,
    active=about(int | None, "The last message of the branch shown."),
    messages=about(
        list[dict[str, Any]],
        "Every message of every branch by id: id, parent, role, content, status, runner, "
        "model, fallback, finish_reason, usage, timings, sources, created_at.",
    ),
)
Export = reply(
    "Export",
    "BreezeWeb JSON, which `POST /api/imports` reads back (`format=md`: Markdown of each "
    "conversation's active branch with runner, timings and sources).",
    format=Literal["breezeweb.conversations"],
    version=Literal[1],
    exported_at=datetime,
    conversations=list[ExportedConversation],
)
ImportReport = reply(
    "ImportReport",
    imported=about(
        list[dict[str, Any]],
        "index, conversation_id, title, messages, skipped_messages (why each was left out).",
    ),
    skipped=about(list[dict[str, Any]], "index, title, reasons: conversations not imported."),
)
ImportJob = reply(
    "ImportJob",
    "An import, worked through off the request; poll it until `status` is done or failed.",
    id=int,
    status=one_of(chat_models.ImportJob.Status.values),
    format=about(str, "`breezeweb` or `chatgpt`, once read."),
    total=about(int, "Conversations in the file."),
    done=int,
    progress=(float, Field(ge=0, le=1)),
    report=ImportReport | dict[str, Any],
    error=about(str, "Why the file could not be imported."),
    error_code=about(
        str,
        "Why, as a code: `stale` (a restart stopped it), `not_json`, `unknown_format`, "
        "`not_a_list`, `internal`; empty unless failed.",
    ),
)
StoredMessage = reply(
    "StoredMessage",
    id=int,
    parent_id=about(int | None, "The message this one follows (null: a first message)."),
    siblings=about(
        list[int],
        "The ids of the messages with the same parent, oldest first, this one among them: "
        "the branches at this point (show `2 / 3`).",
    ),
    role=one_of(chat_models.Message.Role.values),
    content=str,
    images=list[str],
    status=one_of(chat_models.Message.Status.values),
    **dict.fromkeys(("runner", "model", "finish_reason", "error_code", "error"), str),
    fallback=bool,
    usage=dict[str, Any],
    cost=about(Cost | None, "What the answer cost, when the admin set a price for its runner."),
    timings=dict[str, Any],
    sources=list[Source],
    steps=about(list[AgentStep], "Agent mode: the tool calls of this answer.", []),
    created_at=datetime,
)
TreeNode = reply(
    "TreeNode", id=int, parent_id=int | None, role=one_of(chat_models.Message.Role.values)
)
Conversation = reply(
    "Conversation",
    id=int,
    title=str,
    project_id=int | None,
    pinned=bool,
    pinned_runner=str | None,
    params=Params,
    rag=bool,
    agent=about(bool, "Agent mode (the chat's toggle beside Documents)."),
    collections=list[int],
    messages=about(list[StoredMessage], "The active branch, oldest first."),
    tree=about(
        list[TreeNode], "Every message of every branch, by id: the shape of the message tree."
    ),
)
Runner = reply(
    "Runner",
    name=str,
    kind=str,
    capabilities=list[Capability],
    model_id=str,
    priority=int,
    context_tokens=about(int, "Its context budget in tokens: prompt + answer."),
)
Document = reply(
    "Document",
    id=int,
    title=str,
    status=one_of(rag_models.Document.Status.values),
    progress=(float, Field(ge=0, le=1)),
    error=about(str, "Why ingestion failed."),
    **dict.fromkeys(("chunk_count", "collection_id", "size"), int),
    **dict.fromkeys(("mime", "sha256"), str),
    page_count=int | None,
    **dict.fromkeys(("created_at", "updated_at"), datetime),
)
Collection = reply(
    "Collection",
    id=int,
    name=str,
    **dict.fromkeys(("personal", "shared"), bool),
    owner=str | None,
    writable=bool,
    top_k=int,
    score_floor=float,
)
ConversationList = reply("ConversationList", conversations=list[ConversationSummary])
RunnerList = reply("RunnerList", runners=about(list[Runner], "Highest priority first; no secrets."))
DocumentList = reply(
    "DocumentList",
    documents=(
        list[Document],
        Field(
            description=f"The newest {limits.MAX_DOCUMENTS_LISTED}.",
            max_length=limits.MAX_DOCUMENTS_LISTED,
        ),
    ),
)
OneDocument = reply("OneDocument", document=Document)
Uploaded = reply(
    "Uploaded",
    documents=list[Document],
    errors=about(list[ErrorDetail], "The files that were refused, and why."),
)
Deleted = reply("Deleted", deleted=int)
CollectionList = reply(
    "CollectionList", collections=about(list[Collection], "Your personal collection first.")
)
_TOKENS = {
    "prompt_tokens": about(int, "Tokens read: the question with its history and documents."),
    "completion_tokens": about(int, "Tokens written: the answers."),
    "total_tokens": int,
    "turns": about(int, "Turns (each counted once, whatever the fallbacks)."),
}
UsageTotals = reply("UsageTotals", **_TOKENS)
RunnerUsage = reply("RunnerUsage", runner=str, **_TOKENS)
KeyUsage = reply(
    "KeyUsage",
    api_key=about(str | None, "`name (prefix…)` of the key; null: the browser's session."),
    **_TOKENS,
)
QuotaState = reply(
    "QuotaState",
    "One budget (docs/teams.md) as it stands.",
    metric=Literal["tokens", "messages"],
    period=Literal["day", "month"],
    scope=about(Literal["user", "group"], "Your own budget, or one your group shares."),
    group=str | None,
    runner=about(str | None, "Only turns this runner answers count; null: every runner."),
    limit=int,
    used=int,
    remaining=int,
    resets_at=about(datetime, "When the period starts over."),
    reset_in_s=int,
)
UsageSummary = reply(
    "UsageSummary",
    "Your usage, summed from the run records (docs/teams.md), and your budgets.",
    today=UsageTotals,
    month=UsageTotals,
    by_runner=about(list[RunnerUsage], "This month."),
    by_api_key=about(list[KeyUsage], "This month."),
    quotas=list[QuotaState],
)
Health = reply("Health", status=Literal["ok"])
Readiness = reply(
    "Readiness",
    status=about(
        Literal["ready", "not ready", "degraded"],
        "`degraded`: every runner that could answer is paused by its circuit breaker "
        "in this process (they are in `paused_runners`).",
    ),
    checks=about(dict[str, Any], "What was checked, and what failed."),
    paused_runners=about(
        dict[str, float],
        "With `degraded` only: each paused runner, and the seconds until it is tried again.",
        {},
    ),
)
