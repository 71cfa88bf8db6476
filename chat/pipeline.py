"""One chat turn, from the user's words to streamed, filtered tokens.

guardian (input) -> RAG retrieval (when on) -> router (capability, priority,
fallback) -> prompt fitted to the chosen runner's context budget -> runner
events -> guardian (output, streaming-safe). Shared by the websocket consumer
and the OpenAI-compatible HTTP API; persistence is the caller's business.

In agent mode (`TurnInput.agent`) the same guarded router answers each round
of `agents.loop.run_agent`, which executes the model's tool calls and feeds
their results back (docs/agents.md).
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass, field, replace
from typing import Any

from django.conf import settings

from channels.db import database_sync_to_async

from accounts import quotas
from core import generation
from runners.base import (
    Capability,
    ChatMessage,
    ChatRequest,
    Done,
    ErrorCode,
    Notice,
    Runner,
    RunnerError,
    TokenDelta,
    request_error,
    request_problem,
)
from runners.guardian import GuardianBlocked, OutputFilter, check_input, enabled_rules
from runners.prompt import drop_oldest, trimmed_notice
from runners.router import Routed, load_candidates, route

__all__ = [
    "GuardianBlocked",
    "Routed",
    "Sources",
    "TurnInput",
    "check_encodable",
    "fit_to_budget",
    "run_turn",
]

log = logging.getLogger(__name__)

SYSTEM_PROMPT = (
    "You are BreezeWeb's assistant. Answer clearly and concisely. Use Markdown for lists and code."
)
# The grounded prompt, designed for small models (bench/answer_eval.py measures
# it): the numbered sources (above the collection's floor, most relevant
# first, as rag.retrieval assembles them) go into the last user message, right
# before the question, with a short instruction; the earlier turns stay as they
# were, so the local runner's KV cache still holds them on the next turn.
NOT_IN_DOCUMENTS = "The documents do not contain the answer."
RAG_INSTRUCTIONS = (
    "Answer the question using only the sources above. Give the facts exactly as the "
    "sources state them and cite the number of the source you used, like [1]. If the "
    f'sources do not contain the answer, say "{NOT_IN_DOCUMENTS}"'
)


# Grounded answers are extraction, not invention: a turn that has sources is
# answered greedily unless the request sets a temperature (measured in
# bench/answer_eval.py: SmolLM2-135M at the config's 0.7 kept the fact in 5 of
# 16 answers, greedy in 14).
GROUNDED_TEMPERATURE = 0.0


def grounded_question(question: str, context: str) -> str:
    """The last user message with its sources: what the model answers from."""
    return f"Sources:\n{context}\n\n{RAG_INSTRUCTIONS}\n\nQuestion: {question}"


@dataclass(frozen=True)
class TurnInput:
    user: Any
    messages: tuple[ChatMessage, ...]
    rag: bool = False
    collection_ids: tuple[int, ...] = ()
    pinned_runner: str | None = None
    # Sampling parameters the caller set (runners.base.SAMPLING_PARAMS; the
    # rest take the runner's settings), as chat.frames.sampling_of gives them.
    sampling: Mapping[str, Any] = field(default_factory=dict)
    max_tokens: int | None = None
    stop: tuple[str, ...] = ()
    tools: tuple[dict, ...] = ()
    source: str = "chat"
    message_id: int | None = None
    request_id: str = ""
    agent: bool = False
    timezone: str = ""
    api_key_id: int | None = None  # the key the turn came with (usage accounting)
    # What `turn_settings(turn)` returns, when the caller read it already in a
    # trip to the database of its own (the API's admission): saves a trip.
    settings: TurnSettings | None = field(default=None, repr=False, compare=False)


@dataclass(frozen=True)
class TurnSettings:
    """What a turn reads before it runs: the guardian rules, the runner
    candidates the user may use (or the "no runner" error, which is raised
    after the input rules spoke), the user's quotas."""

    rules: tuple
    candidates: list | None
    no_runner: RunnerError | None
    budgets: list


