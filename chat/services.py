"""The chat service layer: saving turns as they stream, assembling history,
per-user limits, and the conversation list.

Callers (the websocket consumer, the pages) pass explicit arguments, never a
request. Database functions here are synchronous; async callers wrap them in
`database_sync_to_async`. The rate limits use the Django cache, so with
`REDIS_URL` they hold across web processes.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any

from django.conf import settings
from django.db import transaction
from django.utils import timezone
from django.utils.translation import gettext

from accounts import limits, quotas
from agents import steps as agent_steps
from chat import search
from chat.errors import ChatError
from chat.inputs import clean_name
from chat.limits import MAX_SEARCH_HITS, MAX_TITLE_CHARS, TITLE_MAX_CHARS
from chat.models import Conversation, Message, Project, RunnerPrice
from rag.models import Collection
from runners.base import ChatMessage, RunnerError
from runners.collect import Outcome
from runners.models import RunnerConfig
from runners.router import load_candidates, usable_configs

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
    agent: bool = False
    # The conversation's own parameters (copied from its project when it was
    # started there); a frame's `params` win over them.
    temperature: float | None = None
    top_p: float | None = None
    max_tokens: int | None = None

    def sampling(self) -> dict[str, float]:
        """The conversation's sampling parameters that are set, as runners take them."""
        given = {"temperature": self.temperature, "top_p": self.top_p}
        return {name: value for name, value in given.items() if value is not None}


@dataclass(frozen=True, kw_only=True)
class TurnOutcome(Outcome):
    """How an answer ended, saved onto its assistant message: the stream's
    outcome plus its status and the sources retrieval found."""

    status: str  # Message.Status value: complete, stopped or failed
    sources: list[dict[str, Any]] = field(default_factory=list)
    cost: dict[str, Any] | None = None  # answer_cost(), once saved (the `done` frame's)


def title_from(text: str) -> str:
    """A conversation title from its first user message: one line, truncated."""
    line = clean_name(text)
    if not line:
        return gettext("Image chat")
    if len(line) <= TITLE_MAX_CHARS:
        return line
    return line[: TITLE_MAX_CHARS - 1].rstrip() + "…"


def _owned_conversation(user, conversation_id: int) -> Conversation:
    conversation = Conversation.objects.filter(pk=conversation_id, owner=user).first()
    if conversation is None:
        # The same answer for "not yours" and "does not exist": ids leak nothing.
        raise ChatError("not_found", f"Conversation {conversation_id} was not found.", status=404)
    return conversation


def _parents(conversation_id: int) -> dict[int, int | None]:
    """Every message of the conversation -> its parent (one query: the tree's shape)."""
    return dict(Message.objects.filter(conversation_id=conversation_id).values_list("id", "parent"))


def path_ids(conversation_id: int, leaf_id: int | None) -> list[int]:
    """The ids from the root to `leaf_id`, oldest first: one branch of the tree.
    Without a leaf, the newest message ends the path."""
    parents = _parents(conversation_id)
    if leaf_id not in parents:
        leaf_id = max(parents, default=None)
    path: list[int] = []
    while leaf_id is not None and leaf_id not in path:  # `not in`: a cycle cannot hang us
        path.append(leaf_id)
        leaf_id = parents.get(leaf_id)
    return path[::-1]


def _path(conversation_id: int, leaf_id: int | None) -> list[Message]:
    ids = path_ids(conversation_id, leaf_id)
    rows = Message.objects.in_bulk(ids)
    return [rows[i] for i in ids if i in rows]


def _history(conversation: Conversation, user_message: Message) -> tuple[ChatMessage, ...]:
    """The turns to send the model, oldest first: the branch that ends with
    the user's message (the other branches are not the model's business).
    Failed or empty assistant answers are left out (they would teach the model
    nothing); stopped partial answers stay, as the user saw them."""
    return _as_history(_path(conversation.pk, user_message.pk))


def _instructions(conversation: Conversation) -> tuple[ChatMessage, ...]:
    """The project's instructions as they are now, as a leading system message
    (the pipeline puts it before its own system prompt)."""
    if conversation.project_id is None:
        return ()
    text = Project.objects.filter(pk=conversation.project_id).values_list("instructions", flat=True)
    text = (text.first() or "").strip()
    return (ChatMessage(role="system", content=text),) if text else ()


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


