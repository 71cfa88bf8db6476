"""Property-based fuzzing of the chat websocket (issue 12, class 3).

Hypothesis builds frames of every type (`message`, `regenerate`, `edit`,
`approve`, `attach`, `stop`, `ping`, unknown types, non-objects, non-JSON, binary) as raw JSON
text, so it can say what `json.dumps` cannot: nesting 100 000 deep, integers
of thousands of digits, `1e309`, `NaN`, lone surrogates as `\\ud800` escapes,
NUL, oversized strings, wrong types, unknown fields. Each frame goes through
the real routed application (`breezeweb.asgi.application`, the same
WebsocketCommunicator socket for the whole run) with a real enabled runner
behind it (the scripted Llama Stack server).

Every frame is built to be refused: the generating frames keep at least one
anchor that cannot succeed (another user's conversation or answer, a runner
that does not exist, a collection that does not exist; for `approve`, another
user's step that awaits approval) besides whatever Hypothesis
breaks. The properties, for every frame: the answer is an `error` frame with
a code (`pong` for a ping), the socket still answers a ping afterwards, the
saved data is unchanged, no runner was asked and every circuit is untouched.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import os

from django.test import override_settings

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from accounts.models import ApiKey
from agents.models import AgentStep
from breezeweb.asgi import application
from chat import services
from chat.consumers import finish_detached
from chat.frames import CLIENT_FRAMES, FRAME_TYPES
from chat.models import Conversation, Message
from rag.models import Collection
from runners import registry
from runners.models import RunRecord
from runners.router import circuits
from tests.support.clients import session_headers
from tests.support.fixtures import runner_config

EXAMPLES = int(os.environ.get("WS_FUZZ_EXAMPLES", "300"))
# Every client frame's type and field, from the frames' models (chat/frames.py); `type` first.
TYPES = FRAME_TYPES
KNOWN_FIELDS = ("type", *sorted({f for m in CLIENT_FRAMES for f in m.model_fields} - {"type"}))
RUNNER_NAMES = ("auto", "scripted")
MISSING_COLLECTION = 10**12

# ---- JSON text fragments -------------------------------------------------------------------


def _string(text: str) -> str:
    return json.dumps(text, ensure_ascii=False)


def _not_reserved(text: str) -> bool:
    return text not in (*TYPES, *RUNNER_NAMES, *KNOWN_FIELDS)


deep = st.integers(min_value=2, max_value=100_000).flatmap(
    lambda d: st.sampled_from(["[" * d + "]" * d, '{"a":' * d + "1" + "}" * d, "[" * d])
)
huge_numbers = st.one_of(
    st.integers(min_value=19, max_value=6000).map(lambda n: "9" * n),
    st.integers(min_value=19, max_value=6000).map(lambda n: "-" + "1" * n),
    st.sampled_from(
        [
            str(2**63),
            str(2**64),
            str(2**63 - 1) + "0",
            "-1",
            "0",
            "-9223372036854775809",
            "1e309",
            "-1e309",
            "NaN",
            "Infinity",
            "-Infinity",
            "1.5",
            "-0.0",
            "1e-400",
            "1E+2",
        ]
    ),
)
# Unicode digits that str.isdigit() accepts and int() refuses, as JSON strings.
unicode_digits = st.sampled_from(
    ["\u0661\u0662\u0663", "\u00b2", "\u07c0", "\uff11", "\u2460"]
).map(_string)
surrogates = st.sampled_from(
    ['"\\ud800"', '"a\\udfffb"', '"\\udc00\\ud800"', '"x\\ud83d"', '"\\ud800\\u0000"']
)
controls = st.sampled_from(['"\\u0000"', '"a\\u0000b"', '"\\u0001\\u001f\\u007f"', '"\\u202e"'])
oversized = st.sampled_from([100_001, 150_000, 400_000]).map(lambda n: '"' + "x" * n + '"')
wrong_types = st.sampled_from(
    ["true", "false", "null", "[]", "{}", '""', '" "', "[1, 2]", '{"a": 1}', "[null]", "[true]"]
)
texts = st.text(max_size=60).filter(_not_reserved).map(_string)
images = st.sampled_from(
    [
        '["https://example.com/a.png"]',
        '["data:image/png;base64,AAAA"]',
        '["data:image/png;base64,' + "A" * 5000 + '"]',
        '["data:text/plain;base64,aGVsbG8="]',
        '["a", "b", "c", "d", "e"]',
        '["data:image/png;base64,\\ud800"]',
        "[1]",
    ]
)
params = st.sampled_from(
    [
        '{"temperature": 3}',
        '{"temperature": "1"}',
        '{"temperature": true}',
        '{"temperature": NaN}',
        '{"top_p": -1}',
        '{"top_p": 1e309}',
        '{"max_tokens": 0}',
        '{"max_tokens": 1.5}',
        '{"max_tokens": ' + "9" * 5000 + "}",
        '{"max_tokens": 99999}',
        '{"seed": 1}',
        '{"\\ud800": 1}',
        '{"' + "k" * 10_000 + '": 1}',
    ]
)
hostile = st.one_of(
    deep,
    huge_numbers,
    unicode_digits,
    surrogates,
    controls,
    oversized,
    wrong_types,
    texts,
    images,
    params,
)
field_names = st.one_of(
    st.sampled_from(KNOWN_FIELDS[1:]),
    st.text(min_size=1, max_size=30).filter(_not_reserved),
    st.sampled_from(["\ud800", "\x00", "k" * 5000]),
)


def _escape_key(name: str) -> str:
    # Lone surrogates travel as JSON escapes, as a real client would send them.
    return json.dumps(name)


@st.composite
def frames(draw, anchors: dict) -> tuple[str, str | bytes]:
    """(kind, frame): the frame type it was built from, and its text (bytes
    for a binary frame)."""
    kind = draw(st.sampled_from([*TYPES, "unknown", "garbage"]))
    if kind == "garbage":
        frame = draw(
            st.one_of(
                deep,
                huge_numbers,
                surrogates,
                wrong_types,
                st.text(max_size=200),
                st.binary(max_size=200),
                st.sampled_from(["", "{", '{"type": "message",', "\u0661", '{"type": "ping"} x']),
            )
        )
        return kind, frame
    fields: dict[str, str] = {"type": _string(kind), "request_id": _string("fuzz")}
    if kind == "unknown":
        fields["type"] = draw(st.one_of(texts, hostile))
    elif kind == "message":
        fields |= {
            "conversation_id": str(anchors["foreign_conversation"]),
            "text": _string("hello"),
            "runner": _string("no-such-runner"),
            "collections": f"[{MISSING_COLLECTION}]",
        }
    elif kind == "regenerate":
        fields["conversation_id"] = str(anchors["foreign_conversation"])
    elif kind == "edit":
        fields |= {
            "conversation_id": str(anchors["foreign_conversation"]),
            "message_id": str(anchors["foreign_message"]),
            "text": _string("changed"),
        }
    elif kind == "approve":
        fields |= {"step_id": str(anchors["foreign_step"]), "approved": "true"}
    elif kind == "attach":
        fields |= {"message_id": str(anchors["foreign_answer"]), "last_seq": "0"}
    if kind in ("message", "regenerate", "edit") and draw(st.booleans()):
        fields |= {"agent": "true", "timezone": _string("Europe/Paris")}
    # Break up to two fields (the generating frames keep an anchor) ...
    broken = draw(st.lists(st.sampled_from(KNOWN_FIELDS[1:]), max_size=2, unique=True))
    for name in broken:
        fields[name] = draw(hostile)
    # ... and add unknown fields.
    for name in draw(st.lists(field_names, max_size=2, unique=True)):
        if name not in fields:
            fields[name] = draw(hostile)
    order = draw(st.permutations(list(fields)))
    return kind, "{" + ", ".join(f"{_escape_key(k)}: {fields[k]}" for k in order) + "}"


# ---- the run ----------------------------------------------------------------------------------


def _saved_data() -> dict:
    return {
        "conversations": list(Conversation.objects.order_by("pk").values()),
        "messages": list(Message.objects.order_by("pk").values()),
        "collections": list(Collection.objects.order_by("pk").values()),
        "keys": list(ApiKey.objects.order_by("pk").values("pk", "revoked_at")),
        "runs": RunRecord.objects.count(),
        "steps": list(AgentStep.objects.order_by("pk").values()),
    }


def _circuits() -> dict:
    return {name: dataclasses.asdict(c) for name, c in circuits.circuits.items()}


@pytest.mark.django_db(transaction=True)
def test_no_generated_frame_closes_the_socket_changes_data_or_touches_a_runner(
    user, other_user, scripted_server
):
    from channels.testing import WebsocketCommunicator

    registry.forget_all()
    circuits.reset()
    services.reset_limits(user.pk)
    runner_config(scripted_server.url, "scripted", priority=10, timeout_seconds=10)
    mine = Conversation.objects.create(owner=user, title="mine")
    Message.objects.create(conversation=mine, role="user", content="my question")
    Message.objects.create(conversation=mine, role="assistant", content="my answer")
    foreign = Conversation.objects.create(owner=other_user, title="theirs")
    foreign_message = Message.objects.create(conversation=foreign, role="user", content="theirs")
    foreign_answer = Message.objects.create(
        conversation=foreign, role="assistant", content="their answer", status="streaming"
    )
    foreign_step = AgentStep.objects.create(
        message=foreign_answer,
        round=1,
        position=0,
        call_id="c",
        tool="calculator",
        status=AgentStep.Status.AWAITING_APPROVAL,
    )
    anchors = {
        "foreign_conversation": foreign.pk,
        "foreign_message": foreign_message.pk,
        "foreign_step": foreign_step.pk,
        "foreign_answer": foreign_answer.pk,
    }
    circuits.success("scripted", 5.0)  # a known, non-empty circuit state to compare
    before, circuits_before = _saved_data(), _circuits()
    headers = session_headers(user)
    loop = asyncio.new_event_loop()
    seen: dict[str, int] = {}

    async def open_socket() -> WebsocketCommunicator:
        ws = WebsocketCommunicator(application, "/ws/chat/", headers=headers)
        connected, _ = await ws.connect(timeout=10)
        assert connected
        return ws

    ws = loop.run_until_complete(open_socket())
    counter = iter(range(10**9))

    async def exchange(kind: str, frame: str | bytes) -> dict:
        # send_input, not send_to: an empty frame is a frame too.
        key = "bytes" if isinstance(frame, bytes) else "text"
        await ws.send_input({"type": "websocket.receive", key: frame})
        answer = json.loads(await ws.receive_from(timeout=30))
        alive = f"alive-{next(counter)}"
        await ws.send_json_to({"type": "ping", "request_id": alive})
        pong = json.loads(await ws.receive_from(timeout=30))
        assert pong == {"type": "pong", "request_id": alive}, (frame[:300], answer, pong)
        return answer

    foreign_id = anchors["foreign_conversation"]
    message = '{"type": "message", "request_id": "e", "conversation_id": %s, "text": %s}'

    @settings(
        max_examples=EXAMPLES,
        deadline=None,
        suppress_health_check=[
            HealthCheck.too_slow,
            HealthCheck.function_scoped_fixture,
            HealthCheck.large_base_example,
            HealthCheck.data_too_large,
        ],
    )
    # Besides what Hypothesis draws, always these (the reproductions).
    @example(("garbage", "[" * 100_000 + "]" * 100_000))
    @example(("message", message % ("[" * 50_000 + "]" * 50_000, '"hi"')))
    @example(("message", message % (foreign_id, '"lone \\ud800 surrogate"')))
    @example(("message", message % (foreign_id, '"a NUL \\u0000"')))
    @example(("message", message % (str(2**64), '"hi"')))
    @example(("message", message % ("9" * 5000, '"hi"')))
    @example(("edit", message.replace("message", "edit", 1) % (-1, '"x"')))
    @given(example=frames(anchors))
    def run(example: tuple[str, str | bytes]) -> None:
        kind, frame = example
        answer = loop.run_until_complete(exchange(kind, frame))
        seen[answer.get("code", answer["type"])] = (
            seen.get(answer.get("code", answer["type"]), 0) + 1
        )
        if kind == "ping" and answer["type"] == "pong":
            return
        assert answer["type"] == "error", (frame[:300], answer)
        assert isinstance(answer["code"], str) and answer["code"], answer
        assert answer["code"] != "internal_error", (frame[:300], answer)
        assert isinstance(answer["message"], str) and answer["message"]
        assert len(json.dumps(answer)) < 2000, "an error never echoes a large input back"

    try:
        with override_settings(CHAT_MESSAGES_PER_MINUTE=10**6, CHAT_MAX_CONCURRENT_PER_USER=10**6):
            run()
            loop.run_until_complete(finish_detached(cancel=False, wait_seconds=10))
        assert _saved_data() == before
        assert _circuits() == circuits_before
        assert scripted_server.chat_requests() == []
    finally:
        loop.run_until_complete(ws.disconnect())
        loop.run_until_complete(loop.shutdown_asyncgens())
        loop.close()
        registry.forget_all()
        circuits.reset()
    print("ws fuzz answers:", dict(sorted(seen.items())))
    # The generator reached the refusals of every layer.
    for code in ("bad_json", "bad_field", "not_found", "invalid_input"):
        assert seen.get(code, 0) >= 1, seen