@dataclass(frozen=True)
class Sources:
    """The documents an answer drew on (title, page, snippet, score, ...)."""

    sources: tuple[dict, ...]


def _tokens(runner: Runner, message: ChatMessage) -> int:
    # Images cost the remote runner's own tokens; count a flat share so that a
    # conversation full of images is still trimmed.
    return _count(runner, message.content) + 8 + 256 * len(message.images)


def _count(runner: Runner, text: str) -> int:
    """Tokens of the request's own text. The runner's tokenizer already
    counted our system prompt (see `_probe`), so a failure here is about this
    text: the client's mistake (invalid_input), never the runner's."""
    try:
        return runner.count_tokens(text)
    except RunnerError:
        raise
    except Exception as exc:
        error = request_error(exc)
        if error is None:
            log.warning(
                "runner %s could not tokenize a message (%s); refused as invalid input",
                runner.name,
                type(exc).__name__,
            )
            error = RunnerError(
                ErrorCode.INVALID_INPUT,
                f"The runner {runner.name!r} cannot read this message's text "
                f"({type(exc).__name__}); check it for unusual characters.",
            )
        raise error from None


def _probe(runner: Runner) -> int:
    """Tokens of our own system prompt: a tokenizer that fails on it is broken,
    which is the runner's failure (it counts toward its circuit, and the
    request falls back to another runner)."""
    try:
        return runner.count_tokens(SYSTEM_PROMPT)
    except RunnerError:
        raise
    except Exception as exc:
        log.warning("runner %s: its tokenizer failed (%s)", runner.name, type(exc).__name__)
        raise RunnerError(
            ErrorCode.RUNTIME, f"The runner {runner.name!r} could not count tokens."
        ) from None


def check_encodable(request: ChatRequest) -> None:
    """Refuse, before any runner or database sees it, text that cannot be
    encoded (a lone UTF-16 surrogate from a JSON `\\ud800` escape) anywhere
    in the request. Raises RunnerError(invalid_input), which the websocket and
    the HTTP API report as the caller's error and which never counts against
    a runner."""
    problem = request_problem(request)
    if problem:
        raise RunnerError(
            ErrorCode.INVALID_INPUT, f"The request cannot be read: {problem}. Send valid Unicode."
        )


def fit_to_budget(
    request: ChatRequest, runner: Runner, context: str = ""
) -> tuple[ChatRequest, list[Notice]]:
    """The request with a system prompt (and RAG context) that fits the runner's
    context budget: the oldest turns are left out first, whole, and the user is
    told. Refuses, clearly, a last message that cannot fit on its own."""
    original = request
    budget = runner.context_tokens - (request.max_tokens or 0)
    system_text = SYSTEM_PROMPT
    if context and request.messages and request.messages[-1].role == "user":
        last = request.messages[-1]
        grounded = replace(last, content=grounded_question(last.content, context))
        request = replace(request, messages=(*request.messages[:-1], grounded))
    leading = [m for m in request.messages if m.role == "system"]
    if leading:
        system_text = "\n\n".join([*(m.content for m in leading), system_text])
    system = ChatMessage(role="system", content=system_text)
    turns = [m for m in request.messages if m.role != "system"]
    if not turns:
        raise RunnerError(ErrorCode.INVALID_INPUT, "There is no message to answer.")
    _probe(runner)
    used = _tokens(runner, system)
    last = turns[-1]
    if used + _tokens(runner, last) > budget:
        if context:
            # Drop the retrieved context before refusing the user's own message.
            return fit_to_budget(original, runner, "")
        raise RunnerError(
            ErrorCode.INVALID_INPUT,
            f"Your message is too long for the runner {runner.name!r}: about "
            f"{_count(runner, last.content)} tokens, and it can take about "
            f"{max(budget - used, 0)}. Shorten it or choose a runner with a larger context.",
        )
    # Each turn counted once; the one trimmer (runners.prompt) leaves out the oldest.
    costs = {id(m): _tokens(runner, m) for m in turns}
    kept, dropped = drop_oldest(turns, lambda ms: used + sum(costs[id(m)] for m in ms) <= budget)
    # The last turn fits on its own (checked above), so drop_oldest found a fit.
    while kept and kept[0].role == "tool" and len(kept) > 1:
        kept.pop(0)
        dropped += 1
    notices = []
    if dropped:
        notices.append(trimmed_notice(dropped, runner.name, runner.context_tokens))
    return replace(request, messages=(system, *kept)), notices


