"""Conversations out and in: export as BreezeWeb JSON or Markdown, import
BreezeWeb JSON and ChatGPT's data export (`conversations.json`).

Import runs off the request: the upload is kept in DATA_DIR/imports and an
`ImportJob` is worked through by a thread, one conversation per transaction,
saving its progress; its report lists what was imported and what was skipped
and why. Imported text is stored exactly as it came (it is shown as text, or
as sanitized Markdown, like any message), except what no database can hold:
a message with a NUL or a lone surrogate, or longer than MAX_TEXT_CHARS, is
skipped and reported. Branches come across as branches: BreezeWeb's `parent`
and ChatGPT's `mapping` tree both become `Message.parent`.
"""

from __future__ import annotations

import json
import logging
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any

from django.conf import settings
from django.db import close_old_connections, connection, transaction
from django.utils import timezone, translation
from django.utils.translation import gettext_lazy

from chat.inputs import clean_name
from chat.limits import MAX_TEXT_CHARS, MAX_TITLE_CHARS
from chat.models import Conversation, ImportJob, Message
from runners.base import unencodable

log = logging.getLogger(__name__)

FORMAT = "breezeweb.conversations"
VERSION = 1
ROLES = ("system", "user", "assistant")
# The title of an imported conversation that has none, in the importer's language.
IMPORTED_TITLE = gettext_lazy("Imported chat")


# ---- export ---------------------------------------------------------------------------------


def _message_record(m: Message) -> dict[str, Any]:
    return {
        "id": m.pk,
        "parent": m.parent_id,
        "role": m.role,
        "content": m.content,
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
        "created_at": m.created_at.isoformat(),
    }


def conversation_record(c: Conversation) -> dict[str, Any]:
    """One conversation, every branch of it (`parent` links, `active` the
    end of the branch shown)."""
    return {
        "title": c.title,
        "created_at": c.created_at.isoformat(),
        "updated_at": c.updated_at.isoformat(),
        "project": c.project.name if c.project_id else None,
        "active": c.active_leaf_id,
        "messages": [_message_record(m) for m in c.messages.order_by("id")],
    }


def export_json(user, conversation_id: int | None = None) -> dict[str, Any]:
    """The user's conversations (or one), as BreezeWeb JSON."""
    rows = Conversation.objects.filter(owner=user).select_related("project").order_by("id")
    if conversation_id is not None:
        rows = rows.filter(pk=conversation_id)
    return {
        "format": FORMAT,
        "version": VERSION,
        "exported_at": timezone.now().isoformat(),
        "conversations": [conversation_record(c) for c in rows],
    }


def _active_path(record: dict[str, Any]) -> list[dict[str, Any]]:
    by_id = {m["id"]: m for m in record["messages"]}
    leaf = record.get("active") if record.get("active") in by_id else None
    if leaf is None and record["messages"]:
        leaf = record["messages"][-1]["id"]
    path: list[dict[str, Any]] = []
    while leaf is not None and leaf in by_id and by_id[leaf] not in path:
        path.append(by_id[leaf])
        leaf = by_id[leaf]["parent"]
    return path[::-1]


def _details(m: dict[str, Any]) -> str:
    parts = [p for p in (m.get("runner"), m.get("model")) if p]
    t = m.get("timings") or {}
    if t.get("time_to_first_token_ms") is not None:
        parts.append(f"TTFT {t['time_to_first_token_ms']:.0f} ms")
    if t.get("tokens_per_second"):
        parts.append(f"{t['tokens_per_second']:.1f} tok/s")
    if t.get("total_ms") is not None:
        parts.append(f"total {t['total_ms']:.0f} ms")
    u = m.get("usage") or {}
    if u.get("prompt_tokens") is not None or u.get("completion_tokens") is not None:
        parts.append(
            f"tokens {u.get('prompt_tokens') or 0} in / {u.get('completion_tokens') or 0} out"
        )
    return " · ".join(parts)