def _resolve_runner(user, name: str | None) -> RunnerConfig | None:
    if not name or name == "auto":
        return None
    config = next((c for c in usable_configs(user) if c.name == name and c.enabled), None)
    if config is None:
        raise ChatError(
            "unknown_runner", f"There is no enabled runner named {name!r} that you may use."
        )
    return config


def admit_turn(user, runner: str | None) -> list:
    """Count one websocket turn against the user's budgets
    (`accounts.quotas.charge`, which raises QuotaExceeded), unless no runner
    could take it: as the API checks `model` before it counts, a named runner
    the user may not use is refused first, uncounted and unsaved
    (`unknown_runner`, the rule of `begin_message`), and with no runner open
    to the user at all (the router's rule) nothing is counted: the turn goes
    on to be refused by the pipeline with `no_runner`, its question kept."""
    if runner and runner != "auto":
        _resolve_runner(user, runner)
    else:
        try:
            load_candidates(frozenset(), None, False, user)
        except RunnerError:
            return []
    return quotas.charge(user)


def _readable_collections(user, ids: tuple[int, ...]) -> list[int]:
    if not ids:
        return []
    readable = Collection.objects.readable_by(user).filter(pk__in=ids)
    found = set(readable.values_list("pk", flat=True))
    missing = [i for i in ids if i not in found]
    if missing:
        raise ChatError("not_found", f"Collection {missing[0]} was not found.", status=404)
    return sorted(found)


def _start(
    conversation: Conversation,
    user_message: Message,
    *,
    new: bool = False,
    answer_parent: Message | None = None,
    agent: bool | None = None,
) -> TurnStart:
    assistant = Message(
        conversation=conversation,
        role=Message.Role.ASSISTANT,
        status=Message.Status.STREAMING,
        parent=answer_parent or user_message,
    )
    assistant.save(force_insert=True, move_leaf=False)
    # The answer ends the active path, and updated_at moves the conversation
    # to the top of the list: one UPDATE.
    Conversation.objects.filter(pk=conversation.pk).update(
        active_leaf_id=assistant.pk, updated_at=timezone.now()
    )
    pinned = conversation.pinned_runner.name if conversation.pinned_runner_id else None
    collection_ids = () if new else tuple(conversation.collections.values_list("pk", flat=True))
    # A new conversation's history is its first message: no need to read it back.
    history = _as_history([user_message]) if new else _history(conversation, user_message)
    return TurnStart(
        conversation_id=conversation.pk,
        title=conversation.title,
        user_message_id=user_message.pk,
        assistant_message_id=assistant.pk,
        history=_instructions(conversation) + history,
        pinned_runner=pinned,
        rag=conversation.rag_enabled,
        collection_ids=collection_ids,
        # Known when the caller just set it (or made the conversation): not read back.
        agent=agent_steps.agent_mode(conversation.pk) if agent is None else agent,
        temperature=conversation.temperature,
        top_p=conversation.top_p,
        max_tokens=conversation.max_tokens,
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
    agent: bool | None = None,
    project_id: int | None = None,
) -> TurnStart:
    """Save a new user turn (creating the conversation when `conversation_id`
    is None, in project `project_id` with its defaults when given) and the
    assistant message that will stream its answer. `runner`, `rag`,
    `collection_ids` and `agent` (agent mode) update the conversation's
    settings when given. Raises ChatError(not_found | unknown_runner)."""
    with transaction.atomic():
        config = _resolve_runner(user, runner)
        collections = _readable_collections(user, collection_ids) if collection_ids else None
        new = conversation_id is None
        if new:
            project = _owned_project(user, project_id) if project_id is not None else None
            conversation = _new_conversation(user, title_from(text), project)
            new = project is None  # else read its inherited collections back
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
        if agent is not None:
            agent_steps.set_agent_mode(conversation.pk, agent)
        user_message = Message(
            conversation=conversation, role=Message.Role.USER, content=text, images=list(images)
        )
        # A new conversation's first message is its root; in an existing one
        # it follows the active leaf just read with the conversation.
        user_message.root = conversation_id is None
        if not user_message.root and conversation.active_leaf_id is not None:
            user_message.parent_id = conversation.active_leaf_id
        user_message.save(force_insert=True)
        if agent is None and conversation_id is None:
            agent = False  # a new conversation starts without agent mode
        return _start(conversation, user_message, new=new, agent=agent)


