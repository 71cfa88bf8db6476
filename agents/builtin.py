"""The built-in tools: search my documents, read a document, a calculator,
the current date and time, and (off by default) fetch a URL from hosts the
admin allows. Each is a `Tool` (agents/tools.py); failures raise `ToolFailed`
with a message the model is told.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import zoneinfo
from typing import Annotated
from urllib.parse import urljoin, urlsplit

from django.conf import settings as django_settings

from channels.db import database_sync_to_async
from pydantic import AfterValidator, BaseModel, ConfigDict, Field
from pydantic.json_schema import SkipJsonSchema

from agents import limits
from agents.calculator import CalculatorError, evaluate, format_number
from agents.models import AgentSettings
from agents.tools import Tool, ToolContext, ToolFailed, ToolOutput, builtin

SEARCH_RESULTS = 5
SEARCH_BUDGET_TOKENS = 1200


# The arguments of each tool: what the model is shown (the JSON Schema is
# generated from these) and what `run` receives, checked.


def _not_blank(value: str) -> str:
    if not value.strip():
        raise ValueError("Input should not be empty")
    return value


Text = Annotated[str, Field(min_length=1), AfterValidator(_not_blank)]


def _fits_64_bits(value: int) -> int:
    if value > 2**63 - 1:
        raise ValueError("Input should be less than 2**63")
    return value


Id = Annotated[int, Field(ge=1), AfterValidator(_fits_64_bits)]


class _Arguments(BaseModel):
    model_config = ConfigDict(strict=True)  # "1" is not an id, 1.0 is not a page


class SearchArguments(_Arguments):
    query: Text = Field(description="What to look for.")


class ReadArguments(_Arguments):
    document_id: Id
    page: Id | SkipJsonSchema[None] = Field(None, description="1-based; omit for the whole text.")
    section: Text | SkipJsonSchema[None] = Field(
        None,
        description="A heading, or a heading path like 'Guide > Setup' (any case; the start of "
        "a heading is enough); omit for the whole text.",
    )


class CalculatorArguments(_Arguments):
    expression: Text = Field(description="e.g. (17 * 23) / 4")


class TimeArguments(_Arguments):
    timezone: str | SkipJsonSchema[None] = Field(None, description="e.g. Europe/Paris")


class FetchArguments(_Arguments):
    url: Text


# ---- search my documents ---------------------------------------------------------------------


def _search(user, query: str, collection_ids: tuple[int, ...], first_number: int) -> ToolOutput:
    from rag.retrieval import retrieve

    found = retrieve(
        user,
        query,
        list(collection_ids) or None,
        k=SEARCH_RESULTS,
        budget_tokens=SEARCH_BUDGET_TOKENS,
    )
    if not found.sources:
        return ToolOutput("No passage of your documents matches this query.")
    lines = []
    for offset, source in enumerate(found.sources):
        where = f", page {source.page}" if source.page is not None else ""
        text = " ".join(source.text.split())
        number = first_number + offset
        lines.append(f"[{number}] {source.title} (document {source.document_id}{where}): {text}")
    lines.append("Cite the passages you use by their number, like [1].")
    return ToolOutput("\n".join(lines), tuple(s.as_dict() for s in found.sources))


async def search_documents(args: SearchArguments, context: ToolContext) -> ToolOutput:
    return await database_sync_to_async(_search, thread_sensitive=False)(
        context.user, args.query, context.collection_ids, len(context.sources) + 1
    )


# ---- read a document -------------------------------------------------------------------------


SECTION_SEPARATOR = " > "
"""How rag.chunking joins a chunk's heading path (Chunk.section)."""

MAX_LISTED_SECTIONS = 40


def _headings(path: str) -> list[str]:
    return [" ".join(part.split()).casefold() for part in path.split(">") if part.strip()]


def _runs(asked: list[str], headings: list[str], *, prefix: bool) -> bool:
    """Whether the asked headings appear in a row in `headings` (at any level);
    with `prefix`, the last asked one may be only the start of its heading."""
    for start in range(len(headings) - len(asked) + 1):
        window = headings[start : start + len(asked)]
        if window[:-1] != asked[:-1]:
            continue
        last, asked_last = window[-1], asked[-1]
        if last == asked_last or (prefix and last.startswith(asked_last)):
            return True
    return False


