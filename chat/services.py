"""The chat service layer: saving turns as they stream, assembling history,
per-user limits, and the conversation list.

Callers (the websocket consumer, the pages) pass explicit arguments, never a
request. Database functions here are synchronous; async callers wrap them in
`database_sync_to_async`. The rate limits use the Django cache, so with
`REDIS_URL` they hold across Daphne processes.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any

from django.conf import settings
from django.db import transaction
from django.utils import timezone

from accounts import limits
from chat.errors import ChatError
from chat.inputs import clean_name
from chat.limits import MAX_TITLE_CHARS, TITLE_MAX_CHARS
from chat.models import Conversation, Message
from rag.models import Collection
from runners.base import ChatMessage
from runners.collect import Outcome
from runners.models import RunnerConfig

__all__ = ["ChatError"]  # re-exported: the one error type (chat.errors)

# An answer still `streaming` without a save for this long was cut off by a
# crash or restart (generous: a request may wait in the local runner's queue).
STALE_STREAMING_SECONDS = 120


@dataclass(frozen=True)
class TurnStart:
    """What exists in the database once a turn is accepted: the conversation,
    the saved user message, the assistant message (status `streaming`), and
    the history to answer (oldest first, ending with the user turn)."""

    conversation_id: int
    title: str
    user_message_id: int
    assistant_message_id: int
    history: tuple[ChatMessage, ...]
    pinned_runner: str | None = None
    rag: bool = False
    collection_ids: tuple[int, ...] = ()


@dataclass(frozen=True, kw_only=True)
class TurnOutcome(Outcome):
    """How an answer ended, saved onto its assistant message: the stream's
    outcome plus its status and the sources retrieval found."""

    status: str  # Message.Status value: complete, stopped or failed
    sources: list[dict[str, Any]] = field(default_factory=list)


def title_from(text: str) -> str:
    """A conversation title from its first user message: one line, truncated."""
    line = clean_name(text)
    if not line:
        return "Image chat"
    if len(line) <= TITLE_MAX_CHARS:
        return line
    return line[: TITLE_MAX_CHARS - 1].rstrip() + "…"


def _owned_conversation(user, conversation_id: int) -> Conversation:
    conversation = Conversation.objects.filter(pk=conversation_id, owner=user).first()
    if conversation is None:
        # The same answer for "not yours" and "does not exist": ids leak nothing.
        raise ChatError("not_found", f"Conversation {conversation_id} was not found.", status=404)
    return conversation


def _history(conversation: Conversation, before_message_id: int) -> tuple[ChatMessage, ...]:
    """The turns to send the model, oldest first. Failed or empty assistant
    answers are left out (they would teach the model nothing); stopped partial
    answers stay, as the user saw them."""
    rows = conversation.messages.filter(pk__lt=before_message_id).order_by("created_at", "id")
    return _as_history(rows.only("role", "content", "images", "status"))


def _as_history(messages) -> tuple[ChatMessage, ...]:
    turns = []
    for m in messages:
        if m.role == Message.Role.ASSISTANT and (
            m.status in (Message.Status.FAILED, Message.Status.STREAMING) or not m.content
        ):
            continue
        if m.role not in (Message.Role.USER, Message.Role.ASSISTANT, Message.Role.SYSTEM):
            continue
        turns.append(ChatMessage(role=m.role, content=m.content, images=tuple(m.images or ())))
    return tuple(turns)


def _resolve_runner(name: str | None) -> RunnerConfig | None:
    if not name or name == "auto":
        return None
    config = RunnerConfig.objects.filter(name=name, enabled=True).first()
    if config is None:
        raise ChatError("unknown_runner", f"There is no enabled runner named {name!r}.")
    return config


def _readable_collections(user, ids: tuple[int, ...]) -> list[int]:
    if not ids:
        return []
    readable = Collection.objects.readable_by(user).filter(pk__in=ids)
    found = set(readable.values_list("pk", flat=True))
    missing = [i for i in ids if i not in found]
    if missing:
        raise ChatError("not_found", f"Collection {missing[0]} was not found.", status=404)
    return sorted(found)


def _start(conversation: Conversation, user_message: Message, *, new: bool = False) -> TurnStart:
    assistant = Message.objects.create(
        conversation=conversation,
        role=Message.Role.ASSISTANT,
        status=Message.Status.STREAMING,
    )
    # Bump updated_at so the conversation moves to the top of the list.
    Conversation.objects.filter(pk=conversation.pk).update(updated_at=timezone.now())
    pinned = conversation.pinned_runner.name if conversation.pinned_runner_id else None
    collection_ids = () if new else tuple(conversation.collections.values_list("pk", flat=True))
    return TurnStart(
        conversation_id=conversation.pk,
        title=conversation.title,
        user_message_id=user_message.pk,
        assistant_message_id=assistant.pk,
        # A new conversation's history is its first message: no need to read it back.
        history=_as_history([user_message]) if new else _history(conversation, assistant.pk),
        pinned_runner=pinned,
        rag=conversation.rag_enabled,
        collection_ids=collection_ids,
    )


def begin_message(
    user,
    *,
    conversation_id: int | None,
    text: str,
    images: tuple[str, ...] = (),
    runner: str | None = None,
    rag: bool | None = None,
    collection_ids: tuple[int, ...] | None = None,
) -> TurnStart:
    """Save a new user turn (creating the conversation when `conversation_id`
    is None) and the assistant message that will stream its answer.
    `runner`, `rag` and `collection_ids` update the conversation's settings
    when given. Raises ChatError(not_found | unknown_runner)."""
    with transaction.atomic():
        config = _resolve_runner(runner)
        collections = _readable_collections(user, collection_ids) if collection_ids else None
        new = conversation_id is None
        if new:
            conversation = Conversation.objects.create(owner=user, title=title_from(text))
        else:
            conversation = _owned_conversation(user, conversation_id)
        changed = []
        if runner is not None and conversation.pinned_runner_id != (config.pk if config else None):
            conversation.pinned_runner = config
            changed.append("pinned_runner")
        if rag is not None and conversation.rag_enabled != rag:
            conversation.rag_enabled = rag
            changed.append("rag_enabled")
        if changed:
            conversation.save(update_fields=[*changed, "updated_at"])
        if collections is not None:
            conversation.collections.set(collections)
            new = False  # read the collections back
        user_message = Message.objects.create(
            conversation=conversation, role=Message.Role.USER, content=text, images=list(images)
        )
        return _start(conversation, user_message, new=new)


def begin_regenerate(user, *, conversation_id: int) -> TurnStart:
    """Answer the last user turn again: the answers after it are deleted and a
    new assistant message is started. Raises ChatError(not_found | nothing_to_regenerate)."""
    with transaction.atomic():
        conversation = _owned_conversation(user, conversation_id)
        users_turns = conversation.messages.filter(role=Message.Role.USER)
        last_user = users_turns.order_by("-created_at", "-id").first()
        if last_user is None:
            raise ChatError("nothing_to_regenerate", "This conversation has no message to answer.")
        conversation.messages.filter(pk__gt=last_user.pk).delete()
        return _start(conversation, last_user)


def begin_edit(user, *, conversation_id: int, message_id: int, text: str) -> TurnStart:
    """Edit one of the user's own messages and answer it again: every message
    after it is deleted. Raises ChatError(not_found | not_editable)."""
    with transaction.atomic():
        conversation = _owned_conversation(user, conversation_id)
        message = conversation.messages.filter(pk=message_id).first()
        if message is None:
            raise ChatError("not_found", f"Message {message_id} was not found.", status=404)
        if message.role != Message.Role.USER:
            raise ChatError("not_editable", "Only your own messages can be edited.")
        conversation.messages.filter(pk__gt=message.pk).delete()
        message.content = text
        message.save(update_fields=["content", "updated_at"])
        return _start(conversation, message)


def flush_contents(contents: dict[int, str]) -> None:
    """Save answers so far (message id -> text), in one transaction; called
    about every 0.5 s while answers stream. Only messages still streaming are
    touched, so a late save never overwrites a finished answer."""
    now = timezone.now()
    with transaction.atomic():
        for message_id, content in contents.items():
            Message.objects.filter(pk=message_id, status=Message.Status.STREAMING).update(
                content=content, updated_at=now
            )


def finish_message(message_id: int, outcome: TurnOutcome) -> None:
    """Save the final state of an assistant message."""
    Message.objects.filter(pk=message_id).update(
        content=outcome.content,
        status=outcome.status,
        runner_name=outcome.runner_name[:100],
        model_id=outcome.model_id[:200],
        fallback=outcome.fallback,
        finish_reason=outcome.finish_reason[:32],
        prompt_tokens=outcome.prompt_tokens,
        completion_tokens=outcome.completion_tokens,
        time_to_first_token_ms=outcome.time_to_first_token_ms,
        tokens_per_second=outcome.tokens_per_second,
        total_ms=outcome.total_ms,
        sources=outcome.sources,
        error_code=outcome.error_code[:32],
        error=outcome.error,
        updated_at=timezone.now(),
    )


def record_exchange(
    user,
    *,
    conversation_id: int | None,
    messages: tuple[ChatMessage, ...],
    outcome: TurnOutcome,
) -> int:
    """Save an HTTP API exchange once its answer is known, in one transaction;
    returns the conversation id. Without `conversation_id` a new conversation
    (titled like the chat's) gets every message of the request; an existing one
    gets the last user message only, since the client sent the rest of the
    history itself. The answer is saved as `finish_message` saves the
    websocket's. Raises ChatError(not_found) for a conversation not the user's."""
    with transaction.atomic():
        if conversation_id is None:
            first_user = next(m for m in messages if m.role == Message.Role.USER)
            conversation = Conversation.objects.create(
                owner=user, title=title_from(first_user.content)
            )
            to_save = messages
        else:
            conversation = (
                Conversation.objects.select_for_update().filter(pk=conversation_id, owner=user)
            ).first()
            if conversation is None:
                raise ChatError(
                    "not_found", f"Conversation {conversation_id} was not found.", status=404
                )
            to_save = messages[-1:]
        Message.objects.bulk_create(
            Message(
                conversation=conversation, role=m.role, content=m.content, images=list(m.images)
            )
            for m in to_save
        )
        answer = Message.objects.create(
            conversation=conversation, role=Message.Role.ASSISTANT, status=Message.Status.STREAMING
        )
        finish_message(answer.pk, outcome)
        Conversation.objects.filter(pk=conversation.pk).update(updated_at=timezone.now())
        return conversation.pk


# ---- the conversation list (pages and JSON endpoints) ------------------------------


def list_conversations(user, *, query: str = "", limit: int = 200) -> list[dict[str, Any]]:
    """The user's conversations, most recent first, optionally filtered by title."""
    rows = Conversation.objects.filter(owner=user)
    if query:
        rows = rows.filter(title__icontains=query)
    return [
        {"id": c.pk, "title": c.title, "updated_at": c.updated_at.isoformat()}
        for c in rows.order_by("-updated_at", "-id")[:limit]
    ]


def rename_conversation(user, conversation_id: int, title: str) -> dict[str, Any]:
    """Rename one of the user's conversations. Raises ChatError(not_found | bad_title)."""
    title = clean_name(title)
    if not title:
        raise ChatError("bad_title", "A title cannot be empty.")
    if len(title) > MAX_TITLE_CHARS:
        raise ChatError("bad_title", f"A title can be at most {MAX_TITLE_CHARS} characters long.")
    conversation = _owned_conversation(user, conversation_id)
    conversation.title = title
    conversation.save(update_fields=["title", "updated_at"])
    return {"id": conversation.pk, "title": conversation.title}


def delete_conversation(user, conversation_id: int) -> None:
    """Delete one of the user's conversations with its messages."""
    _owned_conversation(user, conversation_id).delete()


def message_dict(m: Message) -> dict[str, Any]:
    return {
        "id": m.pk,
        "role": m.role,
        "content": m.content,
        "images": m.images,
        "status": m.status,
        "runner": m.runner_name,
        "model": m.model_id,
        "fallback": m.fallback,
        "finish_reason": m.finish_reason,
        "usage": {"prompt_tokens": m.prompt_tokens, "completion_tokens": m.completion_tokens},
        "timings": {
            "time_to_first_token_ms": m.time_to_first_token_ms,
            "tokens_per_second": m.tokens_per_second,
            "total_ms": m.total_ms,
        },
        "sources": m.sources,
        "error_code": m.error_code,
        "error": m.error,
        "created_at": m.created_at.isoformat(),
    }


def settle_interrupted(conversation_id: int) -> int:
    """Mark answers left `streaming` by a server that died (no save for
    STALE_STREAMING_SECONDS; a live answer saves every ~0.5 s while tokens
    flow) as stopped, keeping their text. Returns how many were settled."""
    cutoff = timezone.now() - timedelta(seconds=STALE_STREAMING_SECONDS)
    return Message.objects.filter(
        conversation_id=conversation_id, status=Message.Status.STREAMING, updated_at__lt=cutoff
    ).update(
        status=Message.Status.STOPPED,
        finish_reason="interrupted",
        error_code="interrupted",
        error="The server stopped before this answer was finished; the saved text is kept.",
    )


def answer_to_attach(
    user, *, conversation_id: int | None = None, message_id: int | None = None
) -> Message:
    """The answer an `attach` frame names: the assistant message `message_id`,
    or the latest answer of the conversation `conversation_id`, as saved now
    (an answer a dead server left `streaming` is settled first). Raises
    ChatError(not_found) for one that does not exist or is not the user's,
    alike, so ids leak nothing."""
    answers = Message.objects.filter(conversation__owner=user, role=Message.Role.ASSISTANT)
    if message_id is not None:
        answer = answers.filter(pk=message_id).first()
        if answer is None:
            raise ChatError("not_found", f"Answer {message_id} was not found.", status=404)
    else:
        conversation = _owned_conversation(user, conversation_id)
        answer = answers.filter(conversation=conversation).order_by("-created_at", "-id").first()
        if answer is None:
            raise ChatError(
                "not_found", f"Conversation {conversation_id} has no answer yet.", status=404
            )
    if answer.status == Message.Status.STREAMING and settle_interrupted(answer.conversation_id):
        answer.refresh_from_db()
    return answer


def conversation_messages(user, conversation_id: int) -> dict[str, Any]:
    """A conversation with all its messages, for the page and for resuming
    after a reconnect. Raises ChatError(not_found)."""
    conversation = _owned_conversation(user, conversation_id)
    settle_interrupted(conversation.pk)
    return {
        "id": conversation.pk,
        "title": conversation.title,
        "pinned_runner": conversation.pinned_runner.name if conversation.pinned_runner_id else None,
        "rag": conversation.rag_enabled,
        "collections": list(conversation.collections.values_list("pk", flat=True)),
        "messages": [message_dict(m) for m in conversation.messages.order_by("created_at", "id")],
    }


def enabled_runners() -> list[dict[str, Any]]:
    """Enabled runners for the picker, highest priority first (no secrets)."""
    return [
        {
            "name": c.name,
            "kind": c.kind,
            "capabilities": c.capabilities,
            "model_id": c.model_id,
            "priority": c.priority,
        }
        for c in RunnerConfig.objects.filter(enabled=True).order_by("-priority", "name")
    ]


# ---- per-user limits (Django cache, shared across processes with Redis) ------------

# What a user with every generation slot taken is told to wait (the limiter's hint).
SLOT_RETRY_AFTER_SECONDS = limits.SLOT_RETRY_AFTER_SECONDS


def _slots_key(user_id: int) -> str:
    return f"chat:answers:user:{user_id}"


async def acquire_generation_slot(user_id: int) -> limits.SlotLease | None:
    """Take one of the user's `CHAT_MAX_CONCURRENT_PER_USER` concurrent-answer
    slots (accounts.limits, shared across processes with Redis); None when all
    are taken. The lease is released when the answer ends."""
    return await limits.acquire_slot(_slots_key(user_id), settings.CHAT_MAX_CONCURRENT_PER_USER)


async def allow_message(user_id: int) -> limits.RateDecision:
    """Count one message (send, regenerate, edit) against the user's
    `CHAT_MESSAGES_PER_MINUTE`, across all of the user's sockets and processes
    (the exact sliding window of accounts.limits). A refused message is
    not counted; `retry_after` says when the next one will be accepted."""
    return await limits.ahit(_message_key(user_id), settings.CHAT_MESSAGES_PER_MINUTE, 60)


def _message_key(user_id: int) -> str:
    return f"chat:messages:user:{user_id}"


def reset_limits(user_id: int) -> None:
    """Forget the user's counters (tests, or an admin unblocking someone)."""
    limits.reset_slots(_slots_key(user_id))
    limits.reset(_message_key(user_id), 60)