def begin_regenerate(user, *, conversation_id: int, agent: bool | None = None) -> TurnStart:
    """Answer the last user turn of the active branch again: the new answer is
    a sibling of the earlier ones (a new branch), which are all kept.
    Raises ChatError(not_found | nothing_to_regenerate)."""
    with transaction.atomic():
        conversation = _owned_conversation(user, conversation_id)
        if agent is not None:
            agent_steps.set_agent_mode(conversation.pk, agent)
        path = _path(conversation.pk, conversation.active_leaf_id)
        last_user = next((m for m in reversed(path) if m.role == Message.Role.USER), None)
        if last_user is None:
            raise ChatError("nothing_to_regenerate", "This conversation has no message to answer.")
        return _start(conversation, last_user, answer_parent=last_user, agent=agent)


def begin_edit(
    user, *, conversation_id: int, message_id: int, text: str, agent: bool | None = None
) -> TurnStart:
    """Edit one of the user's own messages and answer it again: the edited
    text is a new message beside the original (a new branch from the same
    point); the original and everything after it are kept.
    Raises ChatError(not_found | not_editable)."""
    with transaction.atomic():
        conversation = _owned_conversation(user, conversation_id)
        if agent is not None:
            agent_steps.set_agent_mode(conversation.pk, agent)
        message = conversation.messages.filter(pk=message_id).first()
        if message is None:
            raise ChatError("not_found", f"Message {message_id} was not found.", status=404)
        if message.role != Message.Role.USER:
            raise ChatError("not_editable", "Only your own messages can be edited.")
        edited = Message(
            conversation=conversation,
            role=Message.Role.USER,
            content=text,
            images=message.images,
            parent_id=message.parent_id,
        )
        edited.root = message.parent_id is None
        edited.save()
        return _start(conversation, edited, agent=agent)


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


def finish_message(message_id: int, outcome: TurnOutcome) -> dict[str, Any] | None:
    """Save the final state of an assistant message (and settle any of its
    agent steps the end cut short). Returns its cost (answer_cost), for the
    `done` frame."""
    agent_steps.settle_unfinished(message_id)
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
    return answer_cost(outcome.runner_name, outcome.prompt_tokens, outcome.completion_tokens)


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
        # One by one: each message follows the one before it (Message.save).
        for m in to_save:
            Message.objects.create(
                conversation=conversation, role=m.role, content=m.content, images=list(m.images)
            )
        answer = Message.objects.create(
            conversation=conversation, role=Message.Role.ASSISTANT, status=Message.Status.STREAMING
        )
        finish_message(answer.pk, outcome)
        Conversation.objects.filter(pk=conversation.pk).update(updated_at=timezone.now())
        return conversation.pk


# ---- projects ------------------------------------------------------------------------

PROJECT_FIELDS = ("instructions", "rag_enabled", "temperature", "top_p", "max_tokens")


def _owned_project(user, project_id: int) -> Project:
    project = Project.objects.filter(pk=project_id, owner=user).first()
    if project is None:
        raise ChatError("not_found", f"Project {project_id} was not found.", status=404)
    return project


def _new_conversation(user, title: str, project: Project | None) -> Conversation:
    """A new conversation; in a project it starts with the project's runner,
    documents and parameters (its instructions are read at every turn)."""
    conversation = Conversation.objects.create(owner=user, title=title, project=project)
    if project is None:
        return conversation
    conversation.pinned_runner_id = (
        project.runner_id if project.runner_id and project.runner.enabled else None
    )
    conversation.rag_enabled = project.rag_enabled
    conversation.temperature = project.temperature
    conversation.top_p = project.top_p
    conversation.max_tokens = project.max_tokens
    conversation.save()
    # Only the collections the user may still read (one may have been unshared since).
    readable = Collection.objects.readable_by(user).filter(
        pk__in=project.collections.values_list("pk", flat=True)
    )
    conversation.collections.set(readable)
    return conversation


def project_dict(project: Project) -> dict[str, Any]:
    return {
        "id": project.pk,
        "name": project.name,
        "instructions": project.instructions,
        "runner": project.runner.name if project.runner_id else None,
        "rag": project.rag_enabled,
        "collections": sorted(project.collections.values_list("pk", flat=True)),
        "temperature": project.temperature,
        "top_p": project.top_p,
        "max_tokens": project.max_tokens,
        "conversation_count": project.conversations.count(),
        "updated_at": project.updated_at.isoformat(),
    }