def matching_sections(asked: str, sections: list[str]) -> list[str]:
    """The sections (heading paths, in reading order) that `asked` names:
    every section under the asked heading or run of headings, compared
    without regard to case or spacing; when no heading is named in full,
    those whose heading starts with what was asked ("install" for
    "Installation")."""
    wanted = _headings(asked)
    if not wanted:
        return []
    split = {path: _headings(path) for path in sections}
    for prefix in (False, True):
        found = [path for path in sections if _runs(wanted, split[path], prefix=prefix)]
        if found:
            return found
    return []


def _section_list(sections: list[str]) -> str:
    listed = "; ".join(repr(s[:120]) for s in sections[:MAX_LISTED_SECTIONS])
    more = len(sections) - MAX_LISTED_SECTIONS
    return listed + (f"; and {more} more" if more > 0 else "")


def _read(user, document_id: int, page: int | None, section: str | None = None) -> ToolOutput:
    from rag.models import Chunk, Collection, Document

    document = (
        Document.objects.filter(
            pk=document_id,
            status=Document.Status.READY,
            collection__in=Collection.objects.readable_by(user),
        )
        .only("pk", "title", "live_generation", "page_count")
        .first()
    )
    if document is None:
        # Same answer for "not yours" and "does not exist".
        raise ToolFailed(f"Document {document_id} was not found among your documents.")
    chunks = Chunk.objects.filter(document=document, generation=document.live_generation)
    if page is not None:
        chunks = chunks.filter(page=page)
    rows = list(chunks.order_by("chunk_index").values_list("section", "text"))
    if not rows:
        where = f" has no page {page}" if page is not None else " has no text"
        raise ToolFailed(f"Document {document_id}{where}.")
    pages = f" of {document.page_count} pages" if document.page_count else ""
    where = f", page {page}{pages}" if page is not None else pages
    if section is None:
        body = "\n\n".join(text for _, text in rows)
    else:
        sections = list(dict.fromkeys(name for name, _ in rows if name))
        on_page = f" on page {page}" if page is not None else ""
        if not sections:
            raise ToolFailed(
                f"Document {document_id} has no sections (headings){on_page}; read it by page."
            )
        found = matching_sections(section, sections)
        if not found:
            raise ToolFailed(
                f"Document {document_id} has no section {section[:120]!r}{on_page}. "
                f"Its sections: {_section_list(sections)}."
            )
        chosen = set(found)
        parts, shown = [], None
        for name, text in rows:
            if name not in chosen:
                continue
            if name != shown:
                parts.append(f"## {name}")
                shown = name
            parts.append(text)
        body = "\n\n".join(parts)
        where += f", section {found[0]!r}" if len(found) == 1 else f", {len(found)} sections"
    if len(body) > limits.MAX_RESULT_CHARS:
        body = body[: limits.MAX_RESULT_CHARS] + "… (cut; read one page or section at a time)"
    return ToolOutput(f"{document.title}{where}:\n{body}")


async def read_document(args: ReadArguments, context: ToolContext) -> ToolOutput:
    return await database_sync_to_async(_read, thread_sensitive=False)(
        context.user, args.document_id, args.page, args.section
    )


# ---- calculator ------------------------------------------------------------------------------


async def calculator(args: CalculatorArguments, context: ToolContext) -> ToolOutput:
    expression = args.expression
    try:
        value = evaluate(expression)
    except CalculatorError as exc:
        raise ToolFailed(str(exc)) from None
    return ToolOutput(f"{expression.strip()} = {format_number(value)}")


# ---- current date and time -------------------------------------------------------------------


def zone(name: str) -> zoneinfo.ZoneInfo | None:
    """The IANA time zone `name`, or None when there is no such zone."""
    if not name or len(name) > 64:
        return None
    try:
        return zoneinfo.ZoneInfo(name)
    except (zoneinfo.ZoneInfoNotFoundError, ValueError):
        return None


async def current_time(args: TimeArguments, context: ToolContext) -> ToolOutput:
    asked = args.timezone or ""
    tz = zone(asked) if asked else None
    if asked and tz is None:
        raise ToolFailed(f"Unknown time zone {asked[:64]!r}; use an IANA name like Europe/Paris.")
    tz = tz or zone(context.timezone) or zone(django_settings.TIME_ZONE) or dt.UTC
    now = dt.datetime.now(tz)
    return ToolOutput(
        f"{now:%A %d %B %Y, %H:%M:%S} ({tz.key if hasattr(tz, 'key') else 'UTC'}, "
        f"UTC{now:%z}); ISO 8601: {now.isoformat(timespec='seconds')}"
    )


# ---- fetch a URL (off by default) ------------------------------------------------------------