def export_markdown(data: dict[str, Any]) -> str:
    """Markdown of an export: each conversation's active branch, with each
    answer's runner, timings and sources."""
    out: list[str] = []
    for record in data["conversations"]:
        out.append(f"# {record['title']}\n")
        for m in _active_path(record):
            heading = {"user": "User", "assistant": "Assistant"}.get(m["role"], m["role"].title())
            details = _details(m) if m["role"] == "assistant" else ""
            out.append(f"## {heading}" + (f" ({details})" if details else "") + "\n")
            out.append(m["content"].rstrip("\n") + "\n")
            for i, source in enumerate(m.get("sources") or [], start=1):
                page = f", page {source['page']}" if source.get("page") else ""
                out.append(f"{i}. {source.get('title', '')}{page}")
            if m.get("sources"):
                out.append("")
        out.append("")
    return "\n".join(out)


# ---- import: from a file's JSON to conversations ----------------------------------------------


@dataclass
class Incoming:
    """A message to import: its key in the file, its parent's key, and what to save."""

    key: Any
    parent: Any
    role: str
    content: str
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass
class IncomingConversation:
    title: str
    messages: list[Incoming]
    active: Any = None
    skipped: list[str] = field(default_factory=list)  # messages left out, with why


def detect(data: Any) -> str | None:
    if isinstance(data, dict) and data.get("format") == FORMAT:
        return "breezeweb"
    # ChatGPT's: a list of conversations with a `mapping` (one without is skipped later).
    if isinstance(data, list) and any(isinstance(c, dict) and "mapping" in c for c in data):
        return "chatgpt"
    return None


def _conversations_of(data: Any, kind: str) -> list[Any]:
    return data.get("conversations") or [] if kind == "breezeweb" else data


def _from_breezeweb(record: Any) -> IncomingConversation:
    if not isinstance(record, dict) or not isinstance(record.get("messages"), list):
        raise ValueError("not a conversation (an object with `messages`)")
    messages = []
    for m in record["messages"]:
        if not isinstance(m, dict):
            continue
        usage, timings = m.get("usage") or {}, m.get("timings") or {}
        extra = {
            "status": m.get("status"),
            "runner_name": m.get("runner"),
            "model_id": m.get("model"),
            "fallback": m.get("fallback"),
            "finish_reason": m.get("finish_reason"),
            "sources": m.get("sources"),
            "prompt_tokens": usage.get("prompt_tokens") if isinstance(usage, dict) else None,
            "completion_tokens": usage.get("completion_tokens")
            if isinstance(usage, dict)
            else None,
        }
        if isinstance(timings, dict):
            extra |= {
                k: timings.get(k)
                for k in ("time_to_first_token_ms", "tokens_per_second", "total_ms")
            }
        messages.append(
            Incoming(m.get("id"), m.get("parent"), m.get("role"), m.get("content"), extra)
        )
    return IncomingConversation(record.get("title"), messages, record.get("active"))


def _chatgpt_text(content: Any) -> tuple[str | None, str]:
    """(text, why not): the text of a ChatGPT message's `content`."""
    if not isinstance(content, dict):
        return None, "no content"
    kind = content.get("content_type")
    parts = content.get("parts")
    if kind in ("text", "multimodal_text") and isinstance(parts, list):
        texts = [p for p in parts if isinstance(p, str)]
        if len(texts) < len(parts):
            return ("\n".join(texts) or None), "attachments (images, files) are not imported"
        return "\n".join(texts), ""
    if kind == "code" and isinstance(content.get("text"), str):
        return f"```\n{content['text']}\n```", ""
    return None, f"content of type {str(kind)[:40]!r} is not imported"


