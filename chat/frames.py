"""The frames a client sends on `/ws/chat/`, declared once (docs/websocket.md).

`decode(text)` turns one websocket text frame into a `Ping`, a `Stop`, an
`AttachFrame` or one of the generating frames (`MessageFrame`,
`RegenerateFrame`, `EditFrame`; pydantic models whose limits all come from
chat/limits.py), or raises
`ChatError` with the code of docs/websocket.md and, when the frame had a
usable one, its `request_id`. Nothing here touches the database; images are
decoded later (`validate_images`), off the event loop.

How pydantic's complaints become the documented codes: a missing field is
`missing_field`, a wrong type or range `bad_field` (the message names the
field and what it must be); the custom checks raise the code they mean
(`invalid_input`, `text_too_long`, `too_many_images`, `not_found` for an id
that cannot exist, `unknown_runner` for a name longer than any runner's).
A field sent as `null` counts as absent, as it always has.
"""

from __future__ import annotations

import json
from typing import Annotated, Any, Literal, get_args

from django.conf import settings

from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    StringConstraints,
    ValidationError,
    ValidationInfo,
    create_model,
    model_validator,
)
from pydantic_core import PydanticCustomError

from chat import limits
from chat.errors import ChatError
from chat.inputs import MAX_ID, json_path
from runners.base import (
    LOGIT_BIAS_RANGE,
    MAX_LOGIT_BIAS,
    SAMPLING_BOUNDS,
    SAMPLING_PARAMS,
    RunnerError,
    unencodable,
)


def max_frame_bytes() -> int:
    """A frame larger than this is refused with `frame_too_large` (the server must
    let it through: breezeweb.serve gives uvicorn a larger --ws-max-size)."""
    return settings.CHAT_MAX_FRAME_BYTES


# ---- field checks that answer with their own code -------------------------------------------


def _short(value: int) -> str:
    return str(value) if value.bit_length() < 200 else f"{str(value)[:20]}…"


def _storable(text: str, info: ValidationInfo) -> str:
    """Text that no tokenizer or database takes (a lone UTF-16 surrogate from a
    JSON escape, or a NUL, which PostgreSQL refuses) is the client's mistake:
    `invalid_input`, before anything is saved."""
    problem = unencodable(text)
    if problem is None and "\x00" in text:
        problem = f"a NUL character at character {text.index(chr(0))}"
    if problem:
        raise PydanticCustomError("invalid_input", "{problem}", {"problem": problem})
    return text


def _exists(what: str):
    """Database ids are positive 64-bit integers; any other names nothing."""

    def check(value: int) -> int:
        if not 1 <= value <= MAX_ID:
            raise PydanticCustomError("not_found", f"{what} {_short(value)} was not found.")
        return value

    return check


def _runner_name(name: str) -> str:
    if len(name) > limits.MAX_RUNNER_NAME_CHARS:
        raise PydanticCustomError("unknown_runner", "There is no enabled runner with that name.")
    return name


def _text_length(text: str) -> str:
    if len(text) > limits.MAX_TEXT_CHARS:
        raise PydanticCustomError(
            "text_too_long",
            f"The message is {len(text):,} characters long; "
            f"the limit is {limits.MAX_TEXT_CHARS:,}.",
        )
    return text


def _image_count(images: Any) -> Any:
    # Before the items are checked, as a count is the first thing wrong with six images.
    if isinstance(images, list) and len(images) > limits.MAX_IMAGES:
        raise PydanticCustomError(
            "too_many_images", f"At most {limits.MAX_IMAGES} images per message."
        )
    return images


def _collection_count(ids: Any) -> Any:
    if isinstance(ids, list) and len(ids) > limits.MAX_COLLECTIONS:
        raise PydanticCustomError(
            "bad_field", f"At most {limits.MAX_COLLECTIONS} collections per message."
        )
    return ids


def _timezone(name: str) -> str:
    if len(name) > limits.MAX_TIMEZONE_CHARS:
        raise PydanticCustomError(
            "bad_field",
            f"`timezone` is an IANA name of at most {limits.MAX_TIMEZONE_CHARS} characters.",
        )
    return name


Text = Annotated[str, AfterValidator(_storable)]
MessageText = Annotated[Text, AfterValidator(_text_length)]
ConversationId = Annotated[int, AfterValidator(_exists("Conversation"))]
ProjectId = Annotated[int, AfterValidator(_exists("Project"))]
MessageId = Annotated[int, AfterValidator(_exists("Message"))]
CollectionId = Annotated[int, AfterValidator(_exists("Collection"))]
RunnerName = Annotated[Text, AfterValidator(_runner_name)]
StepId = Annotated[int, AfterValidator(_exists("Step"))]
TimeZoneName = Annotated[Text, AfterValidator(_timezone)]