def _retrieve(turn: TurnInput, query: str):
    from rag.retrieval import retrieve

    return retrieve(
        turn.user,
        query,
        list(turn.collection_ids) or None,
        budget_tokens=settings.RAG_CONTEXT_TOKENS,
    )


def _settings_for(needed, pinned: str | None, need_rag: bool, user) -> TurnSettings:
    """Guardian rules, the runner candidates `user` may use and the user's
    quotas, read once for the turn. A "no runner" error is returned, not
    raised: the input rules speak first. Raises QuotaExceeded when every
    candidate's per-runner budget is spent."""
    with generation.one_stamp():  # three memos, one read of the config version
        rules = enabled_rules()
        try:
            candidates = load_candidates(needed, pinned, need_rag, user)
        except RunnerError as exc:
            return TurnSettings(rules, None, exc, [])
        budgets = quotas.quotas_of(user) if user is not None else []
        # Runners whose per-runner budget (accounts.quotas) is spent are left out.
        allowed = quotas.within_budget(user, candidates, budgets=budgets)
    return TurnSettings(rules, allowed, None, budgets)


def _request_of(turn: TurnInput) -> ChatRequest:
    return ChatRequest(
        messages=turn.messages,
        **turn.sampling,
        max_tokens=turn.max_tokens,
        stop=turn.stop,
        tools=turn.tools,
        request_id=turn.request_id,
    )


def _needed(turn: TurnInput, request: ChatRequest) -> frozenset[Capability]:
    # An agent turn always offers the built-in tools: it needs the `agent` capability.
    needed = request.needed_capabilities()
    return needed | {Capability.AGENT} if turn.agent else needed


def turn_settings(turn: TurnInput, request: ChatRequest | None = None) -> TurnSettings:
    """What `run_turn(turn)` reads before it runs (synchronous: the database),
    for a caller that reads it in a trip to the database of its own and
    passes it in `TurnInput.settings`. `request`: the turn's, when built."""
    needed = _needed(turn, request or _request_of(turn))
    return _settings_for(needed, turn.pinned_runner, turn.rag and not turn.agent, turn.user)


async def _settings(turn: TurnInput, request: ChatRequest) -> TurnSettings:
    if turn.settings is not None:
        return turn.settings
    return await database_sync_to_async(turn_settings)(turn, request)


async def run_turn(turn: TurnInput) -> AsyncIterator[Any]:
    """Run one turn. Yields `Sources` (RAG on), `Routed`, `Notice`, `TokenDelta`,
    `ToolCall`, then `Done`. Raises `RunnerError` or `GuardianBlocked`; after
    tokens were yielded, the caller keeps what it got as the partial answer."""
    if not turn.messages or turn.messages[-1].role != "user":
        raise RunnerError(ErrorCode.INVALID_INPUT, "The last message must be the user's.")
    request = _request_of(turn)
    check_encodable(request)
    if turn.agent:
        async for event in _agent_turn(turn, request):
            yield event
        return
    read = await _settings(turn, request)
    rules, candidates, budgets = read.rules, read.candidates, read.budgets
    last_text = turn.messages[-1].content
    check_input(last_text, rules)
    if read.no_runner is not None:
        raise read.no_runner

    context = ""
    if turn.rag:
        # Embedding the query is CPU work: off the shared ORM thread, and
        # database_sync_to_async closes the worker thread's DB connection.
        retrieved = await database_sync_to_async(_retrieve, thread_sensitive=False)(turn, last_text)
        context = retrieved.text
        yield Sources(tuple(s.as_dict() for s in retrieved.sources))

    if context and request.temperature is None:
        request = replace(request, temperature=GROUNDED_TEMPERATURE)
    async for event in _guarded(turn, request, rules, candidates, budgets, context):
        yield event