def _from_chatgpt(record: Any) -> IncomingConversation:
    """ChatGPT's `mapping` is a tree of nodes ({id, message, parent, children});
    nodes without a user or assistant text (its hidden root and system
    messages, tool calls) are left out and their children hang from the
    nearest ancestor kept, so the branches stay as they were."""
    mapping = record.get("mapping") if isinstance(record, dict) else None
    if not isinstance(mapping, dict):
        raise ValueError("not a ChatGPT conversation (no `mapping`)")
    kept: dict[Any, Incoming] = {}
    skipped: list[str] = []
    parent_of = {
        key: (node or {}).get("parent") for key, node in mapping.items() if isinstance(node, dict)
    }

    def kept_ancestor(key: Any) -> Any:
        seen = set()
        while key is not None and key not in kept and key not in seen:
            seen.add(key)
            key = parent_of.get(key)
        return key if key in kept else None

    def created(key: Any) -> float:
        message = (mapping.get(key) or {}).get("message") or {}
        value = message.get("create_time")
        return float(value) if isinstance(value, int | float) else 0.0

    # Parents before children: walk from the roots, children oldest first.
    roots = [k for k, p in parent_of.items() if p is None or p not in mapping]
    order: list[Any] = []
    stack = sorted(roots, key=created, reverse=True)
    visited = set()
    while stack:
        key = stack.pop()
        if key in visited:
            continue
        visited.add(key)
        order.append(key)
        children = (mapping.get(key) or {}).get("children") or []
        stack.extend(sorted((c for c in children if c in mapping), key=created, reverse=True))
    for key in order:
        message = (mapping.get(key) or {}).get("message")
        if not isinstance(message, dict):
            continue
        role = (
            ((message.get("author") or {}).get("role"))
            if isinstance(message.get("author"), dict)
            else None
        )
        if role not in ("user", "assistant"):
            continue  # system prompts, tool calls and results: not conversation turns here
        text, why = _chatgpt_text(message.get("content"))
        if why:
            skipped.append(f"{role} message {str(key)[:40]}: {why}")
        if not text or not text.strip():
            continue
        metadata = message.get("metadata") if isinstance(message.get("metadata"), dict) else {}
        extra = {"model_id": metadata.get("model_slug")}
        kept[key] = Incoming(key, kept_ancestor(parent_of.get(key)), role, text, extra)
    active = kept_ancestor(record.get("current_node"))
    return IncomingConversation(record.get("title"), list(kept.values()), active, skipped)


def _problem(m: Incoming) -> str | None:
    if m.role not in ROLES:
        return f"role {str(m.role)[:20]!r} is not one of {', '.join(ROLES)}"
    if not isinstance(m.content, str):
        return "its content is not text"
    if len(m.content) > MAX_TEXT_CHARS:
        return f"longer than {MAX_TEXT_CHARS:,} characters"
    if "\x00" in m.content:
        return "it holds a NUL character"
    if problem := unencodable(m.content):
        return problem
    return None


_FIELDS = {
    "status": (str, Message.Status.values),
    "runner_name": (str, 100),
    "model_id": (str, 200),
    "finish_reason": (str, 32),
    "fallback": (bool, None),
    "prompt_tokens": (int, None),
    "completion_tokens": (int, None),
    "time_to_first_token_ms": (float, None),
    "tokens_per_second": (float, None),
    "total_ms": (float, None),
    "sources": (list, None),
}


def _extra_fields(extra: dict[str, Any]) -> dict[str, Any]:
    """The message's details that have the right type (others are dropped)."""
    out = {}
    for name, (kind, bound) in _FIELDS.items():
        value = extra.get(name)
        if kind is float and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)
        if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
            continue
        if kind is int and not 0 <= value < 2**31:
            continue
        if kind is str and isinstance(bound, int):
            value = value[:bound]
        if kind is str and isinstance(bound, list) and value not in bound:
            continue
        if kind is list and not all(isinstance(s, dict) for s in value):
            continue
        out[name] = value
    if out.get("status") == Message.Status.STREAMING:
        out["status"] = Message.Status.STOPPED
    return out


def save_conversation(
    user, incoming: IncomingConversation
) -> tuple[Conversation | None, list[str]]:
    """Save one conversation (in the caller's transaction); (None, reasons)
    when nothing of it could be kept."""
    skipped = list(incoming.skipped)
    title = clean_name(incoming.title if isinstance(incoming.title, str) else "")[:MAX_TITLE_CHARS]
    usable = []
    for m in incoming.messages:
        problem = _problem(m)
        if problem:
            skipped.append(f"{m.role if isinstance(m.role, str) else 'a'} message: {problem}")
        else:
            usable.append(m)
    if not usable:
        return None, skipped or ["it has no messages"]
    conversation = Conversation.objects.create(owner=user, title=title or str(IMPORTED_TITLE))
    saved: dict[Any, int] = {}
    for m in usable:
        key = m.key if isinstance(m.key, str | int) and not isinstance(m.key, bool) else None
        parent_id = saved.get(m.parent) if isinstance(m.parent, str | int) else None
        message = Message(
            conversation=conversation,
            role=m.role,
            content=m.content,
            parent_id=parent_id,
            **_extra_fields(m.extra),
        )
        message.root = parent_id is None
        message.save()
        if key is not None:
            saved[key] = message.pk
    active = saved.get(incoming.active) if isinstance(incoming.active, str | int) else None
    if active is not None:
        Conversation.objects.filter(pk=conversation.pk).update(active_leaf_id=active)
    return conversation, skipped