# ---- the frames ------------------------------------------------------------------------------


class _Frame(BaseModel):
    # strict: `true` is not a number or an id, "7" is not an int; extra fields are ignored.
    model_config = ConfigDict(strict=True, frozen=True, extra="ignore", allow_inf_nan=False)


_SAMPLING_MEANING = {
    "temperature": "0 is greedy; higher is more varied.",
    "top_p": "Nucleus sampling: draw from the smallest set of tokens this likely.",
    "top_k": "Draw from the k likeliest tokens only (0: no limit).",
    "repetition_penalty": "llama.cpp's: above 1 discourages tokens already in the answer.",
    "frequency_penalty": "OpenAI's: lowers a token's logit by this much per use so far.",
    "presence_penalty": "OpenAI's: lowers a token's logit by this much once it was used.",
    "seed": "The same seed (and the same request) gives the same answer.",
}
TokenId = Annotated[str, StringConstraints(pattern=r"^[0-9]{1,9}$")]
Bias = Annotated[float, Field(ge=LOGIT_BIAS_RANGE[0], le=LOGIT_BIAS_RANGE[1])]

# The sampling parameters, declared once from runners.base.SAMPLING_BOUNDS for
# the websocket's `params` and /v1's request body (api.schemas) alike. Absent
# or null: the runner's own setting.
Sampling = create_model(
    "Sampling",
    __doc__="Sampling parameters; each one absent or null takes the runner's setting.",
    **{
        name: (
            kind | None,
            Field(
                None,
                ge=low,
                le=high,
                description=f"{_SAMPLING_MEANING[name]} Default: the runner's setting.",
            ),
        )
        for name, (kind, low, high) in SAMPLING_BOUNDS.items()
    },
    logit_bias=(
        dict[TokenId, Bias] | None,
        Field(
            None,
            max_length=MAX_LOGIT_BIAS,
            description="Token id (as a string) -> a bias added to its logit: -100 bans "
            "the token, 100 all but forces it.",
        ),
    ),
)


def sampling_of(model: BaseModel) -> dict[str, Any]:
    """The sampling parameters `model` sets, as runners.base.ChatRequest takes them."""
    given = {name: getattr(model, name) for name in SAMPLING_PARAMS}
    if given["logit_bias"] is not None:
        given["logit_bias"] = {int(token): bias for token, bias in given["logit_bias"].items()}
    return {name: value for name, value in given.items() if value is not None}


class FrameParams(_Frame, Sampling):
    """Generation parameters; an unknown one is refused."""

    model_config = ConfigDict(extra="forbid")

    max_tokens: int | None = Field(None, ge=1, le=limits.MAX_TOKENS)


class GenerateFrame(_Frame):
    """What every generating frame carries besides its own fields."""

    type: str
    request_id: str
    runner: RunnerName | None = None
    rag: bool | None = None
    collections: Annotated[list[CollectionId], BeforeValidator(_collection_count)] | None = None
    agent: bool | None = None
    timezone: TimeZoneName | None = None
    params: FrameParams = FrameParams()

    # Fields of the subclasses, so the consumer reads any frame the same way.
    conversation_id: int | None = None
    project_id: int | None = None
    message_id: int | None = None
    text: str = ""
    images: list[str] = []


class MessageFrame(GenerateFrame):
    """`message`: a new user turn, in a new (`conversation_id` null) or existing conversation."""

    type: Literal["message"]
    images: Annotated[list[Text], BeforeValidator(_image_count)] = []
    conversation_id: ConversationId | None = None
    project_id: ProjectId | None = Field(
        None,
        description="A new conversation (`conversation_id` null) starts in this project of "
        "yours, with its instructions, runner, documents and parameters; the frame's own "
        "`runner`, `rag`, `collections` and `params` win over them. Ignored otherwise.",
    )
    text: MessageText = ""

    @model_validator(mode="after")
    def _text_or_images(self) -> MessageFrame:
        if not self.images:
            _require_text(self, "message")
        return self


class RegenerateFrame(GenerateFrame):
    """`regenerate`: answer the last user turn again."""

    type: Literal["regenerate"]
    conversation_id: ConversationId


class EditFrame(GenerateFrame):
    """`edit`: replace one of the user's messages and answer it again."""

    type: Literal["edit"]
    conversation_id: ConversationId
    message_id: MessageId
    text: MessageText

    @model_validator(mode="after")
    def _not_blank(self) -> EditFrame:
        _require_text(self, "edit")
        return self