def _admission(user, budgets: list):
    """The router's `admit` hook for `user`'s turn: holds what the chosen
    runner's answer may spend in their budgets (accounts.quotas.reserve; the
    prompt counted as `fit_to_budget` counts it), lowering the answer's
    `max_tokens` to what a token budget has left. None (no hook, no trip to
    the database) when the user has no quota at all."""
    if user is None or not budgets:
        return None

    async def admit(config, runner: Runner, request: ChatRequest):
        hold = await database_sync_to_async(quotas.reserve)(
            user,
            config.pk,
            lambda: sum(_tokens(runner, m) for m in request.messages),
            request.max_tokens or 0,
            budgets=budgets,
        )
        if hold.max_tokens is not None and hold.max_tokens < (request.max_tokens or 0):
            request = replace(request, max_tokens=hold.max_tokens)
        return request, hold

    return admit


async def _guarded(
    turn: TurnInput, request: ChatRequest, rules, candidates, budgets: list, context: str = ""
) -> AsyncIterator[Any]:
    """One model answer: routed, fitted to the runner, admitted by the
    user's budgets, output rules applied."""
    output = OutputFilter(rules)
    events = route(
        request,
        pinned=turn.pinned_runner,
        need_rag=bool(context),
        prepare=lambda req, runner: fit_to_budget(req, runner, context),
        source=turn.source,
        message_id=turn.message_id,
        candidates=candidates,
        user=turn.user,
        api_key_id=turn.api_key_id,
        admit=_admission(turn.user, budgets),
    )
    try:
        async for event in events:
            if isinstance(event, TokenDelta):
                text = output.feed(event.text)
                if text:
                    yield TokenDelta(text)
                continue
            if isinstance(event, Done):
                rest = output.finish()
                if rest:
                    yield TokenDelta(rest)
            yield event
    except RunnerError:
        # Show what was held back for the output rules before reporting the error.
        try:
            rest = output.finish()
        except GuardianBlocked:
            rest = ""
        if rest:
            yield TokenDelta(rest)
        raise
    finally:
        await events.aclose()


async def _agent_turn(turn: TurnInput, request: ChatRequest) -> AsyncIterator[Any]:
    """An agent turn: the tools this user may use are offered to a runner with
    the `agent` capability, and `agents.loop.run_agent` runs the rounds.
    Documents are searched by the model itself (the search_documents tool,
    limited to the conversation's collections) rather than retrieved up front."""
    from agents.loop import AGENT_INSTRUCTIONS, StepFinished, run_agent
    from agents.steps import DatabaseSteps, MemorySteps
    from agents.tools import ToolContext, available_tools

    read = await _settings(turn, request)
    rules, candidates, budgets = read.rules, read.candidates, read.budgets
    check_input(turn.messages[-1].content, rules)
    if read.no_runner is not None:
        raise read.no_runner
    interactive = turn.message_id is not None
    context = ToolContext(
        user=turn.user, timezone=turn.timezone, collection_ids=turn.collection_ids
    )
    tools = await available_tools(context, interactive=interactive)
    client_names = frozenset(
        str((t.get("function") or {}).get("name", "")) for t in turn.tools if isinstance(t, dict)
    )
    # A client's tool of the same name wins: the client asked for it explicitly.
    tools = {name: tool for name, tool in tools.items() if name not in client_names}
    specs = (*turn.tools, *(tool.spec() for tool in tools.values()))
    instructions = ChatMessage(role="system", content=AGENT_INSTRUCTIONS)
    request = replace(request, messages=(instructions, *request.messages), tools=specs)
    store = DatabaseSteps(turn.message_id) if interactive else MemorySteps()
    cited: list[dict] = []
    async for event in run_agent(
        request,
        lambda req: _guarded(turn, req, rules, candidates, budgets),
        tools,
        context,
        store,
        rules=rules,
        client_tools=client_names,
    ):
        yield event
        if isinstance(event, StepFinished) and event.step.sources:
            cited.extend(event.step.sources)
            yield Sources(tuple(cited))