# ---- import jobs ------------------------------------------------------------------------------


# An import in progress saves its job after every conversation (its heartbeat,
# `updated_at`); one that has not for this long was stopped by a restart (its
# thread died with the process) and is settled as failed.
STALE_AFTER_SECONDS = 300

# Why a whole import failed: its `error_code` -> its English `error` (the API's
# text; the page shows a translated message per code, static/js/conversations.js,
# which tests/test_i18n.py checks). `not_json` adds the parser's own words.
IMPORT_ERRORS: dict[str, str] = {
    "stale": "The import stopped when the server restarted; import the file again.",
    "not_json": "The file is not JSON text",
    "unknown_format": "The file is neither a BreezeWeb export nor ChatGPT's conversations.json.",
    "not_a_list": "`conversations` is not a list.",
    "internal": "The import failed; the server logged why.",
}
STALE_ERROR = IMPORT_ERRORS["stale"]


def _upload_path(job_id: int) -> Path:
    return Path(settings.DATA_DIR) / "imports" / f"{int(job_id)}.json"


def settle_stale(job_ids: list[int] | None = None) -> int:
    """Mark queued or running jobs whose heartbeat is older than
    STALE_AFTER_SECONDS as failed with STALE_ERROR, and delete their uploads
    (those of `job_ids` only, when given). Returns how many were settled. A
    job's thread that is only slow notices at its next save and stops."""
    cutoff = timezone.now() - timedelta(seconds=STALE_AFTER_SECONDS)
    rows = ImportJob.objects.filter(status__in=LIVE, updated_at__lt=cutoff)
    if job_ids is not None:
        rows = rows.filter(pk__in=job_ids)
    settled = 0
    for job_id in list(rows.values_list("pk", flat=True)):
        # Conditional: a job that saved progress meanwhile is not settled.
        settled += ImportJob.objects.filter(
            pk=job_id, status__in=LIVE, updated_at__lt=cutoff
        ).update(
            status=ImportJob.Status.FAILED,
            error=STALE_ERROR,
            error_code="stale",
            updated_at=timezone.now(),
        )
        _upload_path(job_id).unlink(missing_ok=True)
    return settled


def job_dict(job: ImportJob) -> dict[str, Any]:
    return {
        "id": job.pk,
        "status": job.status,
        "format": job.source_format,
        "total": job.total,
        "done": job.done,
        "progress": round(job.done / job.total, 3) if job.total else 0.0,
        "report": job.report,
        "error": job.error,
        "error_code": job.error_code,
    }


def start_import(user, raw: bytes, *, background: bool = True) -> dict[str, Any]:
    """Keep the upload and queue its import; the answer is the job (poll it).
    `background` False runs it now (management commands, tests of the parser)."""
    settle_stale()  # uploads a restart left behind go before a new one is kept
    job = ImportJob.objects.create(owner=user)
    path = _upload_path(job.pk)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(raw)
    if background:
        name = f"import-{job.pk}"
        # The conversations it makes are titled in the language of the request.
        language = translation.get_language()
        start = threading.Thread(
            target=run_import, args=(job.pk, language), name=name, daemon=True
        ).start
        transaction.on_commit(start)
    else:
        run_import(job.pk)
        job.refresh_from_db()
    return job_dict(job)


def get_job(user, job_id: int) -> dict[str, Any] | None:
    """The user's job; one a restart stopped is answered as failed (settle_stale)."""
    settle_stale([job_id])
    job = ImportJob.objects.filter(pk=job_id, owner=user).first()
    return job_dict(job) if job else None