def host_allowed(host: str, allowed: list[str]) -> bool:
    """Whether `host` is on the admin's list (exact, or `*.example.com` for subdomains)."""
    host = host.lower().rstrip(".")
    for entry in allowed:
        if entry.startswith("*."):
            if host.endswith(entry[1:]) and host != entry[2:]:
                return True
        elif host == entry:
            return True
    return False


def _checked_url(url: str, allowed: list[str]) -> str:
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ToolFailed("Only http:// and https:// URLs can be fetched.")
    if parts.username or parts.password:
        raise ToolFailed("URLs with a user name or password cannot be fetched.")
    if not host_allowed(parts.hostname, allowed):
        raise ToolFailed(
            f"The host {parts.hostname[:100]!r} is not on the list of hosts agents may read."
        )
    return url


async def fetch_url(args: FetchArguments, context: ToolContext) -> ToolOutput:
    import httpx

    from rag.parsing import html_to_text

    conf = context.settings
    url = _checked_url(args.url, conf.allowed_hosts)
    timeout = httpx.Timeout(conf.fetch_timeout_seconds)
    async with httpx.AsyncClient(
        timeout=timeout, follow_redirects=False, trust_env=False
    ) as client:
        for _ in range(limits.FETCH_MAX_REDIRECTS + 1):
            try:
                async with asyncio.timeout(conf.fetch_timeout_seconds):
                    async with client.stream("GET", url, headers={"Accept": "text/*"}) as response:
                        if response.is_redirect:
                            target = urljoin(url, response.headers.get("location", ""))
                            url = _checked_url(target, conf.allowed_hosts)
                            continue
                        if response.status_code >= 400:
                            raise ToolFailed(f"The server answered HTTP {response.status_code}.")
                        body = bytearray()
                        cut = False
                        async for piece in response.aiter_bytes():
                            body.extend(piece)
                            if len(body) > conf.fetch_max_bytes:
                                del body[conf.fetch_max_bytes :]
                                cut = True
                                break
                        kind = response.headers.get("content-type", "").split(";")[0].strip()
                        charset = response.charset_encoding or "utf-8"
            except (TimeoutError, httpx.TimeoutException):
                raise ToolFailed(
                    f"The page did not load within {conf.fetch_timeout_seconds:g} s."
                ) from None
            except httpx.HTTPError as exc:
                raise ToolFailed(f"The page could not be read ({type(exc).__name__}).") from None
            if kind and not (
                kind.startswith("text/") or kind in ("application/json", "application/xhtml+xml")
            ):
                raise ToolFailed(f"The page is {kind[:60]}, not text.")
            text = bytes(body).decode(charset, errors="replace")
            if "html" in kind:
                text = html_to_text(text)
            text = text.strip()
            if len(text) > limits.MAX_RESULT_CHARS:
                text, cut = text[: limits.MAX_RESULT_CHARS], True
            return ToolOutput(f"{url}\n\n{text}" + ("\n… (cut)" if cut else ""))
    raise ToolFailed(f"More than {limits.FETCH_MAX_REDIRECTS} redirects.")


# ---- the list --------------------------------------------------------------------------------

SEARCH = builtin(
    "search_documents",
    "Search the user's uploaded documents. Returns numbered passages with their document id "
    "and page; cite them by number.",
    SearchArguments,
    search_documents,
)
READ = builtin(
    "read_document",
    "Read one of the user's documents (by the id search_documents gives), one page or one "
    "section (a heading) at a time.",
    ReadArguments,
    read_document,
)
CALCULATOR = builtin(
    "calculator",
    "Evaluate an arithmetic expression exactly: + - * / // % ** ( ), sqrt, log, sin, pi...",
    CalculatorArguments,
    calculator,
)
CURRENT_TIME = builtin(
    "current_time",
    "The current date and time in the user's time zone (or another IANA zone).",
    TimeArguments,
    current_time,
)
FETCH_URL = builtin(
    "fetch_url",
    "Read a web page (text only) from a host the administrator allows.",
    FetchArguments,
    fetch_url,
)

BUILTIN_NAMES = ("search_documents", "read_document", "calculator", "current_time", "fetch_url")


def tools(conf: AgentSettings) -> list[Tool]:
    """The built-in tools offered under `conf` (fetch_url only when enabled with hosts)."""
    offered = [SEARCH, READ, CALCULATOR, CURRENT_TIME]
    if conf.fetch_enabled and conf.allowed_hosts:
        offered.append(FETCH_URL)
    return offered