def _require_text(frame: GenerateFrame, kind: str) -> None:
    if frame.text == "" and "text" not in frame.model_fields_set:
        raise PydanticCustomError("missing_field", f"`text` is required in a `{kind}` frame.")
    if not frame.text.strip():
        raise PydanticCustomError("missing_field", "`text` must not be empty.")


def frame_type(model: type[BaseModel]) -> str:
    """The `type` a frame model declares (its `Literal`)."""
    return get_args(model.model_fields["type"].annotation)[0]


GENERATE_FRAMES: dict[str, type[GenerateFrame]] = {
    frame_type(model): model for model in (MessageFrame, RegenerateFrame, EditFrame)
}


class ApproveFrame(_Frame):
    """`approve`: the user's decision on a step that awaits approval
    (`approval_request`), from any socket of theirs, even after a reload."""

    type: Literal["approve"]
    request_id: str
    step_id: StepId
    approved: bool


class AttachFrame(_Frame):
    """`attach`: follow one of your answers from this socket, live while it is
    being generated (chat/live.py). It names the answer (`message_id`) or the
    conversation whose latest answer it is (`conversation_id`), one of them;
    `last_seq` is the `seq` of the last token frame of it the client already
    has (0: none), so the `sync` frame carries only what follows."""

    type: Literal["attach"]
    request_id: str
    conversation_id: ConversationId | None = None
    message_id: MessageId | None = None
    last_seq: int = Field(0, ge=0, le=MAX_ID)

    @model_validator(mode="after")
    def _one_answer(self) -> AttachFrame:
        if self.conversation_id is None and self.message_id is None:
            raise PydanticCustomError(
                "missing_field",
                "`message_id` or `conversation_id` is required in an `attach` frame.",
            )
        if self.conversation_id is not None and self.message_id is not None:
            raise PydanticCustomError(
                "bad_field",
                "Give `message_id` or `conversation_id` in an `attach` frame, not both.",
            )
        return self


class Ping(_Frame):
    """`ping`: answered by `pong`."""

    type: Literal["ping"] = "ping"
    request_id: str | None = None


class Stop(_Frame):
    """`stop`: cancel the answer of `request_id` (or of an `attach`'s)."""

    type: Literal["stop"] = "stop"
    request_id: str


# Every frame a client sends, by `type` (the OpenAPI document's `WsClientFrame`).
CLIENT_FRAMES: tuple[type[_Frame], ...] = (
    *GENERATE_FRAMES.values(),
    ApproveFrame,
    AttachFrame,
    Stop,
    Ping,
)
FRAME_TYPES = tuple(frame_type(model) for model in CLIENT_FRAMES)


# ---- decoding ---------------------------------------------------------------------------------


def decode(text_data: str | None) -> Ping | Stop | ApproveFrame | AttachFrame | GenerateFrame:
    """One websocket frame, checked. Raises ChatError (its `request_id`
    attribute set when the frame named a usable one)."""
    request_id = None
    try:
        frame = _json_object(text_data)
        raw_id = frame.get("request_id")
        if (
            isinstance(raw_id, str)
            and 0 < len(raw_id) <= limits.MAX_REQUEST_ID_CHARS
            and unencodable(raw_id) is None
        ):
            request_id = raw_id
        kind = frame.get("type")
        if not isinstance(kind, str):
            raise ChatError("missing_field", "`type` is required (a string).")
        if kind == "ping":
            return Ping(request_id=request_id)
        if kind not in FRAME_TYPES:
            raise ChatError(
                "unknown_type",
                f"Unknown frame type {kind[:40]!r}; expected message, stop, "
                "regenerate, edit, approve, attach or ping.",
            )
        if request_id is None:
            raise ChatError(
                "missing_field" if raw_id is None else "bad_field",
                "`request_id` must be a non-empty string of at most "
                f"{limits.MAX_REQUEST_ID_CHARS} characters.",
            )
        if kind == "stop":
            return Stop(request_id=request_id)
        if kind == "approve":
            return _validate(ApproveFrame, frame)
        if kind == "attach":
            return _validate(AttachFrame, frame)
        return _validate(GENERATE_FRAMES[kind], frame)
    except ChatError as exc:
        exc.request_id = request_id
        raise