def list_projects(user) -> list[dict[str, Any]]:
    return [
        project_dict(p)
        for p in Project.objects.filter(owner=user).select_related("runner").order_by("name", "id")
    ]


def get_project(user, project_id: int) -> dict[str, Any]:
    return project_dict(_owned_project(user, project_id))


def save_project(user, project_id: int | None, changes: dict[str, Any]) -> dict[str, Any]:
    """Create (`project_id` None) or update one of the user's projects with
    `changes` (already shape-checked: name, instructions, runner, rag,
    collections, temperature, top_p, max_tokens; a missing key is left as it
    is). Raises ChatError(not_found | unknown_runner | bad_name)."""
    with transaction.atomic():
        if project_id is None:
            project = Project(owner=user)
            if "name" not in changes:
                raise ChatError("bad_name", "A project needs a name.")
        else:
            project = _owned_project(user, project_id)
        if "name" in changes:
            name = clean_name(changes["name"])
            if not name:
                raise ChatError("bad_name", "A project name cannot be empty.")
            project.name = name[:MAX_TITLE_CHARS]
        if "runner" in changes:
            project.runner = _resolve_runner(user, changes["runner"])
        if "rag" in changes:
            project.rag_enabled = changes["rag"]
        for key in PROJECT_FIELDS:
            if key in changes:
                setattr(project, key, changes[key])
        project.save()
        if "collections" in changes:
            ids = tuple(dict.fromkeys(changes["collections"] or ()))
            project.collections.set(_readable_collections(user, ids))
        return project_dict(project)


def delete_project(user, project_id: int) -> None:
    """Delete a project; its conversations stay, outside any project."""
    _owned_project(user, project_id).delete()


def create_conversation(user, *, title: str = "", project_id: int | None = None) -> dict:
    """An empty conversation (in a project, with its defaults): the API's way
    to start a chat whose first message then comes over the websocket or /v1."""
    title = clean_name(title)[:MAX_TITLE_CHARS] or gettext("New chat")
    with transaction.atomic():
        project = _owned_project(user, project_id) if project_id is not None else None
        conversation = _new_conversation(user, title, project)
    return conversation_messages(user, conversation.pk)


# ---- the conversation list (pages and JSON endpoints) ------------------------------


def _summary(c: Conversation) -> dict[str, Any]:
    return {
        "id": c.pk,
        "title": c.title,
        "updated_at": c.updated_at.isoformat(),
        "project_id": c.project_id,
        "pinned": c.pinned,
    }


def list_conversations(
    user, *, query: str = "", project_id: int | None = None, limit: int = 200
) -> list[dict[str, Any]]:
    """The user's conversations (those of one project with `project_id`),
    pinned first, then most recent first; with `query`, those whose
    messages or title contain its words (chat.search), best match first, each
    with a `match`: the message to open, a snippet and the matched ranges.
    A query without a searchable word (stop words, punctuation) filters titles
    by substring instead."""
    rows = Conversation.objects.filter(owner=user)
    if project_id is not None:
        rows = rows.filter(project_id=project_id)
    hits = (
        search.search(user.pk, query, project_id=project_id, limit=min(limit, MAX_SEARCH_HITS))
        if query
        else None
    )
    if hits is None:
        if query:
            rows = rows.filter(title__icontains=query)
        return [_summary(c) for c in rows.order_by("-pinned", "-updated_at", "-id")[:limit]]
    found = rows.in_bulk([hit.conversation_id for hit in hits])
    return [
        _summary(found[hit.conversation_id])
        | {
            "match": {
                "message_id": hit.message_id,
                "snippet": hit.snippet,
                "highlights": [list(r) for r in hit.highlights],
                "score": hit.score,
            }
        }
        for hit in hits
        if hit.conversation_id in found
    ]


def rename_conversation(user, conversation_id: int, title: str) -> dict[str, Any]:
    """Rename one of the user's conversations. Raises ChatError(not_found | bad_title)."""
    return update_conversation(user, conversation_id, {"title": title})