def run_import(job_id: int, language: str | None = None) -> None:
    """Work through one import job; never raises (a failure is the job's
    `error` and `error_code`). `language`: that of the request that started it
    (the current one when None), for the default title."""
    with translation.override(language or translation.get_language()):
        _run_import(job_id)


def _run_import(job_id: int) -> None:
    path = _upload_path(job_id)
    try:
        job = ImportJob.objects.select_related("owner").get(pk=job_id)
        if job.status not in LIVE:
            return  # settled meanwhile
        job.status = ImportJob.Status.RUNNING
        _beat(job, "status")
        try:
            data = json.loads(path.read_bytes().decode("utf-8-sig"))
        except (ValueError, RecursionError) as exc:
            raise ImportRefused("not_json", f": {str(exc)[:200]}") from None
        kind = detect(data)
        if kind is None:
            raise ImportRefused("unknown_format")
        records = _conversations_of(data, kind)
        if not isinstance(records, list):
            raise ImportRefused("not_a_list")
        job.source_format, job.total = kind, len(records)
        _beat(job, "source_format", "total")
        imported, skipped = [], []
        for index, record in enumerate(_iterate(records, kind)):
            title, result = record
            if isinstance(result, str):
                skipped.append({"index": index, "title": title, "reasons": [result]})
            else:
                with transaction.atomic():
                    conversation, reasons = save_conversation(job.owner, result)
                if conversation is None:
                    skipped.append({"index": index, "title": title, "reasons": reasons})
                else:
                    count = conversation.messages.count()
                    imported.append(
                        {
                            "index": index,
                            "conversation_id": conversation.pk,
                            "title": conversation.title,
                            "messages": count,
                            "skipped_messages": reasons,
                        }
                    )
            job.done = index + 1
            job.report = {"imported": imported, "skipped": skipped}
            _beat(job, "done", "report")
        job.status = ImportJob.Status.DONE
        _beat(job, "status")
    except Settled:
        log.warning("import %s was settled as stopped while it ran; it stops here", job_id)
    except ImportRefused as exc:
        ImportJob.objects.filter(pk=job_id, status__in=LIVE).update(
            status=ImportJob.Status.FAILED, error=str(exc), error_code=exc.code
        )
    except Exception:
        log.exception("import %s failed", job_id)
        ImportJob.objects.filter(pk=job_id, status__in=LIVE).update(
            status=ImportJob.Status.FAILED,
            error=IMPORT_ERRORS["internal"],
            error_code="internal",
        )
    finally:
        path.unlink(missing_ok=True)
        if threading.current_thread() is not threading.main_thread():
            close_old_connections()
            connection.close()


class ImportRefused(Exception):
    """The file as a whole cannot be imported: `code` (one of IMPORT_ERRORS)
    says why, its message and `detail` in English."""

    def __init__(self, code: str, detail: str = "") -> None:
        super().__init__(IMPORT_ERRORS[code] + detail)
        self.code = code


class Settled(Exception):
    """The job was settled as failed (settle_stale) while its thread ran."""


LIVE = (ImportJob.Status.QUEUED, ImportJob.Status.RUNNING)


def _beat(job: ImportJob, *fields: str) -> None:
    """Save the job's progress (its heartbeat), unless it was settled
    meanwhile: then stop, rather than bring a failed job back to life."""
    values = {f: getattr(job, f) for f in fields}
    saved = ImportJob.objects.filter(pk=job.pk, status__in=LIVE).update(
        **values, updated_at=timezone.now()
    )
    if not saved:
        raise Settled


def _iterate(records: list[Any], kind: str) -> Iterator[tuple[str, IncomingConversation | str]]:
    parse = _from_breezeweb if kind == "breezeweb" else _from_chatgpt
    for record in records:
        title = record.get("title") if isinstance(record, dict) else None
        title = clean_name(title)[:MAX_TITLE_CHARS] if isinstance(title, str) else ""
        try:
            yield title, parse(record)
        except (ValueError, TypeError, AttributeError) as exc:
            yield title, str(exc)[:200]