def _json_object(text_data: str | None) -> dict:
    if text_data is None:
        raise ChatError("bad_frame", "Send JSON text frames, not binary ones.")
    limit = max_frame_bytes()
    if len(text_data) > limit or (
        len(text_data) * 4 > limit and len(text_data.encode("utf-8", "surrogatepass")) > limit
    ):
        raise ChatError(
            "frame_too_large",
            f"The frame is larger than {limit // (1024 * 1024)} MB; send smaller images.",
        )
    try:
        frame = json.loads(text_data)
    except RecursionError:
        raise ChatError("bad_json", "The frame's JSON is nested too deeply.") from None
    except ValueError:
        # Also numbers beyond Python's digit limit.
        raise ChatError("bad_json", "The frame is not valid JSON.") from None
    if not isinstance(frame, dict):
        raise ChatError("bad_frame", "A frame must be a JSON object with a `type`.")
    return frame


def _without_nulls(frame: dict) -> dict:
    """`null` means absent, at the top level and in `params`."""
    clean = {k: v for k, v in frame.items() if v is not None}
    if isinstance(clean.get("params"), dict):
        clean["params"] = {k: v for k, v in clean["params"].items() if v is not None}
    return clean


def _validate(model: type[_Frame], frame: dict) -> Any:
    try:
        return model.model_validate(_without_nulls(frame))
    except ValidationError as exc:
        raise _frame_error(model, frame["type"], exc.errors(include_url=False)[0]) from None


# pydantic's type errors, in the words of docs/websocket.md.
_KINDS = {
    "string_type": "a string",
    "int_type": "an integer",
    "bool_type": "true or false",
    "list_type": "a list",
    "tuple_type": "a list",
    "dict_type": "an object",
    "model_type": "an object",
    "float_type": "a number",
}


def _frame_error(model: type[_Frame], kind: str, error: dict) -> ChatError:
    loc = list(error["loc"])
    name = ".".join(str(part) for part in loc if not isinstance(part, int))
    where = json_path(tuple(loc))
    code = error["type"]
    if code == "invalid_input":
        return ChatError(code, f"`{where}` contains {error['ctx']['problem']}; send valid text.")
    if code in ("not_found", "unknown_runner", "text_too_long", "too_many_images", "bad_field"):
        return ChatError(code, error["msg"])
    if code == "missing_field":
        return ChatError(code, error["msg"])
    if code == "missing":
        return ChatError("missing_field", f"`{name}` is required in a `{kind}` frame.")
    if loc[0] == "params":
        if code == "extra_forbidden":
            return ChatError(
                "bad_field", f"Unknown generation parameter `params.{str(loc[-1])[:40]}`."
            )
        if len(loc) > 1 and loc[1] == "logit_bias":
            low, high = LOGIT_BIAS_RANGE
            return ChatError(
                "bad_field",
                "`params.logit_bias` must map token ids (strings of digits) to numbers "
                f"from {low:g} to {high:g}, at most {MAX_LOGIT_BIAS} of them.",
            )
        if len(loc) > 1:
            return ChatError("bad_field", f"`{name}` must be {_range(loc[1])}.")
    if loc[0] == "last_seq":
        return ChatError(
            "bad_field",
            f"`last_seq` must be an integer from 0 to {MAX_ID} (a token frame's `seq`).",
        )
    if loc[0] == "collections":
        return ChatError("bad_field", "`collections` must be a list of collection ids.")
    if loc[0] == "images":
        return ChatError("bad_field", "`images` must be a list of data URLs.")
    expected = _KINDS.get(code)
    if expected is None:
        return ChatError("bad_field", f"`{name}` is not valid here.")
    got = type(error["input"]).__name__
    return ChatError("bad_field", f"`{name}` must be {expected}, got {got}.")


def _range(param: str | int) -> str:
    """What a generation parameter must be, read from its declaration."""
    field = FrameParams.model_fields[str(param)]
    low = next(m.ge for m in field.metadata if hasattr(m, "ge"))
    high = next(m.le for m in field.metadata if hasattr(m, "le"))
    if field.annotation == int | None:
        return f"an integer from {low:,} to {high:,}"
    return f"a number from {low:g} to {high:g}"


def validate_images(images: tuple[str, ...]) -> tuple[str, ...]:
    """Decode every image; the validated data URLs (EXIF stripped, MIME type
    corrected). Raises ChatError(bad_image) naming the image and the problem."""
    from runners.images import validate_image_data_url

    checked = []
    for index, data_url in enumerate(images, start=1):
        try:
            checked.append(validate_image_data_url(data_url).data_url)
        except RunnerError as exc:
            prefix = f"Image {index}: " if len(images) > 1 else ""
            raise ChatError("bad_image", prefix + exc.message) from None
    return tuple(checked)