def update_conversation(user, conversation_id: int, changes: dict[str, Any]) -> dict[str, Any]:
    """Change one of the user's conversations: `title`, `project_id` (move it
    into one of the user's projects, or out with None), `pinned`,
    `active_message_id` (show and answer the branch through that message). Moving
    changes only where it is listed and whose instructions it follows; its own
    runner, documents and parameters stay. Pinning does not reorder it by date.
    Raises ChatError(not_found | bad_title)."""
    with transaction.atomic():
        conversation = _owned_conversation(user, conversation_id)
        fields = []
        if "title" in changes:
            title = clean_name(changes["title"])
            if not title:
                raise ChatError("bad_title", "A title cannot be empty.")
            if len(title) > MAX_TITLE_CHARS:
                raise ChatError(
                    "bad_title", f"A title can be at most {MAX_TITLE_CHARS} characters long."
                )
            conversation.title = title
            fields += ["title", "updated_at"]
        if "project_id" in changes:
            project_id = changes["project_id"]
            conversation.project = (
                _owned_project(user, project_id) if project_id is not None else None
            )
            fields.append("project")
        if "pinned" in changes:
            conversation.pinned = changes["pinned"]
            fields.append("pinned")
        if "active_message_id" in changes:
            message_id = changes["active_message_id"]
            if not conversation.messages.filter(pk=message_id).exists():
                raise ChatError("not_found", f"Message {message_id} was not found.", status=404)
            conversation.active_leaf_id = _newest_leaf_under(conversation.pk, message_id)
            fields.append("active_leaf")
        if fields:
            # .update(): a move or a pin must not bump updated_at (auto_now) either.
            values = {f: getattr(conversation, f) for f in fields if f != "updated_at"}
            if "updated_at" in fields:
                values["updated_at"] = timezone.now()
            Conversation.objects.filter(pk=conversation.pk).update(**values)
            conversation.refresh_from_db()
        return _summary(conversation)


def delete_conversation(user, conversation_id: int) -> None:
    """Delete one of the user's conversations with its messages."""
    _owned_conversation(user, conversation_id).delete()


def prices() -> dict[str, RunnerPrice]:
    """Runner name -> its price, for the runners the admin priced."""
    return {p.runner.name: p for p in RunnerPrice.objects.select_related("runner")}


def answer_cost(
    runner_name: str,
    prompt_tokens: int | None,
    completion_tokens: int | None,
    priced: dict[str, RunnerPrice] | None = None,
) -> dict[str, Any] | None:
    """What an answer cost at its runner's price now (`amount`, `currency`);
    None when the runner has no price or the answer no token counts. `priced`:
    prices() already read (a list of messages), else this runner's is read."""
    if prompt_tokens is None and completion_tokens is None:
        return None
    if priced is None:
        price = (
            RunnerPrice.objects.filter(runner__name=runner_name).first() if runner_name else None
        )
    else:
        price = priced.get(runner_name)
    if price is None:
        return None
    return {"amount": price.cost(prompt_tokens, completion_tokens), "currency": price.currency}


def message_dict(
    m: Message,
    siblings: list[int] | None = None,
    priced: dict[str, RunnerPrice] | None = None,
    steps: list[dict[str, Any]] | None = None,
) -> dict[str, Any]:
    usage = {"prompt_tokens": m.prompt_tokens, "completion_tokens": m.completion_tokens}
    return {
        "id": m.pk,
        "parent_id": m.parent_id,
        "siblings": siblings or [m.pk],
        "role": m.role,
        "content": m.content,
        "images": m.images,
        "status": m.status,
        "runner": m.runner_name,
        "model": m.model_id,
        "fallback": m.fallback,
        "finish_reason": m.finish_reason,
        "usage": usage,
        "cost": answer_cost(m.runner_name, m.prompt_tokens, m.completion_tokens, priced or {}),
        "timings": {
            "time_to_first_token_ms": m.time_to_first_token_ms,
            "tokens_per_second": m.tokens_per_second,
            "total_ms": m.total_ms,
        },
        "sources": m.sources,
        "error_code": m.error_code,
        "error": m.error,
        "steps": steps or [],
        "created_at": m.created_at.isoformat(),
    }


INTERRUPTED = "interrupted"
"""The finish_reason of an answer a server that died left unfinished."""


def settle_interrupted(conversation_id: int) -> int:
    """Mark answers left `streaming` by a server that died (no save for
    STALE_STREAMING_SECONDS; a live answer saves every ~0.5 s while tokens
    flow) as stopped, keeping their text. Returns how many were settled."""
    cutoff = timezone.now() - timedelta(seconds=STALE_STREAMING_SECONDS)
    stale = Message.objects.filter(
        conversation_id=conversation_id, status=Message.Status.STREAMING, updated_at__lt=cutoff
    )
    for message_id in stale.values_list("pk", flat=True):
        agent_steps.settle_unfinished(message_id)  # no approval card for a dead turn
    return stale.update(
        status=Message.Status.STOPPED,
        finish_reason=INTERRUPTED,
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
    # Read by chat.outbox.done_frame when the answer has ended.
    answer.cost = answer_cost(answer.runner_name, answer.prompt_tokens, answer.completion_tokens)
    return answer


def conversation_messages(user, conversation_id: int) -> dict[str, Any]:
    """A conversation for the page and for resuming after a reconnect: the
    messages of its active branch (each with its siblings, the branches at that
    point) and the shape of the whole tree. Raises ChatError(not_found)."""
    conversation = _owned_conversation(user, conversation_id)
    settle_interrupted(conversation.pk)
    tree = list(
        conversation.messages.order_by("id").values_list("id", "parent_id", "role", named=True)
    )
    children: dict[int | None, list[int]] = {}
    for row in tree:
        children.setdefault(row.parent_id, []).append(row.id)
    path = _path(conversation.pk, conversation.active_leaf_id)
    priced = prices()
    steps = agent_steps.steps_of([m.pk for m in path if m.role == Message.Role.ASSISTANT])
    return {
        "id": conversation.pk,
        "title": conversation.title,
        "project_id": conversation.project_id,
        "pinned": conversation.pinned,
        "pinned_runner": conversation.pinned_runner.name if conversation.pinned_runner_id else None,
        "params": {
            "temperature": conversation.temperature,
            "top_p": conversation.top_p,
            "max_tokens": conversation.max_tokens,
        },
        "rag": conversation.rag_enabled,
        "agent": agent_steps.agent_mode(conversation.pk),
        "collections": list(conversation.collections.values_list("pk", flat=True)),
        "messages": [
            message_dict(m, children.get(m.parent_id), priced, steps.get(m.pk)) for m in path
        ],
        "tree": [{"id": r.id, "parent_id": r.parent_id, "role": r.role} for r in tree],
    }


def _newest_leaf_under(conversation_id: int, message_id: int) -> int:
    """The end of the branch through `message_id`: its newest child, that
    one's newest child, and so on (where the user left that branch)."""
    newest: dict[int, int] = {}
    for message, parent in _parents(conversation_id).items():
        if parent is not None and message > newest.get(parent, 0):
            newest[parent] = message
    seen = {message_id}
    while message_id in newest and newest[message_id] not in seen:
        message_id = newest[message_id]
        seen.add(message_id)
    return message_id


def fork_conversation(user, conversation_id: int, message_id: int) -> dict[str, Any]:
    """A new conversation holding a copy of the branch from the first message
    to `message_id` (its settings and project too), to go on from there.
    Raises ChatError(not_found)."""
    with transaction.atomic():
        source = _owned_conversation(user, conversation_id)
        if not source.messages.filter(pk=message_id).exists():
            raise ChatError("not_found", f"Message {message_id} was not found.", status=404)
        fork = Conversation.objects.create(
            owner=user,
            title=source.title,
            project_id=source.project_id,
            pinned_runner_id=source.pinned_runner_id,
            rag_enabled=source.rag_enabled,
            temperature=source.temperature,
            top_p=source.top_p,
            max_tokens=source.max_tokens,
        )
        fork.collections.set(source.collections.all())
        for m in _path(source.pk, message_id):
            m.pk, m.id, m.conversation, m.parent_id = None, None, fork, None
            m._state.adding = True  # saved as a new row, following the one before it
            m.save()
    return conversation_messages(user, fork.pk)


def enabled_runners(user) -> list[dict[str, Any]]:
    """The enabled runners `user` may use, for the picker, highest priority
    first (no secrets)."""
    return [
        {
            "name": c.name,
            "kind": c.kind,
            "capabilities": c.capabilities,
            "model_id": c.model_id,
            "priority": c.priority,
            "context_tokens": c.context_tokens,
        }
        for c in usable_configs(user)
        if c.enabled
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
